"""Photometry of template models for the standard-star fit: the photometric chi^2 of scaled,
reddened models plus the parallax's chi^2 (a log g prior; a score of the parameter choice), and the
photometric fit of each star's own model."""

from __future__ import annotations

import numpy as np
import scipy.sparse

from .._recent import Recent, per_library, read_only
from ..photometric_fit import fit_photometry
from ..photometry import parallax_chi2
from ..templates import library_arrays

__all__ = ["PhotometricScore", "model_magnitudes", "photometry_rows", "final_photometry"]


#: :func:`_band_tables` of the libraries met so far (the same for all their exposures).
_BAND_TABLES = Recent(8)


def _band_tables(library, bands, law):
    """The templates' maggies (T, B), extinction coefficients and their slopes with E(B-V)
    times the maggies (NaN as 0: a model's are the maggie-weighted means of its templates'),
    side by side (T, 3B): a model's three are one sparse product."""
    maggies = np.nan_to_num(10.0 ** (-0.4 * library["synth_mag"].sel(band=list(bands)).values))
    ext, slope = (library[name].sel(law=law, band=list(bands)).values
                  for name in ("ext_coeff", "ext_slope"))
    return read_only(np.concatenate([maggies, np.nan_to_num(maggies * ext),
                                     np.nan_to_num(maggies * slope)], axis=1))


class PhotometricScore:
    """Photometric chi^2 of scaled, reddened models plus the parallax's chi^2 (log g prior).

    The spectrum alone leaves Teff, log g and [M/H] partly degenerate (stronger lines from a
    cooler or a more metal-rich star), and a template family that does not match the star
    trades them against each other; the photometry of the scaled, reddened model (E(B-V)
    with the catalog's as a prior) and the parallax (radius from the scale, hence log g for
    a mass prior) hold them near the truth.
    """

    def __init__(self, matched, library, prior, config):
        fit, phot = config.fit, config.photometry
        variables = matched.variables  # arrays without a DataArray around each
        bands = list(variables["band"].values)
        self.mag_obs, self.mag_err = variables["mag"].values, variables["mag_err"].values
        self.band_table = per_library(_BAND_TABLES, _band_tables, library, tuple(bands),
                                      fit.extinction_law)
        self.maggies = self.band_table[:, :len(bands)]
        self.template_logg = library_arrays(library)["template_logg"]
        self.prior = prior
        self.min_bands = phot.min_bands
        self.options = {"ebv_prior_sigma": fit.ebv_prior_sigma, "reddening": fit.reddening,
                        "ebv_max": fit.ebv_max, "error_floor": phot.error_floor,
                        "outlier_sigma": phot.outlier_sigma, "outlier_mag": phot.outlier_mag,
                        "min_bands": phot.min_bands}

    def fit(self, star, weights):
        """fit_photometry of the models ``weights @ templates`` (K models, sparse weights)
        against the photometry of ``star`` (one, or (K,): each model's own)."""
        mags, ext, slope = model_magnitudes(self, weights)
        k = mags.shape[0]
        return fit_photometry(np.broadcast_to(self.mag_obs[star], mags.shape),
                              np.broadcast_to(self.mag_err[star], mags.shape), mags, ext,
                              ext_slope=slope, ebv_prior=np.full(k, self.prior.ebv_catalog[star]),
                              **self.options)

    def __call__(self, star, weights, points):
        """Scores (K,) of models at ``points`` (K, 4) for ``star`` (one, or (K,): each
        model's own): photometric chi^2 + the parallax's chi^2 against the parallax each
        model implies (its log g, scale and the mass prior), at any parallax S/N."""
        res = self.fit(star, weights)
        chi2 = np.where(res["n_bands"] >= self.min_bands, res["chi2"], 0.0)
        return chi2 + parallax_chi2(10.0 ** (-0.4 * res["mu"]), points[:, 1],
                                    self.prior.parallax[star], self.prior.parallax_err[star])

    def nodes(self, stars, ids):
        """Scores (len(stars), len(ids)) of grid templates ``ids`` for each of ``stars``.

        Every (star, template) pair is a row of one call: the rows are independent, so each
        star gets the scores of a call of its own, for the numpy calls of one (a call per
        star cost 1.4 times as much with two stars)."""
        stars, ids = np.asarray(stars), np.asarray(ids)
        n = stars.size * ids.size
        # One entry a row: the CSR arrays themselves (what scipy makes of the (row, column)
        # pairs, without their sorting and checks)
        columns = np.tile(ids, stars.size).astype(np.int32)
        weights = scipy.sparse.csr_matrix((np.ones(n), columns, np.arange(n + 1, dtype=np.int32)),
                                          shape=(n, self.maggies.shape[0]))
        points = np.zeros((n, 4))
        points[:, 1] = np.tile(self.template_logg[ids], stars.size)
        return self(np.repeat(stars, ids.size), weights, points).reshape(stars.size, ids.size)


def model_magnitudes(phot, weights):
    """Synthetic AB magnitudes (surface flux), band extinction coefficients and their slopes
    with E(B-V) of models."""
    # One product of the three tables: scipy sums each column's terms as for one. Its thirds
    # as slices (np.split's views, without its ~10 us of Python).
    table = np.asarray(weights @ phot.band_table)
    nband = phot.maggies.shape[1]
    maggies, ext, slope = table[:, :nband], table[:, nband:2 * nband], table[:, 2 * nband:]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(maggies > 0, -2.5 * np.log10(maggies), np.nan), ext / maggies,
                slope / maggies)


def photometry_rows(phot, weights, stars=None):
    """fit_photometry of models (rows of ``weights``) against the photometry of ``stars``
    (one per row; default: row s is star s's own model)."""
    nstar = weights.shape[0]
    if not nstar:
        empty = np.zeros(0)
        return {"mu": empty, "mu_err": empty, "ebv": empty, "ebv_err": empty,
                "resid": np.zeros((0, phot.maggies.shape[1])), "used": np.zeros((0, 0), bool),
                "dropped": np.zeros((0, phot.maggies.shape[1]), bool), "n_bands": empty,
                "rms": empty, "chi2": empty}
    # All stars in one call: fit_photometry's rows are independent (a star whose bands are
    # settled is solved again, to the same values, while another drops one), so each star
    # gets what a call of its own gives, in half the time.
    return phot.fit(np.arange(nstar) if stars is None else stars, weights)


def final_photometry(phot, weights, scan):
    """:func:`photometry_rows` of each star's final model (row s of ``weights``), and the
    photometric rms of its best template by its spectrum alone (``scan``; E(B-V) and scale
    fitted; NaN without a usable template): whether the catalog's photometry can belong to
    the star in the fiber, judged where the photometry has not chosen the template. Both
    in one fit_photometry call (its rows are independent: each gets what its own call
    gives)."""
    nstar = weights.shape[0]
    weights = weights.tocsr()
    # The best templates' rows (one 1 each) under the models': the matrix scipy.sparse.vstack
    # gives, built from its arrays (~0.15 ms less).
    both = scipy.sparse.csr_matrix(
        (np.concatenate([weights.data, np.ones(nstar)]),
         np.concatenate([weights.indices, scan.best]).astype(weights.indices.dtype),
         np.concatenate([weights.indptr, weights.indptr[-1] + np.arange(1, nstar + 1)])),
        shape=(2 * nstar, weights.shape[1]))
    both = photometry_rows(phot, both, np.tile(np.arange(nstar), 2))
    return ({k: v[:nstar] for k, v in both.items()},
            np.where(scan.usable, both["rms"][nstar:], np.nan))
