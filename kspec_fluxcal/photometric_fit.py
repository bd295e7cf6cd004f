"""Models fitted to a star's catalog photometry: flux scale and E(B-V) (reddening with its
curvature in E(B-V)), then a smooth photometric warp of the model's shape, jointly with the
star's Gaia XP spectrum where there is one."""

from __future__ import annotations

import functools

import numpy as np

from ._nan import nan_to_num
from .constants import EBV_REFERENCE

__all__ = ["fit_photometry", "band_extinction", "warp_basis", "fit_warp"]

#: Passes of the photometric fit with the band coefficients at the last E(B-V) (their change
#: with E(B-V) is a few per cent: two passes leave < 0.1 mmag).
_CURVATURE_PASSES = 2

#: Sums along the bands: ndarray.sum's own reduction without its Python wrapper (~15 sums a
#: fit, ~4 % of its time on the fit's small arrays).
_row_sums = functools.partial(np.add.reduce, axis=1)


def band_extinction(ebv, ext_coeff, ext_slope=None):
    """Band extinction A_b (mag) at ``ebv`` of models with coefficients ``ext_coeff`` (A_b /
    E(B-V) at :data:`~kspec_fluxcal.constants.EBV_REFERENCE`) and their slope with E(B-V)
    ``ext_slope`` (None: linear), broadcast together (``ebv`` over the last axis added)."""
    ebv = np.asarray(ebv, dtype=np.float64)[..., None]
    return _coefficients(ebv, ext_coeff, ext_slope) * ebv


def _coefficients(ebv, ext_coeff, ext_slope):
    """A_b / E(B-V) at ``ebv`` (broadcast against the coefficients)."""
    return ext_coeff if ext_slope is None else ext_coeff + ext_slope * (ebv - EBV_REFERENCE)


def fit_photometry(mag_obs, mag_err, mag_model, ext_coeff, *, ext_slope=None, ebv_prior=None,
                   ebv_prior_sigma=0.05, reddening=True, ebv_max=1.0, error_floor=0.01,
                   outlier_sigma=5.0, outlier_mag=0.1, min_bands=2):
    """Flux scale and E(B-V) of model spectra from catalog photometry, vectorised over stars.

    Solves, by weighted least squares over the valid bands b,
    ``mag_obs_b = mag_model_b + mu + A_b(E)`` with ``scale = 10**(-0.4 mu)``, a Gaussian
    prior ``E ~ N(ebv_prior, ebv_prior_sigma)`` and ``0 <= E <= ebv_max``; a band whose
    residual exceeds both ``outlier_sigma`` sigma and ``outlier_mag`` is dropped (the worst
    first, at most a third of the valid bands) and the fit repeated. The band extinction
    ``A_b(E) = E (R_b + s_b (E - E0))`` (:func:`band_extinction`) is solved for with the
    coefficients held at the last E(B-V), twice more once the bands are chosen.

    Parameters
    ----------
    mag_obs, mag_err, mag_model, ext_coeff : numpy.ndarray, shape (nstar, nband)
        Catalog AB magnitudes and errors (NaN = not measured), model synthetic magnitudes and
        band extinction coefficients A_b / E(B-V) at
        :data:`~kspec_fluxcal.constants.EBV_REFERENCE` (E0).
    ext_slope : numpy.ndarray, shape (nstar, nband), optional
        Their slope with E(B-V) (None: A_b linear in E(B-V)).
    ebv_prior : numpy.ndarray, shape (nstar,), optional
        Prior mean of E(B-V) (NaN: no catalog value, then a prior of 0 +/- 0.1, none when
        ``ebv_prior_sigma`` is 0).

    Returns
    -------
    dict of numpy.ndarray
        ``mu``, ``mu_err``, ``ebv``, ``ebv_err``, ``resid`` (nstar, nband; NaN for unused
        bands), ``used`` (bool), ``dropped`` (bool), ``n_bands``, ``rms`` and ``chi2`` (of the
        used bands, with the prior's term).
    """
    nstar, nband = mag_obs.shape
    d = mag_obs - mag_model
    valid = np.isfinite(d) & np.isfinite(mag_err) & np.isfinite(ext_coeff)
    sigma2 = np.where(valid, mag_err**2 + error_floor**2, np.inf)
    prior = _prior(np.full(nstar, np.nan) if ebv_prior is None else ebv_prior,
                   ebv_prior_sigma, reddening, ebv_max)
    inverse = 1.0 / sigma2  # 0 for an invalid band (1 / inf)
    # A band is an outlier beyond both limits: beyond the larger one.
    limit = np.maximum(outlier_sigma * np.sqrt(sigma2), outlier_mag)
    used = valid.copy()
    dropped = np.zeros_like(valid)
    # Every valid band used: the weights are the inverse variances as they are.
    bands = _band_sums(inverse, np.where(valid, d, 0.0))
    # One errstate for all the solves (a row without a band divides by 0), one per solve
    # was ~6 % of the fit; with the fewer numpy calls here, the fits of 30 lake exposures
    # took 2.2 instead of 2.8 ms per exposure, the same numbers.
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(nband):
            mu, ebv, cov = _solve(bands, ext_coeff, used, prior)
            resid = np.where(used, d - mu[:, None] - ext_coeff * ebv[:, None], np.nan)
            size = np.abs(resid)
            bad = size > limit  # NaN (a band not used) is not beyond it
            if not bad.any():  # the usual case: one reduction, not two
                break
            # Drop a few outlier bands at most: photometry that disagrees in many bands is
            # the wrong star or the wrong model, and must show in the rms, not be pruned away.
            drop = bad.any(1)
            most = np.maximum(1, np.count_nonzero(valid, axis=1) // 3)
            drop &= ((np.count_nonzero(used, axis=1) > min_bands)
                     & (np.count_nonzero(dropped, axis=1) < most))
            if not drop.any():
                break
            # A bad band's residual is finite (beyond its limit): argmax, no NaN to skip.
            worst = np.argmax(np.where(bad, size, -np.inf), axis=1)
            rows = np.flatnonzero(drop)
            used[rows, worst[drop]] = False
            dropped[rows, worst[drop]] = True
            w = np.where(used, inverse, 0.0)
            bands = _band_sums(w, np.where(used, d, 0.0))
        if ext_slope is not None and reddening:
            # nan_to_num's copy only where a slope is not finite (7 of the 200 calls of 30
            # lake exposures)
            slope = ext_slope if np.isfinite(ext_slope).all() else nan_to_num(ext_slope)
            for _ in range(_CURVATURE_PASSES):  # the bands are chosen: their sums stay
                mu, ebv, cov = _solve(bands, _coefficients(ebv[:, None], ext_coeff, slope),
                                      used, prior)
            resid = np.where(used, d - mu[:, None] - band_extinction(ebv, ext_coeff, slope),
                             np.nan)
        mu_err, ebv_err = cov()
        square = np.where(used, resid, 0.0) ** 2
        chi2 = square / sigma2
        chi2 = _row_sums(np.where(chi2 >= 0.0, chi2, 0.0))  # np.nansum's (no NaN)
        if reddening:
            chi2 = chi2 + prior[0] * (ebv - prior[1]) ** 2
        n_bands = used.sum(1)
        rms = np.sqrt(_row_sums(square) / n_bands)
    return {"mu": mu, "mu_err": mu_err, "ebv": ebv, "ebv_err": ebv_err, "resid": resid,
            "used": used, "dropped": dropped, "n_bands": n_bands, "rms": rms, "chi2": chi2}


def _prior(ebv_prior, ebv_prior_sigma, reddening, ebv_max):
    """The E(B-V) prior as :func:`_solve` takes it: weight and mean per star (NaN: 0 +/- 0.1,
    no prior when ``ebv_prior_sigma`` is 0), whether to fit E(B-V), its upper bound, and
    the weight times the mean."""
    known = np.isfinite(ebv_prior)
    sigmas = (ebv_prior_sigma, 0.1 if ebv_prior_sigma > 0 else 0.0)  # known, unknown
    # s * s: what the arrays' squares gave (a power of 2 is a product of the two)
    weights = [1.0 / (max(s, 1e-12) * max(s, 1e-12)) if s > 0 else 0.0 for s in sigmas]
    weight, mean = np.where(known, *weights), np.where(known, ebv_prior, 0.0)
    return weight, mean, reddening, ebv_max, weight * mean  # the product once for the solves


def _band_sums(w, d_):
    """What :func:`_solve` needs of the used bands whatever the coefficients: their weights
    ``w`` (0 for a band not used), the data ``d_`` (0 there), and the sums of both (the same
    for every solve with these bands)."""
    return w, d_, _row_sums(w), _row_sums(w * d_)


def _solve(bands, coeff, used, prior):
    """(mu, E(B-V)) of the ``used`` bands (:func:`_band_sums`) by weighted least squares with
    the prior (:func:`_prior`'s: weight, mean, whether to fit E, its upper bound, weight x
    mean), and a function giving their errors (the 2x2 normal matrix's inverse; only the
    last solve's are wanted). Under the caller's errstate: a row without a band divides by
    0."""
    prior_w, _, reddening, ebv_max, prior_b = prior
    w, d_, s0, b0 = bands
    r_ = np.where(used, coeff, 0.0)
    wr = w * r_
    s1, s2, b1 = _row_sums(wr), _row_sums(w * r_**2), _row_sums(wr * d_)
    if reddening:
        a11 = s2 + prior_w
        det = s0 * a11 - s1**2
        # np.clip's values, and NaN (a singular system) as 0, no reddening: fmax takes the
        # number of a pair with a NaN (no mask and assignment after)
        ebv = np.minimum(np.fmax((s0 * (b1 + prior_b) - s1 * b0) / det, 0.0), ebv_max)
    else:
        ebv = np.zeros(s0.shape)
    mu = (b0 - s1 * ebv) / s0

    def errors():
        if reddening:
            return np.sqrt(a11 / det), np.sqrt(s0 / det)
        return np.sqrt(1.0 / s0), np.full(s0.shape, np.nan)

    return mu, ebv, errors


def warp_basis(wavelength, wave_range, degree=3):
    """Smooth shapes a photometric warp of a model is made of.

    Legendre polynomials of degree 1..``degree`` in 1/lambda over ``wave_range`` (held at
    their end values beyond it), each made orthogonal to a constant over the range, so that
    the warp cannot absorb the flux scale, which stays the photometric fit's own parameter.

    Parameters
    ----------
    wavelength : array_like
        Where to evaluate, Angstrom (e.g. band effective wavelengths, or pixels).
    wave_range : (float, float)
        The spectrum's range, Angstrom.
    degree : int
        Highest Legendre degree (>= 1).

    Returns
    -------
    numpy.ndarray, shape (..., degree)
        In magnitudes per unit coefficient.
    """
    if degree < 1:
        return np.zeros(np.shape(wavelength) + (0,))
    wave_range = (float(wave_range[0]), float(wave_range[1]))
    return _legendre(wavelength, wave_range, degree) - _legendre_mean(wave_range, degree)


def _legendre(wave, wave_range, degree):
    """Legendre polynomials of degree 1..``degree`` in 1/lambda over ``wave_range``."""
    lo, hi = 1e4 / wave_range[1], 1e4 / wave_range[0]  # 1/um
    # np.clip's values by maximum and minimum, without its wrappers
    t = np.minimum(np.maximum(2.0 * (1e4 / np.asarray(wave, dtype=np.float64) - lo) / (hi - lo)
                              - 1.0, -1.0), 1.0)
    # Bonnet's recurrence, n P_n = (2n - 1) t P_n-1 - (n - 1) P_n-2: each degree from the
    # last two, not a Clenshaw sum per degree (legval's: a final model's warps took 0.57
    # instead of 0.38 ms; the same polynomials to an ulp or two).
    polys, before = [t], 1.0
    for n in range(2, degree + 1):
        polys, before = polys + [((2 * n - 1) * t * polys[-1] - (n - 1) * before) / n], polys[-1]
    return np.stack(polys, axis=-1)


@functools.lru_cache(maxsize=64)
def _legendre_mean(wave_range, degree):
    """:func:`_legendre`'s means over ``wave_range``, what :func:`warp_basis` removes: kept
    per range (an exposure's warps ask for the same one for its bands and its pixels)."""
    mean = _legendre(np.linspace(wave_range[0], wave_range[1], 200), wave_range,
                     degree).mean(axis=0)
    mean.flags.writeable = False
    return mean


def fit_warp(mag_obs, mag_err, mag_model, basis, used, *, warp_sigma, error_floor=0.01,
             xp=None):
    """Flux scale and a smooth warp of (reddened) model spectra fitted to photometry, and
    optionally to each star's Gaia XP spectrum.

    Solves ``mag_obs_b = mag_model_b + mu + sum_k c_k basis_bk`` over the ``used`` bands by
    weighted least squares with Gaussian priors c_k ~ N(0, warp_sigma): the warp stays 1
    unless the bands ask for more. The reddening is not fitted here: ``mag_model`` carries
    the photometric fit's own E(B-V), which the warp must not change (a star's E(B-V) is a
    physical parameter; the warp only corrects the template's broad shape).

    With ``xp``, every XP sample i adds the row ``resid_i = nu + sum_k c_k basis_ik + sum_m
    s_m systematic_im``: the same warp, a free XP offset ``nu`` per star (XP's level is not
    trusted: the bands set the scale) and XP's own smooth error ``s_m ~ N(0, 1)``,
    marginalised. No published correction of XP is applied (Huang et al. 2024's are not
    available offline): ``systematic`` is where their residual accuracy enters.

    Parameters
    ----------
    mag_obs, mag_err, mag_model : numpy.ndarray, shape (nstar, nband)
    basis : numpy.ndarray, shape (nstar, nband, nk)
        The warp's shapes at the bands (:func:`warp_basis`).
    used : numpy.ndarray of bool, shape (nstar, nband)
        Bands to fit (e.g. those :func:`fit_photometry` kept).
    warp_sigma : float
        Prior width of each warp coefficient, mag.
    error_floor : float
        Added in quadrature to the band errors, mag.
    xp : dict, optional
        ``resid`` (nstar, nxp): -2.5 log10(XP / model) per sample, NaN = none; ``err``
        (mag); ``basis`` (nstar, nxp, nk): the warp's shapes at the XP wavelengths;
        ``systematic`` (nstar, nxp, m): XP's smooth error per unit nuisance, mag (m >= 0).
        See :func:`kspec_fluxcal.xp.xp_rows`.

    Returns
    -------
    dict of numpy.ndarray
        ``mu``, ``mu_err``, ``warp`` (nstar, nk), ``warp_err``, ``resid`` (nstar, nband; NaN
        for unused bands), ``rms``; with ``xp`` also ``xp_offset`` (nu, mag) and
        ``xp_resid`` (nstar, nxp; after the warp and the offset, XP's systematic included).
    """
    nstar, nband, nk = basis.shape
    sigma2 = mag_err**2 + error_floor**2
    w = np.where(used & np.isfinite(mag_obs - mag_model) & np.isfinite(sigma2), 1.0 / sigma2, 0.0)
    d = nan_to_num(mag_obs - mag_model)
    design = np.concatenate([np.ones((nstar, nband, 1)), nan_to_num(basis)], axis=2)
    prior = np.concatenate([[1e-9], np.full(nk, 1.0 / warp_sigma**2)])
    if xp is not None:
        design, w, d, prior = _with_xp_rows(design, w, d, prior, xp)
    theta, err = _weighted_lstsq(design, w, d, prior)
    model = np.einsum("sbi,si->sb", design, theta)
    resid = np.where(w > 0, d - model, np.nan)
    band = resid[:, :nband]
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = np.sqrt(np.nansum(band**2, axis=1) / (w[:, :nband] > 0).sum(axis=1))
    out = {"mu": theta[:, 0], "mu_err": err[:, 0], "warp": theta[:, 1:nk + 1],
           "warp_err": err[:, 1:nk + 1], "resid": band, "rms": rms}
    if xp is not None:
        # The XP residual about the warped model and the offset: XP's own systematic stays in.
        shapes = design[:, nband:, :nk + 2]
        out["xp_offset"] = theta[:, nk + 1]
        out["xp_resid"] = np.where(w[:, nband:] > 0, d[:, nband:]
                                   - np.einsum("sbi,si->sb", shapes, theta[:, :nk + 2]), np.nan)
    return out


def _with_xp_rows(design, w, d, prior, xp):
    """The band system with XP's rows and parameters (offset, systematic nuisances) added."""
    nstar, nband, npar = design.shape
    resid, err, shapes = xp["resid"], xp["err"], np.asarray(xp["systematic"])
    nxp, m = resid.shape[1], shapes.shape[-1]
    valid = np.isfinite(resid) & np.isfinite(err) & (err > 0)
    band_rows = np.concatenate([design, np.zeros((nstar, nband, 1 + m))], axis=2)
    xp_rows = np.concatenate([np.zeros((nstar, nxp, 1)), nan_to_num(xp["basis"]),
                              np.ones((nstar, nxp, 1)), nan_to_num(shapes)], axis=2)
    w_xp = np.where(valid, 1.0 / np.where(valid, err, 1.0) ** 2, 0.0)
    return (np.concatenate([band_rows, xp_rows], axis=1), np.concatenate([w, w_xp], axis=1),
            np.concatenate([d, np.where(valid, resid, 0.0)], axis=1),
            np.concatenate([prior, [1e-9], np.ones(m)]))


def _weighted_lstsq(design, w, d, prior):
    """Per star, the weighted least-squares solution of ``design @ theta = d`` with Gaussian
    priors (weights ``prior``) around 0, and its errors."""
    normal = np.einsum("sbi,sb,sbj->sij", design, w, design)
    normal += np.diag(prior)[None]
    theta = np.linalg.solve(normal, np.einsum("sbi,sb,sb->si", design, w, d)[..., None])[..., 0]
    err = np.sqrt(np.diagonal(np.linalg.inv(normal), axis1=1, axis2=2))
    return theta, err
