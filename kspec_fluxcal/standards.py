"""Standard-star fitting: template, radial velocity, line spread, reddening and flux scale of
every standard star (TYPE 'C') of an exposure, and its calibration vector
Cal_star(lambda) = F_model(lambda) / counts(lambda).

The fit is a sequence of named steps (:func:`_fit` composes them), each on plain arrays:

1. :func:`_observed` -- the standards on their own pixels, continuum-normalised (tellurics,
   bad and non-positive pixels masked), their S/N.
2. :func:`_priors` -- Teff window from the Gaia BP-RP colour (else PS1 g-r) dereddened with
   the catalog's extinction and read off the templates' own synthetic colours; the catalog's
   E(B-V); the parallax.
3. :func:`_initial_rv` -- velocity by cross-correlation against a template near that Teff.
4. :func:`_scan` -- every template of the windows scored in one vectorised pass (chi^2 or
   Huber, float64, each with a smooth multiplicative correction), the velocity refined on the
   best and the templates scored again.
5. :func:`_fit_lsf_scale` -- the width of the line spread the stars show, relative to the
   header's (FWHMPCk measured on arcs differ from the stars' by pixel response, focus drift,
   the library's own resolution): a chi^2 parabola in the width of the best models, pooled
   over the stars; templates re-prepared and re-scanned at that width.
6. :func:`_choose` -- spectral scores (per effective degree of freedom) plus the photometric
   chi^2 of each scaled, reddened model (E(B-V) with the catalog's as a prior) plus a log g
   prior from the parallax: the choice of grid points; then :func:`_refine` -- lattice
   refinement between grid points from several starts, then [alpha/M] between its nodes.
7. :func:`_final_model` -- the interpolated model, its velocity once more, its photometric
   scale and E(B-V), and the model error: the fractional mismatch per pixel that makes
   chi^2/dof = 1 (every real grid is 1-3 % from real stars).
8. :func:`_vectors` -- Cal_star with variance (photon noise, model error, scale error) and a
   mask (bad pixels and strong-line cores; telluric bands are kept: every fiber shares the
   atmosphere).
9. :func:`_acceptance` -- a star is rejected only for what makes it wrong for calibration
   (see :func:`_acceptance`); template mismatch is a quality figure, not a reason.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import xarray as xr

from .catalog import match_standards
from .config import Config, continuum_options
from .constants import (
    A_GAIA_G_PER_EBV,
    A_PS1_G_PER_EBV,
    CAL_UNIT,
    FLUX_UNIT,
    FLUX_UNIT_SCALE,
    HC_ERG_AA,
)
from .continuum import fit_continuum, spline_basis
from .errors import FluxCalWarning
from .grid import PARAMS, interpolation_weights
from .lsf import LineSpread
from .masks import load_regions, region_mask
from .matching import (
    cross_correlate_rv,
    fit_corrected,
    refine_parameters,
    refine_rv,
    score_points,
    score_star,
    score_templates,
    shift_spectra,
    star_correction,
)
from .photometry import (
    band_wavelength,
    fit_photometry,
    fit_warp,
    logg_from_parallax,
    teff_from_color,
    warp_basis,
)
from .reddening import extinction_per_ebv
from .templates import (
    check_coverage,
    is_library,
    library_range,
    library_spectra,
    prepare_library,
)
from .xp import standards_xp, xp_level, xp_resolution, xp_rows

__all__ = ["fit_standards", "exposure_lsf", "fit_photometry", "template_library"]

_LN10_04 = 0.4 * np.log(10.0)
#: Trial widths of the line spread, relative to the current one (step 5).
_LSF_TRIALS = np.array([0.9, 1.0, 1.1])
#: A fitted width closer to 1 than this is not applied (the re-scan would change nothing).
_LSF_MIN_CHANGE = 0.005


def exposure_lsf(exposure, config):
    """The exposure's line-spread function, or the configured FWHM override."""
    if config.instrument.fwhm > 0:
        return LineSpread.constant(config.instrument.fwhm, "config [instrument] fwhm")
    return LineSpread.from_attrs(exposure.attrs)


def template_library(grid, exposure, config=None, *, cache_dir=None):
    """The template library (:func:`kspec_fluxcal.templates.prepare_library`) serving an
    exposure: ``grid`` itself when it already is one covering the exposure."""
    config = Config() if config is None else config
    if is_library(grid):
        return grid
    wave = exposure["wavelength"].values
    lsf = exposure_lsf(exposure, config)
    check_coverage(grid, wave, lsf)
    return prepare_library(grid, library_range(wave, lsf), config, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- entry point


def fit_standards(exposure, catalog, grid, config=None, *, cache_dir=None, xp=None):
    """Fit every standard star of an exposure and form its calibration vector.

    Parameters
    ----------
    exposure : xarray.Dataset
        From :func:`kspec_fluxcal.open_exposure`.
    catalog : xarray.Dataset
        From :func:`kspec_fluxcal.read_catalog`.
    grid : xarray.Dataset
        The opened template grid, or a library from :func:`template_library` /
        :func:`kspec_fluxcal.templates.prepare_library` (what a survey passes around).
    config : Config, optional
        Options (default: ``configs/default.toml``'s values).
    cache_dir : path-like, optional
        Where template libraries are cached as Zarr stores.
    xp : xarray.Dataset or path-like, optional
        Gaia XP spectra (:func:`kspec_fluxcal.xp.read_xp` or its file): a standard with a
        usable one has its warp fitted to its bands and its XP spectrum jointly
        (:mod:`kspec_fluxcal.xp`); the others are fitted exactly as without.

    Returns
    -------
    xarray.Dataset
        Dims (star, wavelength, band): ``cal``, ``cal_variance``, ``cal_mask``,
        ``model_flux`` (the scaled, reddened model at Earth), ``obs_norm`` and ``model_norm``
        (normalised spectra compared), ``match_mask``, ``mag_obs``, ``mag_model``,
        ``phot_resid``, ``band_used``; per-star coordinates fiber, objid, teff, logg, feh,
        alpha (+ ``_err``), teff_colour, ebv, ebv_err, ebv_catalog, rv, rv_err, scale,
        scale_err, chi2_dof, model_error, lsf_scale (+ ``_err``), logg_parallax
        (+ ``_err``), throughput (implied peak), phot_rms, snr, good_fraction, n_bands,
        dropped_bands, flags, status ('ok' or the reason for rejection), and the XP results
        ``xp_used``, ``xp_ratio`` (median XP / model before the warp), ``xp_rms`` (XP about
        the final model, its median level removed), ``xp_match`` ('source_id', 'position',
        'none'). With ``xp``, also ``xp_flux``, ``xp_flux_error``, ``xp_model`` (before the
        warp) and ``xp_model_warped`` (final) at XP's resolution, dims (star,
        xp_wavelength; air Angstrom), in FLUX_UNIT. Attr ``lsf_scale``: the width correction
        applied (pooled over the stars). Lazy when the exposure is Dask-backed.
    """
    config = Config() if config is None else config
    lsf = exposure_lsf(exposure, config)
    library = template_library(grid, exposure, config, cache_dir=cache_dir)
    bands = [b for b in config.photometry.bands if b in catalog["band"].values]
    matched = match_standards(exposure, catalog.sel(band=bands))
    xp = standards_xp(matched, xp)
    std = exposure.isel(fiber=matched["fiber"].values)[["flux", "variance", "good"]]
    kwargs = {"matched": matched, "library": library, "lsf": lsf, "config": config, "xp": xp}
    if not matched.sizes["star"]:
        return _output_template(std, matched, xp, lazy=False)
    if std["flux"].chunks is None:
        return _fit(std, **kwargs)
    template = _output_template(std, matched, xp)
    std = std.chunk({"fiber": -1, "wavelength": -1})
    return xr.map_blocks(_fit, std, kwargs=kwargs, template=template)


_STAR_VARS = {  # name: (dtype, units)
    "teff": (np.float64, "K"), "teff_err": (np.float64, "K"), "logg": (np.float64, "dex"),
    "logg_err": (np.float64, "dex"), "feh": (np.float64, "dex"), "feh_err": (np.float64, "dex"),
    "alpha": (np.float64, "dex"), "teff_colour": (np.float64, "K"), "ebv": (np.float64, "mag"),
    "ebv_err": (np.float64, "mag"), "ebv_catalog": (np.float64, "mag"),
    "rv": (np.float64, "km/s"), "rv_err": (np.float64, "km/s"), "scale": (np.float64, "1"),
    "scale_err": (np.float64, "1"), "chi2_dof": (np.float64, "1"),
    "model_error": (np.float64, "1"), "warp_rms": (np.float64, "1"),
    "phot_rms_spectral": (np.float64, "mag"),
    "lsf_scale": (np.float64, "1"),
    "lsf_scale_err": (np.float64, "1"), "logg_parallax": (np.float64, "dex"),
    "logg_parallax_err": (np.float64, "dex"), "phot_rms": (np.float64, "mag"),
    "snr": (np.float64, "1"), "good_fraction": (np.float64, "1"), "n_bands": (np.int64, "1"),
    "throughput": (np.float64, "1"),
    "dropped_bands": (object, ""), "flags": (object, ""), "status": (object, ""),
    "xp_used": (bool, ""), "xp_ratio": (np.float64, "1"), "xp_rms": (np.float64, "1"),
    "xp_match": (object, ""),
}
#: Per-star XP spectra of the result (star, xp_wavelength), with ``xp``.
_XP_ARRAYS = ("xp_flux", "xp_flux_error", "xp_model", "xp_model_warped")
_XP_DESCRIPTIONS = {
    "xp_flux": "the star's Gaia XP spectrum (NaN: no sample)",
    "xp_flux_error": "its error",
    "xp_model": "the model at Earth before the warp, at XP's resolution",
    "xp_model_warped": "the final model (warp included), at XP's resolution",
}


def _output_template(std, matched, xp=None, lazy=True):
    """A result with the right structure and no values: the template of xr.map_blocks, or
    (``lazy=False``, numpy) the answer for an exposure without standard-star fibers."""
    import dask.array as da

    empty = (lambda shape, dtype, chunks: da.empty(shape, dtype=dtype, chunks=chunks)) if lazy \
        else (lambda shape, dtype, chunks: np.empty(shape, dtype=dtype))
    nstar, nwave = std.sizes["fiber"], std.sizes["wavelength"]
    bands = matched["band"].values
    spectra = {"cal", "cal_variance", "model_flux", "obs_norm", "model_norm"}
    data = {}
    for name in ("cal", "cal_variance", "model_flux", "obs_norm", "model_norm", "cal_mask",
                 "match_mask"):
        dtype = np.float64 if name in spectra else bool
        data[name] = (("star", "wavelength"), empty((nstar, nwave), dtype, (nstar, nwave)))
    for name in ("mag_obs", "mag_err", "mag_model", "phot_resid", "band_used"):
        dtype = bool if name == "band_used" else np.float64
        data[name] = (("star", "band"), empty((nstar, bands.size), dtype, (nstar, bands.size)))
    coords = {name: ("star", np.empty(nstar, dtype=dtype))
              for name, (dtype, _) in _STAR_VARS.items()}
    coords.update(fiber=("star", matched["fiber"].values), objid=("star", matched["objid"].values),
                  fiber_name=("star", matched["fiber_name"].values),
                  wavelength=std["wavelength"].variable, band=("band", bands),
                  star_wavelength=(("star", "wavelength"), np.empty((nstar, nwave))),
                  fiber_lsf_scale=("star", np.empty(nstar)))
    if xp is not None:
        nxp = xp.wave.size
        for name in _XP_ARRAYS:
            data[name] = (("star", "xp_wavelength"), empty((nstar, nxp), np.float64, (nstar, nxp)))
        coords["xp_wavelength"] = ("xp_wavelength", xp.wave)
    return xr.Dataset(data, coords=coords, attrs={"lsf_scale": 1.0})


def _fit(std, matched, library, lsf, config, xp=None):
    """The fit on in-memory arrays (one exposure's standards): the steps in order."""
    obs = _observed(std, config)
    prior = _priors(matched, library, config)
    tm = _Templates(library, obs.wave, lsf, prior.candidates)
    rv = _initial_rv(obs, prior, tm, config)
    scan = _scan(obs, tm, prior, rv, config)
    phot = _PhotometricScore(matched, library, prior, config)
    params, errors = _choose(obs, tm, scan, phot, prior, config)
    lsf_fit = _fit_lsf_scale(obs, tm, scan, params)
    if abs(lsf_fit.scale - 1.0) > _LSF_MIN_CHANGE:
        # Templates at the stars' own line spread; the refinement restarts where it ended
        # (a width change of a few % moves the parameters, not the choice of valley).
        tm = _Templates(library, obs.wave, lsf.scaled(lsf_fit.scale), [])
        params, errors = _choose(obs, tm, scan, phot, prior, config, start=params)
    model = _final_model(obs, tm, scan, params, matched, prior, config, xp)
    model.phot_rms_spectral = _spectral_photometry(phot, scan)
    vectors = _vectors(obs, model, config, tm.lsf)
    model.throughput = _implied_throughput(obs, model, vectors, config)
    status = _acceptance(obs, prior, scan, model, params, matched, library, config)
    return _result(std, obs, prior, scan, lsf_fit, params, errors, model, vectors, status,
                   matched, library, tm.lsf, config)


# ----------------------------------------------------------------------------- 1. observed


def _observed(std, config):
    """The standards as the fit needs them: own pixels, masks, normalised spectra, S/N."""
    wave = std["wavelength"].values
    nstar = std.sizes["fiber"]
    star_wave = (std["fiber_wavelength"].values if "fiber_wavelength" in std.coords
                 else np.broadcast_to(wave, (nstar, wave.size)))
    flux = std["flux"].values.astype(np.float64)
    var = std["variance"].values.astype(np.float64)
    good = std["good"].values
    extra_good = np.ones(star_wave.shape, bool)
    for extra in config.masks.extra:
        extra_good &= region_mask(star_wave, extra)
    match_mask = good & region_mask(star_wave, config.masks.telluric) & extra_good & (flux > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr_pix = np.where(good, flux / np.sqrt(var), np.nan)
        snr = np.nanmedian(snr_pix, axis=1) if nstar else np.zeros(0)
    # The continuum's basis is on the reference pixels: per-fiber solutions differ by a
    # fraction of a pixel, nothing on its 400 A scale.
    cont = fit_continuum(flux, wave, match_mask, **continuum_options(config))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = flux / cont
        ivar = np.where(match_mask & np.isfinite(norm), cont**2 / var, 0.0)
    return SimpleNamespace(wave=wave, star_wave=np.ascontiguousarray(star_wave), flux=flux,
                           expid=str(std.attrs.get("expid", "")),
                           var=var, good=good, extra_good=extra_good, norm=norm, ivar=ivar,
                           snr=snr, good_fraction=good.mean(axis=1) if nstar else np.zeros(0),
                           nstar=nstar, exptime=float(std.attrs.get("exptime", np.nan)),
                           lsf_scale=(std["fibres_lsf_scale"].values.astype(float)
                                      if "fibres_lsf_scale" in std.coords else np.ones(nstar)))


# ----------------------------------------------------------------------------- 2. priors


def _colour_table(library):
    """Teff vs synthetic BP-RP and g-r of the templates' dwarfs (logg ~ 4.5, [M/H] ~ 0)."""
    t = library["template_teff"].values
    g = library["template_logg"].values
    m = library["template_feh"].values
    a = library["template_alpha"].values
    best_g = library["logg"].values[np.argmin(np.abs(library["logg"].values - 4.5))]
    best_m = library["feh"].values[np.argmin(np.abs(library["feh"].values))]
    best_a = library["alpha"].values[np.argmin(np.abs(library["alpha"].values))]
    sel = (g == best_g) & (m == best_m) & (a == best_a)
    if sel.sum() < 2:
        return None
    mag = library["synth_mag"].isel(template=np.flatnonzero(sel))
    order = np.argsort(t[sel])
    table = xr.Dataset(coords={"teff": t[sel][order]})
    for name, blue, red in (("bp_rp", "gaiadr2-BP", "gaiadr2-RP"), ("g_r", "panstarrs-g",
                                                                   "panstarrs-r")):
        colour = (mag.sel(band=blue) - mag.sel(band=red)).values[order]
        table[name] = ("teff", colour)
    return table


def _priors(matched, library, config):
    """What the catalog says before the spectra: reddening, colour Teff window, parallax."""
    a_gaia, a_g = matched["a_gaia"].values, matched["a_g"].values
    ebv_catalog = np.where(np.isfinite(a_gaia), a_gaia / A_GAIA_G_PER_EBV, a_g / A_PS1_G_PER_EBV)
    est = teff_from_color(matched["mag"], ebv=xr.DataArray(np.nan_to_num(ebv_catalog),
                                                             dims="star"),
                          table=_colour_table(library), window=config.fit.teff_window)
    teff_colour = est["teff"].values
    t_templates = library["template_teff"].values
    lo = np.where(np.isfinite(teff_colour), est["teff_min"].values, -np.inf)
    hi = np.where(np.isfinite(teff_colour), est["teff_max"].values, np.inf)
    window = (t_templates[None, :] >= lo[:, None]) & (t_templates[None, :] <= hi[:, None])
    # A window between grid points still needs candidates: take the nearest Teff values.
    empty = ~window.any(axis=1)
    if empty.any():
        nearest = np.abs(t_templates[None, :] - teff_colour[:, None])
        window[empty] = nearest[empty] <= np.nanmin(nearest[empty], axis=1, keepdims=True) + 1
        window[empty & ~np.isfinite(teff_colour)] = True
    return SimpleNamespace(ebv_catalog=ebv_catalog, teff_colour=teff_colour, window=window,
                           candidates=np.flatnonzero(window.any(axis=0)),
                           parallax=matched["parallax"].values,
                           parallax_err=matched["parallax_err"].values)


class _Templates:
    """Library templates at the exposure's pixels and line spread, prepared on demand (the
    candidates of the Teff windows at once, corners of interpolated models as needed)."""

    def __init__(self, library, wave, lsf, candidates):
        self.library, self.wave, self.lsf = library, wave, lsf
        self._rows = {}
        self.fetch(candidates)

    def fetch(self, ids):
        """Normalised templates (len(ids), P) at the exposure's pixels."""
        ids = np.asarray(ids, dtype=np.int64)
        missing = np.setdiff1d(ids, np.fromiter(self._rows, np.int64, len(self._rows)))
        if missing.size:
            new = library_spectra(self.library, self.wave, self.lsf, _as_index(missing))
            self._rows.update(zip(missing.tolist(), new, strict=True))
        return np.stack([self._rows[i] for i in ids.tolist()]) if ids.size else \
            np.zeros((0, self.wave.size))

    __call__ = fetch

    def flux(self, ids):
        """Surface fluxes (len(ids), P) at the exposure's pixels (erg/s/cm^2/A)."""
        return library_spectra(self.library, self.wave, self.lsf, np.asarray(ids), kind="flux")


def _as_index(ids):
    """A slice when the ids are consecutive (a view of the library, no copy)."""
    if ids.size and ids[-1] - ids[0] + 1 == ids.size:
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return ids


# ----------------------------------------------------------------------------- 3-4. RV, scan


def _reference_templates(library, teff):
    """Per star, the template nearest (teff, logg 4.5, [M/H] 0, alpha 0); median Teff if NaN."""
    t = library["template_teff"].values
    g = library["template_logg"].values
    m = library["template_feh"].values
    a = library["template_alpha"].values
    target = np.where(np.isfinite(teff), teff, np.median(t))
    dist = (((t[None, :] - target[:, None]) / 250.0) ** 2 + ((g - 4.5) / 0.5) ** 2
            + (m / 0.25) ** 2 + (a / 0.25) ** 2)
    return np.argmin(dist, axis=1)


def _initial_rv(obs, prior, tm, config):
    """Velocities by cross-correlation against a template near each star's colour Teff."""
    ref = _reference_templates(tm.library, prior.teff_colour)
    rv, _ = cross_correlate_rv(obs.norm, obs.ivar, tm.fetch(ref), obs.wave,
                               rv_max=config.fit.rv_max, star_wavelength=obs.star_wave)
    return rv


def _scan(obs, tm, prior, rv0, config):
    """Spectral scores of every candidate (S, T_library), velocities refined on the best.

    Each star is scored in the fast mode: divided by the smooth correction of one template
    (its reference, then its best), every template with a single amplitude.
    """
    fit = config.fit
    knots = fit.correction_knots or None
    cand = prior.candidates
    norm_c = tm.fetch(cand)

    def scores_at(template_ids, rv):
        corr = None
        if knots:
            corr = np.stack([star_correction(obs.norm[s], obs.ivar[s], tm.fetch([t])[0], rv[s],
                                             obs.wave, knots, obs.star_wave[s])
                             for s, t in enumerate(template_ids)])  # a few stars
        out = np.full(prior.window.shape, np.nan)
        out[:, cand] = score_templates(
            xr.DataArray(obs.norm, dims=("star", "wavelength"),
                         coords={"wavelength": obs.wave}),
            xr.DataArray(obs.ivar, dims=("star", "wavelength")),
            xr.DataArray(norm_c, dims=("template", "wavelength"),
                         coords={"wavelength": obs.wave}),
            xr.DataArray(rv, dims="star"), metric=fit.metric, huber_delta=fit.huber_delta,
            correction=None if corr is None else xr.DataArray(corr, dims=("star", "wavelength")),
            star_wavelength=xr.DataArray(obs.star_wave, dims=("star", "wavelength")),
        ).values
        return np.where(prior.window, out, np.nan)

    ref = _reference_templates(tm.library, prior.teff_colour)
    spec = scores_at(ref, rv0)
    usable = np.isfinite(spec).any(axis=1)
    best = np.where(usable, np.nanargmin(np.where(np.isfinite(spec), spec, np.inf), axis=1), 0)
    rv, rv_err = refine_rv(obs.norm, obs.ivar, tm.fetch(best), obs.wave, rv0,
                           knot_spacing=knots, star_wavelength=obs.star_wave)
    rv = np.where(usable, rv, rv0)
    spec = scores_at(best, rv)
    best = np.where(usable, np.nanargmin(np.where(np.isfinite(spec), spec, np.inf), axis=1), 0)
    npix = (obs.ivar > 0).sum(axis=1)
    dof = np.maximum(npix - _n_correction(obs.wave, knots), 1)
    chi2_dof_best = np.nanmin(np.where(np.isfinite(spec), spec, np.inf), axis=1) / dof
    return SimpleNamespace(spec=spec, best=best, rv=rv, rv_err=rv_err, usable=usable, dof=dof,
                           chi2_dof_best=chi2_dof_best, knots=knots)


def _n_correction(wave, knot_spacing):
    """Free parameters of the smooth multiplicative correction fitted with each template."""
    return spline_basis(wave, knot_spacing)[0].shape[1] if knot_spacing else 1


# ----------------------------------------------------------------------------- 5. line spread


def _fit_lsf_scale(obs, tm, scan, params):
    """The stars' line-spread width relative to ``tm.lsf``: per star a parabola through the
    chi^2 of its refined model at trial widths; pooled (inverse-variance) over the stars.

    The refined (interpolated) model matters: a neighbouring grid point's lines differ in
    depth, which a width change partly mimics."""
    corners, weight = _interpolated(tm.library, params)
    ids, inverse = np.unique(corners, return_inverse=True)
    inverse = inverse.reshape(corners.shape)
    chi2 = np.full((obs.nstar, _LSF_TRIALS.size), np.nan)
    for k, factor in enumerate(_LSF_TRIALS):
        norm = library_spectra(tm.library, obs.wave, tm.lsf.scaled(factor), ids)
        models = np.einsum("sc,scp->sp", weight, norm[inverse])
        for s in np.flatnonzero(scan.usable):  # a few stars
            chi2[s, k] = score_star(obs.norm[s], obs.ivar[s], models[s][None], scan.rv[s],
                                    obs.wave, "chi2", knot_spacing=scan.knots,
                                    star_wavelength=obs.star_wave[s])[0]
    x = _LSF_TRIALS - 1.0
    coef = np.polynomial.polynomial.polyfit(x, np.nan_to_num(chi2.T, nan=0.0), 2)  # (3, S)
    a, b = coef[2], coef[1]
    # Errors on the chi^2 scale inflated by chi^2/dof: mismatch widens the minimum.
    inflate = np.maximum(scan.chi2_dof_best, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        vertex = np.where(a > 0, -b / (2 * a), np.nan)
        err = np.where(a > 0, np.sqrt(inflate / a), np.nan)
    ok = scan.usable & np.isfinite(vertex) & (np.abs(vertex) <= 0.25)
    star_scale = np.where(ok, 1.0 + vertex, np.nan)
    star_err = np.where(ok, err, np.nan)
    if ok.any():
        w = 1.0 / star_err[ok] ** 2
        scale = float(np.sum(w * star_scale[ok]) / w.sum())
        scale_err = float(1.0 / np.sqrt(w.sum()))
    else:
        scale, scale_err = 1.0, np.nan
    return SimpleNamespace(scale=scale, err=scale_err, star=star_scale, star_err=star_err)


# ----------------------------------------------------------------------------- 6. choice


class _PhotometricScore:
    """Photometric chi^2 of scaled, reddened models plus the parallax's log g prior.

    The spectrum alone leaves Teff, log g and [M/H] partly degenerate (stronger lines from a
    cooler or a more metal-rich star), and a template family that does not match the star
    trades them against each other; the photometry of the scaled, reddened model (E(B-V)
    with the catalog's as a prior) and the parallax (radius from the scale, hence log g for
    a mass prior) hold them near the truth.
    """

    def __init__(self, matched, library, prior, config):
        fit, phot = config.fit, config.photometry
        bands = list(matched["band"].values)
        self.mag_obs, self.mag_err = matched["mag"].values, matched["mag_err"].values
        self.maggies = np.nan_to_num(10.0 ** (-0.4 * library["synth_mag"].sel(band=bands).values))
        self.ext = library["ext_coeff"].sel(law=fit.extinction_law, band=bands).values
        self.weighted_ext = np.nan_to_num(self.maggies * self.ext)
        self.template_logg = library["template_logg"].values
        self.prior = prior
        self.min_bands = phot.min_bands
        self.options = {"ebv_prior_sigma": fit.ebv_prior_sigma, "reddening": fit.reddening,
                        "ebv_max": fit.ebv_max, "error_floor": phot.error_floor,
                        "outlier_sigma": phot.outlier_sigma, "outlier_mag": phot.outlier_mag,
                        "min_bands": phot.min_bands}

    def fit(self, star, weights):
        """fit_photometry of the models ``weights @ templates`` (K models, sparse weights)."""
        mags, ext = _model_magnitudes(self, weights)
        k = mags.shape[0]
        return fit_photometry(np.broadcast_to(self.mag_obs[star], mags.shape),
                              np.broadcast_to(self.mag_err[star], mags.shape), mags, ext,
                              ebv_prior=np.full(k, self.prior.ebv_catalog[star]), **self.options)

    def __call__(self, star, weights, points):
        """Scores (K,) of models at ``points`` (K, 4): photometric chi^2 + log g prior."""
        res = self.fit(star, weights)
        chi2 = np.where(res["n_bands"] >= self.min_bands, res["chi2"], 0.0)
        logg_p, logg_err = logg_from_parallax(10.0 ** (-0.4 * res["mu"]),
                                              self.prior.parallax[star],
                                              self.prior.parallax_err[star])
        penalty = np.where(np.isfinite(logg_p), ((points[:, 1] - logg_p) / logg_err) ** 2, 0.0)
        return chi2 + penalty

    def nodes(self, star, ids):
        """Scores of grid templates ``ids``."""
        import scipy.sparse

        weights = scipy.sparse.csr_matrix((np.ones(len(ids)), (np.arange(len(ids)), ids)),
                                          shape=(len(ids), self.maggies.shape[0]))
        points = np.zeros((len(ids), 4))
        points[:, 1] = self.template_logg[ids]
        return self(star, weights, points)


def _spectral_weight(scan, config):
    """Divisor of each star's spectral chi^2: its best chi^2 per effective degree of freedom.

    Template mismatch makes residuals correlated: the spectral chi^2 is scaled so that its
    best value counts as ``spectral_dof`` independent measurements (or the pixels' dof),
    not as thousands of pixels outweighing the photometry.
    """
    neff = config.fit.spectral_dof or scan.dof
    best = np.nanmin(np.where(np.isfinite(scan.spec), scan.spec, np.inf), axis=1)
    return np.maximum(best / np.minimum(neff, scan.dof), 1.0)


def _choose(obs, tm, scan, phot, prior, config, start=None):
    """Grid points by spectral + photometric + prior scores, refined between nodes; or, from
    ``start`` (parameters of a previous pass), a short refinement around them."""
    fit = config.fit
    library = tm.library
    spec_scale = _spectral_weight(scan, config)
    if start is not None:
        return _refine_from(obs, tm, scan, phot if fit.use_photometry else None, start,
                            spec_scale, config)
    scores = scan.spec / spec_scale[:, None]
    if fit.use_photometry:
        cand = prior.candidates
        extra = np.stack([phot.nodes(s, cand) for s in range(obs.nstar)]) if obs.nstar else \
            np.zeros((0, cand.size))
        scores[:, cand] = scores[:, cand] + extra
    finite = np.where(np.isfinite(scores), scores, np.inf)
    best = np.where(scan.usable, np.argmin(finite, axis=1), 0)
    params = {p: library[f"template_{p}"].values[best].astype(float) for p in PARAMS}
    errors = {p: np.full(obs.nstar, np.nan) for p in PARAMS}
    if not (fit.refine and scan.usable.any()):
        return params, errors
    ok = np.flatnonzero(scan.usable)
    refined, refined_err = _refine(obs, tm, scan, phot if fit.use_photometry else None,
                                   scores[ok], ok, spec_scale[ok], config)
    for p in PARAMS:
        params[p][ok] = refined[p]
        errors[p][ok] = refined_err[p]
    return params, errors


def _refine(obs, tm, scan, phot, scores, ok, spec_scale, config):
    """Lattice refinement in (teff, logg, [M/H]) from several starts (the best kept), then
    [alpha/M] between its nodes, for the stars ``ok``."""
    fit = config.fit
    library = tm.library
    axes = {p: library[p].values for p in PARAMS}
    template_index = library["template_index"].values
    nstart = min(fit.refine_starts, scores.shape[1])
    starts = _distinct_starts(library, scores, nstart)  # (n_ok, nstart) templates
    star_of = np.repeat(ok, nstart)
    corr = None
    if scan.knots:  # each start's own correction, so that valleys compete fairly
        corr = np.stack([star_correction(obs.norm[s], obs.ivar[s], tm.fetch([t])[0],
                                         scan.rv[s], obs.wave, scan.knots, obs.star_wave[s])
                         for s, t in zip(star_of, starts.ravel(), strict=True)])
    options = {"metric": fit.metric, "delta": fit.huber_delta, "correction": corr,
               "spec_scale": np.repeat(spec_scale, nstart),
               "star_wavelength": obs.star_wave[star_of],
               "extra_score": None if phot is None else
               (lambda row, weights, points: phot(star_of[row], weights, points))}
    start = {p: library[f"template_{p}"].values[starts.ravel()] for p in PARAMS}
    refined, refined_err, final = refine_parameters(
        obs.norm[star_of], obs.ivar[star_of], tm, template_index, axes, start, scan.rv[star_of],
        obs.wave, **options)
    pick = np.nanargmin(np.where(np.isfinite(final), final, np.inf).reshape(ok.size, nstart),
                        axis=1)
    rows = np.arange(ok.size) * nstart + pick
    params = {p: np.asarray(refined[p], dtype=float)[rows] for p in PARAMS}
    errors = {p: (np.asarray(refined_err[p])[rows] if p in refined_err
                  else np.full(rows.size, np.nan)) for p in PARAMS}
    if axes["alpha"].size > 1:
        chosen = star_of[rows]
        alpha_options = {
            "metric": fit.metric, "delta": fit.huber_delta,
            "correction": None if corr is None else corr[rows],
            "spec_scale": spec_scale, "star_wavelength": obs.star_wave[chosen],
            "extra_score": None if phot is None else
            (lambda row, weights, points: phot(chosen[row], weights, points))}
        params["alpha"], errors["alpha"] = _refine_alpha(obs, tm, scan, params, chosen,
                                                         alpha_options, axes, template_index)
    return params, errors


def _refine_from(obs, tm, scan, phot, start, spec_scale, config):
    """A lattice of a third of a grid step around ``start`` (and [alpha/M] again)."""
    fit = config.fit
    library = tm.library
    axes = {p: library[p].values for p in PARAMS}
    template_index = library["template_index"].values
    ok = np.flatnonzero(scan.usable)
    params = {p: np.array(start[p], dtype=float) for p in PARAMS}
    errors = {p: np.full(obs.nstar, np.nan) for p in PARAMS}
    if not ok.size:
        return params, errors
    corr = None
    if scan.knots:
        corners, weight = _interpolated(library, {p: params[p][ok] for p in PARAMS})
        ids, inverse = np.unique(corners, return_inverse=True)
        models = np.einsum("sc,scp->sp", weight, tm.fetch(ids)[inverse.reshape(corners.shape)])
        corr = np.stack([star_correction(obs.norm[s], obs.ivar[s], models[k], scan.rv[s],
                                         obs.wave, scan.knots, obs.star_wave[s])
                         for k, s in enumerate(ok)])
    options = {"metric": fit.metric, "delta": fit.huber_delta, "correction": corr,
               "spec_scale": spec_scale[ok], "star_wavelength": obs.star_wave[ok],
               "extra_score": None if phot is None else
               (lambda row, weights, points: phot(ok[row], weights, points))}
    refined, refined_err, _ = refine_parameters(
        obs.norm[ok], obs.ivar[ok], tm, template_index, axes,
        {p: params[p][ok] for p in PARAMS}, scan.rv[ok], obs.wave, levels=((5, 1.0 / 3),),
        **options)
    for p in PARAMS[:3]:
        params[p][ok], errors[p][ok] = refined[p], refined_err[p]
    if axes["alpha"].size > 1:
        params["alpha"][ok], errors["alpha"][ok] = _refine_alpha(
            obs, tm, scan, {p: params[p][ok] for p in PARAMS}, ok, options, axes,
            template_index)
    return params, errors


def _refine_alpha(obs, tm, scan, params, ok, options, axes, template_index):
    """[alpha/M] between the grid's nodes: scores on a line of alpha at the refined
    (teff, logg, [M/H]), a parabola through the best points."""
    alphas = axes["alpha"]
    trial = np.linspace(alphas[0], alphas[-1], 2 * (alphas.size - 1) * 2 + 1)
    points = np.zeros((ok.size, trial.size, 4))
    for d, p in enumerate(PARAMS[:3]):
        points[..., d] = params[p][:, None]
    points[..., 3] = trial
    scores = score_points(obs.norm[ok], obs.ivar[ok], tm, template_index, axes, points,
                          scan.rv[ok], obs.wave, **options)
    finite = np.where(np.isfinite(scores), scores, np.inf)
    k = np.argmin(finite, axis=1)
    best = trial[k]
    # Parabola through the best point and its neighbours (not at the ends of the range).
    inner = (k > 0) & (k < trial.size - 1)
    rows = np.arange(ok.size)
    km, kp = np.clip(k - 1, 0, None), np.clip(k + 1, None, trial.size - 1)
    y0, ym, yp = finite[rows, k], finite[rows, km], finite[rows, kp]
    h = trial[1] - trial[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        curv = (ym - 2 * y0 + yp) / h**2
        shift = np.where(inner & (curv > 0), -0.5 * h * (yp - ym) / (ym - 2 * y0 + yp), 0.0)
        err = np.where(inner & (curv > 0), np.sqrt(2.0 / curv), np.nan)
    return np.clip(best + np.clip(shift, -h, h), alphas[0], alphas[-1]), err


def _distinct_starts(library, scores, n):
    """Per star, ``n`` good templates, spread over [alpha/M] values and grid valleys.

    For each [alpha/M] of the grid, candidates are taken in order of score and kept only when
    they differ from every kept one by two or more steps in Teff, log g or [M/H]. Spreading
    matters: at grid points an alpha-enhanced metal-poor model can mimic a solar one, and the
    lattice refinement (which keeps [alpha/M]) must also start in the other valley. Short
    lists are padded with the best template.
    """
    index = np.stack([np.searchsorted(library[p].values, library[f"template_{p}"].values)
                      for p in PARAMS[:3]], axis=1)  # (T, 3) grid indices
    alphas = library["template_alpha"].values
    groups = [np.flatnonzero(alphas == a) for a in np.unique(alphas)]
    per_group = int(np.ceil(n / len(groups)))
    finite = np.where(np.isfinite(scores), scores, np.inf)
    starts = np.repeat(np.argmin(finite, axis=1)[:, None], n, axis=1)
    for s in range(scores.shape[0]):  # a few stars; candidates are scanned until enough
        kept = []
        for group in groups:
            mine = []
            for t in group[np.argsort(finite[s, group])]:
                if len(mine) == per_group or not np.isfinite(finite[s, t]):
                    break
                if not mine or np.all(np.max(np.abs(index[mine] - index[t]), axis=1) >= 2):
                    mine.append(t)
            kept += mine
        kept = sorted(kept, key=lambda t: finite[s, t])[:n]
        starts[s, :len(kept)] = kept
    return starts


# ----------------------------------------------------------------------------- 7. final model


def _interpolated(library, params):
    """Corners (S, 16) of the models at ``params`` and their weights."""
    axes = {p: library[p].values for p in PARAMS}
    template_index = library["template_index"].values
    index, weight = interpolation_weights(axes, template_index >= 0, *(params[p] for p in PARAMS))
    corners = template_index[tuple(index[..., k] for k in range(4))]
    weight = np.where(corners >= 0, np.nan_to_num(weight), 0.0)
    return np.maximum(corners, 0), weight


def _final_model(obs, tm, scan, params, matched, prior, config, xp=None):
    """The model at the refined parameters: velocity, chi^2, model error, photometry."""
    import scipy.sparse

    corners, weight = _interpolated(tm.library, params)
    ids, inverse = np.unique(corners, return_inverse=True)
    inverse = inverse.reshape(corners.shape)
    nstar = obs.nstar
    flux_c, norm_c = tm.flux(ids), tm.fetch(ids)
    model = np.einsum("sc,scp->sp", weight, flux_c[inverse])
    model_n = np.einsum("sc,scp->sp", weight, norm_c[inverse])
    rv, rv_err = scan.rv.copy(), scan.rv_err.copy()
    ok = np.flatnonzero(scan.usable)
    if ok.size:  # the velocity once more, against the final model
        rv[ok], rv_err[ok] = refine_rv(obs.norm[ok], obs.ivar[ok], model_n[ok], obs.wave, rv[ok],
                                       knot_spacing=scan.knots, star_wavelength=obs.star_wave[ok])
    model_nobs = np.full((nstar, obs.wave.size), np.nan)
    for s in range(nstar):  # a few stars: the normalised model as compared with the star
        shifted = shift_spectra(model_n[s], obs.star_wave[s], rv[s], obs.wave)
        w = np.where(np.isfinite(shifted), obs.ivar[s], 0.0)
        model_nobs[s] = fit_corrected(np.nan_to_num(obs.norm[s]), w, np.nan_to_num(shifted)[None],
                                      obs.star_wave[s], scan.knots)[0]
        model_nobs[s][~np.isfinite(shifted)] = np.nan
    chi2_dof, model_error = _model_error(obs, model_nobs, scan)
    rows = np.repeat(np.arange(nstar), corners.shape[1])
    weights = scipy.sparse.csr_matrix((weight.ravel(), (rows, corners.ravel())),
                                      shape=(nstar, tm.library.sizes["template"]))
    model_obs = np.stack([shift_spectra(model[s], obs.star_wave[s], rv[s], obs.wave)
                          for s in range(nstar)]) if nstar else np.zeros((0, obs.wave.size))
    scaled = _scaled_model(obs, model_obs, weights, matched, tm.library, prior, config, xp)
    return SimpleNamespace(rv=rv, rv_err=rv_err, model_nobs=model_nobs, chi2_dof=chi2_dof,
                           model_error=model_error, **scaled)


def _scaled_model(obs, model_obs, weights, matched, library, prior, config, xp=None):
    """The model at Earth: flux scale and E(B-V) from the photometry (whose residuals judge
    the star), then a smooth photometric warp fitted with the scale at that E(B-V) (the
    template's broad shape corrected where the bands ask for it; see
    :func:`kspec_fluxcal.photometry.warp_basis`), jointly with the star's Gaia XP spectrum
    where it has a usable one (:mod:`kspec_fluxcal.xp`)."""
    fit = config.fit
    phot = _PhotometricScore(matched, library, prior, config)
    pf = _photometry_rows(phot, weights)
    ebv = pf["ebv"]
    mags, ext = _model_magnitudes(phot, weights)
    a_lambda = extinction_per_ebv(obs.star_wave, fit.extinction_law)
    compared = _xp_comparison(obs, model_obs, pf, a_lambda, matched, xp, config)
    warped = _warp(obs, phot, pf, mags + ext * ebv[:, None], matched, config, compared)
    scale = 10.0 ** (-0.4 * warped["mu"])
    scale_err = scale * _LN10_04 * warped["mu_err"]
    mag_model = mags - 2.5 * np.log10(scale)[:, None] + ext * ebv[:, None] + warped["band_warp"]
    logg_p, logg_p_err = logg_from_parallax(scale, prior.parallax, prior.parallax_err)
    curve = warped["curve"]
    model_flux = (scale[:, None] * model_obs * curve * 10.0 ** (-0.4 * ebv[:, None] * a_lambda)
                  / FLUX_UNIT_SCALE)
    with np.errstate(invalid="ignore"):
        warp_rms = np.sqrt(np.nanmean((curve - 1.0) ** 2, axis=1)) if obs.nstar else np.zeros(0)
    return {"phot": pf, "scale": scale, "scale_err": scale_err, "ebv": ebv,
            "warp_rms": warp_rms, "mag_model": mag_model, "model_flux": model_flux,
            "logg_parallax": logg_p, "logg_parallax_err": logg_p_err,
            "xp": _xp_outputs(obs, model_flux, compared)}


def _warp(obs, phot, pf, reddened, matched, config, compared):
    """Flux scale (``mu``, mag) and photometric warp of every star: from its bands (``[fit]
    warp_degree``), or from its bands and its XP spectrum jointly where that is usable
    (``[xp] xp_warp_degree``); the fit's own scale where there is no warp."""
    out = {"mu": pf["mu"].copy(), "mu_err": pf["mu_err"].copy(),
           "curve": np.ones(obs.star_wave.shape), "band_warp": np.zeros(reddened.shape)}
    with_xp = np.zeros(obs.nstar, bool) if compared is None else compared.usable
    context = (obs, phot, pf, reddened, [band_wavelength(b) for b in matched["band"].values],
               config)
    _apply_warp(out, ~with_xp, config.fit.warp_degree, None, *context)
    if with_xp.any():
        _apply_warp(out, with_xp, config.xp.xp_warp_degree, compared, *context)
    return out


def _apply_warp(out, stars, degree, compared, obs, phot, pf, reddened, band_wave, config):
    """:func:`kspec_fluxcal.photometry.fit_warp` for the ``stars`` (mask), in ``out``.

    Bands only: the warp spans the exposure's range. With XP: each star's warp spans its
    compared XP samples and is held beyond them (a warp of high degree must not swing where
    nothing constrains it)."""
    rows = np.flatnonzero(stars)
    if degree < 1 or not rows.size:
        return
    if compared is None:
        wave_range = (float(obs.wave[0]), float(obs.wave[-1]))
        band_basis = np.broadcast_to(warp_basis(band_wave, wave_range, degree),
                                     (rows.size, len(band_wave), degree))
        pixel_basis = warp_basis(obs.star_wave[rows], wave_range, degree)
        xp = None
    else:
        spans = compared.span[rows]
        band_basis = np.stack([warp_basis(band_wave, r, degree) for r in spans])
        pixel_basis = np.stack([warp_basis(obs.star_wave[s], r, degree)
                                for s, r in zip(rows, spans, strict=True)])
        xp = {k: v[rows] for k, v in compared.rows.items()}
        xp["basis"] = np.stack([warp_basis(compared.wave, r, degree) for r in spans])
    wf = fit_warp(phot.mag_obs[rows], phot.mag_err[rows], reddened[rows], band_basis,
                  pf["used"][rows], warp_sigma=config.fit.warp_sigma,
                  error_floor=config.photometry.error_floor, xp=xp)
    out["mu"][rows], out["mu_err"][rows] = wf["mu"], wf["mu_err"]
    out["curve"][rows] = 10.0 ** (-0.4 * (pixel_basis @ wf["warp"][:, :, None])[..., 0])
    # One basis for all (bands only): the product as it always was, to the last bit.
    out["band_warp"][rows] = ((band_basis[0] @ wf["warp"].T).T if compared is None
                              else np.einsum("sbk,sk->sb", band_basis, wf["warp"]))


def _xp_comparison(obs, model_obs, pf, a_lambda, matched, xp, config):
    """Each star's XP spectrum against its model at Earth before the warp (photometric scale
    and E(B-V)), at XP's resolution: the level check and the rows of the joint warp fit.
    None without XP. A star whose XP fails the check is named in a warning and flagged."""
    if xp is None:
        return None
    scale = 10.0 ** (-0.4 * pf["mu"])
    model = scale[:, None] * model_obs * 10.0 ** (-0.4 * pf["ebv"][:, None] * a_lambda)
    has = np.isfinite(xp.flux).any(axis=1)
    model_xp = np.full(xp.flux.shape, np.nan)
    if has.any():
        model_xp[has] = xp_resolution(obs.star_wave[has], model[has], xp.wave)
    ratio, ok, note = xp_level(xp.flux, model_xp, config.xp.level_tolerance)
    for s in np.flatnonzero([bool(n) for n in note]):
        warnings.warn(f"{obs.expid}: fiber {int(matched['fiber'].values[s])} objid "
                      f"{int(matched['objid'].values[s])}: {note[s]}", FluxCalWarning,
                      stacklevel=2)
    rows = xp_rows(xp.flux, xp.error, model_xp, xp.wave, config.xp)
    compared = np.isfinite(rows["resid"])
    span = np.array([(xp.wave[c].min(), xp.wave[c].max()) if c.sum() > 1 else
                     (obs.wave[0], obs.wave[-1]) for c in compared], dtype=np.float64)
    return SimpleNamespace(wave=xp.wave, flux=xp.flux, error=xp.error, how=xp.how,
                           model=model_xp, ratio=ratio, note=note, rows=rows,
                           span=span.reshape(-1, 2),
                           usable=ok & (config.xp.xp_warp_degree >= 1) & (compared.sum(1) > 1))


def _xp_outputs(obs, model_flux, compared):
    """Per-star XP results: used, level ratio, rms of XP about the final model (its median
    level removed), how it was matched, the flag; and the spectra for QC (FLUX_UNIT)."""
    nstar = obs.nstar
    if compared is None:
        return {"used": np.zeros(nstar, bool), "ratio": np.full(nstar, np.nan),
                "rms": np.full(nstar, np.nan), "match": np.full(nstar, "none"),
                "note": [""] * nstar, "arrays": None}
    has = np.isfinite(compared.flux).any(axis=1)
    final = np.full(compared.flux.shape, np.nan)
    if has.any():
        final[has] = xp_resolution(obs.star_wave[has], model_flux[has] * FLUX_UNIT_SCALE,
                                   compared.wave)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a star without XP: all NaN
        r = compared.flux / final
        r = r / np.nanmedian(r, axis=1, keepdims=True)
        rms = np.sqrt(np.nanmean((r - 1.0) ** 2, axis=1))
    arrays = {"xp_flux": compared.flux, "xp_flux_error": compared.error,
              "xp_model": compared.model, "xp_model_warped": final}
    return {"used": compared.usable, "ratio": compared.ratio, "rms": rms,
            "match": compared.how, "note": compared.note,
            "arrays": {k: v / FLUX_UNIT_SCALE for k, v in arrays.items()},
            "wave": compared.wave}


def _model_magnitudes(phot, weights):
    """Synthetic AB magnitudes (surface flux) and band extinction coefficients of models."""
    maggies = np.asarray(weights @ phot.maggies)
    with np.errstate(divide="ignore", invalid="ignore"):
        ext = np.asarray(weights @ phot.weighted_ext) / maggies
        return np.where(maggies > 0, -2.5 * np.log10(maggies), np.nan), ext


def _photometry_rows(phot, weights):
    """fit_photometry of each star's own model (row s of ``weights``)."""
    rows = [phot.fit(s, weights[s]) for s in range(weights.shape[0])]
    if not rows:
        empty = np.zeros(0)
        return {"mu": empty, "mu_err": empty, "ebv": empty, "ebv_err": empty,
                "resid": np.zeros((0, phot.maggies.shape[1])), "used": np.zeros((0, 0), bool),
                "dropped": np.zeros((0, phot.maggies.shape[1]), bool), "n_bands": empty,
                "rms": empty, "chi2": empty}
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _spectral_photometry(phot, scan):
    """Photometric rms of each star's best template by its spectrum alone (E(B-V) and
    scale fitted): whether the catalog's photometry can belong to the star in the fiber,
    judged where the photometry has not chosen the template."""
    import scipy.sparse

    nstar = scan.best.size
    weights = scipy.sparse.csr_matrix((np.ones(nstar), (np.arange(nstar), scan.best)),
                                      shape=(nstar, phot.maggies.shape[0]))
    rms = _photometry_rows(phot, weights)["rms"]
    return np.where(scan.usable, rms, np.nan)


def _model_error(obs, model_nobs, scan):
    """chi^2/dof of each star against its final model, and the model error: the fractional
    per-pixel mismatch sigma_m with sum r^2 / (var + (sigma_m model)^2) = dof (0 when the
    model fits within the noise), by bisection in log sigma_m for all stars at once."""
    w = np.where(np.isfinite(model_nobs) & np.isfinite(obs.norm), obs.ivar, 0.0)
    resid2 = np.where(w > 0, (np.nan_to_num(obs.norm) - np.nan_to_num(model_nobs)) ** 2, 0.0)
    dof = np.maximum((w > 0).sum(axis=1) - _n_correction(obs.wave, scan.knots), 1)
    chi2_dof = np.sum(w * resid2, axis=1) / dof
    var = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), np.inf)
    m2 = np.nan_to_num(model_nobs) ** 2
    lo, hi = np.full(obs.nstar, -5.0), np.full(obs.nstar, 0.0)  # log10 sigma_m
    for _ in range(40):  # bisection to 1e-12 dex: chi^2 falls with sigma_m
        mid = 0.5 * (lo + hi)
        chi2 = np.sum(resid2 / (var + (10.0 ** mid[:, None]) ** 2 * m2), axis=1) / dof
        above = chi2 > 1.0
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    sigma = np.where(chi2_dof > 1.0, 10.0 ** (0.5 * (lo + hi)), 0.0)
    return chi2_dof, np.where((w > 0).any(axis=1), sigma, np.nan)


# ----------------------------------------------------------------------------- 8. vectors


def _vectors(obs, model, config, lsf):
    """Cal_star = model at Earth / counts, with variance and the reliability mask."""
    line_good = region_mask(obs.star_wave, load_regions(config.masks.lines),
                            pad=0.5 * lsf.fwhm(obs.star_wave))
    rel_scale = np.nan_to_num(model.scale_err / model.scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        cal = model.model_flux / obs.flux
        # Photon noise, the model's per-pixel mismatch and the photometric scale.
        cal_var = cal**2 * (obs.var / obs.flux**2 + np.nan_to_num(model.model_error)[:, None] ** 2
                            + rel_scale[:, None] ** 2)
    cal_ok = obs.good & (obs.flux > 0) & np.isfinite(cal) & np.isfinite(model.model_flux)
    return SimpleNamespace(cal=np.where(cal_ok, cal, np.nan),
                           cal_var=np.where(cal_ok, cal_var, np.nan),
                           cal_mask=cal_ok & line_good & obs.extra_good)


def _implied_throughput(obs, model, vectors, config):
    """Each star's end-to-end peak throughput implied by its counts and its scaled model:
    counts per pixel / (photons per pixel above the atmosphere), 90th percentile over its
    reliable pixels (gain taken as 1 e-/count). Photometry of another star shows here: 1 mag
    too faint implies 2.5 times the instrument's throughput."""
    width = np.gradient(obs.star_wave, axis=1)
    photons = (model.model_flux * FLUX_UNIT_SCALE * obs.exptime
               * config.instrument.collecting_area * width * obs.star_wave / HC_ERG_AA)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(vectors.cal_mask & (photons > 0), obs.flux / photons, np.nan)
        ok = np.isfinite(ratio).any(axis=1)
        peak = np.full(obs.nstar, np.nan)
        if ok.any():
            peak[ok] = np.nanpercentile(ratio[ok], 90, axis=1)
    return peak


def _throughput_verdict(value, config):
    """'ok', 'flag' (outside the plausible range, within the margin) or 'refuse'."""
    inst = config.instrument
    lo, hi, margin = inst.throughput_min, inst.throughput_max, inst.throughput_margin
    if not np.isfinite(value) or lo <= value <= hi:
        return "ok"
    return "flag" if lo / margin <= value <= hi * margin else "refuse"


# ----------------------------------------------------------------------------- 9. acceptance


def _acceptance(obs, prior, scan, model, params, matched, library, config):
    """Why each star cannot calibrate, or 'ok'.

    Rejected for: no catalog entry or too few bands; too few good pixels or too low S/N; no
    template; photometry that disagrees with the spectrum's model (another star, a blend or
    a variable: residual rms beyond ``max_rms``, for the chosen model or for the template
    the spectrum alone prefers, which photometry given weight could otherwise pull away); an
    unphysical velocity or reddening (pinned at the search limits); a model error beyond
    ``max_model_error`` (not a star like the templates); a fit pinned at the grid's Teff
    edge while the colours put the star beyond it (the vector's slope would be wrong by the
    missing temperature). Template mismatch below ``max_model_error`` is a quality figure
    (``model_error``), carried into the star's weight.
    """
    fit, phot = config.fit, config.photometry
    pf = model.phot
    teff = params["teff"]
    lo, hi = library["teff"].values[0], library["teff"].values[-1]
    edge_window = fit.teff_window / 3
    edge = (((teff <= lo + 1) & (prior.teff_colour < lo - edge_window))
            | ((teff >= hi - 1) & (prior.teff_colour > hi + edge_window)))
    out = []
    for s in range(obs.nstar):
        if matched["match"].values[s] == "none":
            out.append("no catalog match")
        elif pf["n_bands"][s] < phot.min_bands:
            out.append(f"fewer than {phot.min_bands} valid bands ({int(pf['n_bands'][s])})")
        elif not np.isfinite(obs.snr[s]):
            out.append("no valid pixel")
        elif obs.good_fraction[s] < fit.min_good_fraction:
            out.append(f"only {100 * obs.good_fraction[s]:.0f}% good pixels "
                       f"(< {100 * fit.min_good_fraction:g}%)")
        elif not obs.snr[s] >= fit.min_snr:
            out.append(f"S/N {obs.snr[s]:.1f} < {fit.min_snr:g}")
        elif not scan.usable[s]:
            out.append("no usable template")
        elif not pf["rms"][s] <= phot.max_rms:
            out.append(f"photometry disagrees with the spectrum: rms {pf['rms'][s]:.3f} mag > "
                       f"{phot.max_rms:g} over {int(pf['n_bands'][s])} bands (another star, a "
                       "blend or a variable?)")
        elif not model.phot_rms_spectral[s] <= phot.max_rms:
            # The photometry chose a template the spectrum does not want, to fit itself.
            out.append(f"photometry disagrees with the spectrum: rms "
                       f"{model.phot_rms_spectral[s]:.3f} mag > {phot.max_rms:g} for the "
                       "spectrum's best template (another star, a blend or a variable?)")
        elif abs(model.rv[s]) >= 0.98 * fit.rv_max:
            out.append(f"RV {model.rv[s]:+.0f} km/s at the search limit (+/-{fit.rv_max:g})")
        elif fit.reddening and model.ebv[s] >= fit.ebv_max - 1e-6:
            out.append(f"E(B-V) pinned at its limit {fit.ebv_max:g} mag")
        elif _throughput_verdict(model.throughput[s], config) == "refuse":
            inst = config.instrument
            out.append(f"implied throughput {model.throughput[s]:.3g} is impossible for the "
                       f"instrument ({inst.throughput_min:g}-{inst.throughput_max:g}, x/ "
                       f"{inst.throughput_margin:g}): photometry of another star?")
        elif not model.model_error[s] <= fit.max_model_error:
            out.append(f"model error {100 * model.model_error[s]:.1f}% > "
                       f"{100 * fit.max_model_error:g}% (not a star like the templates?)")
        elif edge[s]:
            out.append(f"outside the grid: colour Teff {prior.teff_colour[s]:.0f} K, fit pinned "
                       f"at the grid's edge ({teff[s]:.0f} K)")
        else:
            out.append("ok")
    return out


def _flags(params, library, lsf_fit, prior, model, config):
    """Notes on accepted fits: parameters at a grid edge, no parallax, a throughput outside
    the instrument's plausible range (within the margin), an XP spectrum not used."""
    out = []
    for s in range(len(params["teff"])):
        notes = []
        if _throughput_verdict(model.throughput[s], config) == "flag":
            notes.append(f"implied throughput {model.throughput[s]:.3g} outside "
                         f"{config.instrument.throughput_min:g}-"
                         f"{config.instrument.throughput_max:g}")
        for p in PARAMS:
            ax = library[p].values
            # [alpha/M] = 0, the lowest node, is where most stars belong: no note.
            low = p != "alpha" and params[p][s] <= ax[0] + 1e-6
            if ax.size > 1 and (low or params[p][s] >= ax[-1] - 1e-6):
                notes.append(f"{p} at grid edge")
        if not np.isfinite(model.logg_parallax[s]):
            notes.append("no parallax prior")
        if model.xp["note"][s]:
            notes.append(model.xp["note"][s])
        out.append(", ".join(notes))
    return out


# ----------------------------------------------------------------------------- result


def _result(std, obs, prior, scan, lsf_fit, params, errors, model, vectors, status, matched,
            library, lsf, config):
    pf = model.phot
    bands = list(matched["band"].values)
    dropped = [",".join(np.asarray(bands)[row]) for row in pf["dropped"]] if obs.nstar else []
    per_star = {
        **{p: params[p] for p in PARAMS}, **{f"{p}_err": errors[p] for p in PARAMS[:3]},
        "teff_colour": prior.teff_colour, "ebv": model.ebv, "ebv_err": pf["ebv_err"],
        "ebv_catalog": prior.ebv_catalog, "rv": model.rv, "rv_err": model.rv_err,
        "scale": model.scale, "scale_err": model.scale_err, "chi2_dof": model.chi2_dof,
        "model_error": model.model_error, "warp_rms": model.warp_rms,
        "phot_rms_spectral": model.phot_rms_spectral,
        "lsf_scale": lsf_fit.star,
        "lsf_scale_err": lsf_fit.star_err, "logg_parallax": model.logg_parallax,
        "logg_parallax_err": model.logg_parallax_err, "phot_rms": pf["rms"], "snr": obs.snr,
        "good_fraction": obs.good_fraction, "n_bands": pf["n_bands"],
        "dropped_bands": dropped,
        "flags": _flags(params, library, lsf_fit, prior, model, config),
        "throughput": model.throughput,
        "status": status,
        "xp_used": model.xp["used"], "xp_ratio": model.xp["ratio"], "xp_rms": model.xp["rms"],
        "xp_match": model.xp["match"],
    }
    coords = {name: ("star", np.asarray(per_star[name], dtype=dtype),
                     {"units": units} if units else {})
              for name, (dtype, units) in _STAR_VARS.items()}
    coords.update(fiber=("star", matched["fiber"].values), objid=("star", matched["objid"].values),
                  fiber_name=("star", matched["fiber_name"].values),
                  wavelength=("wavelength", obs.wave, {"units": "Angstrom", "medium": "air"}),
                  star_wavelength=(("star", "wavelength"), obs.star_wave,
                                   {"units": "Angstrom", "medium": "air",
                                    "description": "each star's own pixels"}),
                  fiber_lsf_scale=("star", obs.lsf_scale),
                  band=("band", np.asarray(bands)))
    spectra = (("star", "wavelength"))
    xp_data = {}
    if model.xp["arrays"] is not None:
        coords["xp_wavelength"] = ("xp_wavelength", model.xp["wave"],
                                   {"units": "Angstrom", "medium": "air"})
        xp_data = {name: (("star", "xp_wavelength"), model.xp["arrays"][name],
                          {"units": FLUX_UNIT, "description": _XP_DESCRIPTIONS[name]})
                   for name in _XP_ARRAYS}
    return xr.Dataset(
        {
            "cal": (spectra, vectors.cal, {"units": CAL_UNIT}),
            "cal_variance": (spectra, vectors.cal_var, {"units": f"({CAL_UNIT})**2"}),
            "cal_mask": (spectra, vectors.cal_mask,
                         {"description": "True = reliable (not a bad pixel or line core)"}),
            "model_flux": (spectra, model.model_flux, {"units": FLUX_UNIT}),
            "obs_norm": (spectra, obs.norm),
            "model_norm": (spectra, model.model_nobs),
            "match_mask": (spectra, obs.ivar > 0,
                           {"description": "pixels used for template matching"}),
            "mag_obs": (("star", "band"), matched["mag"].values, {"units": "mag",
                                                                  "system": "AB"}),
            "mag_err": (("star", "band"), matched["mag_err"].values, {"units": "mag"}),
            "mag_model": (("star", "band"), model.mag_model, {"units": "mag", "system": "AB",
                                                              "description": "the model at "
                                                              "Earth, warp included"}),
            "phot_resid": (("star", "band"), pf["resid"], {"units": "mag",
                                                           "description": "catalog - model"}),
            "band_used": (("star", "band"), pf["used"]),
            **xp_data,
        },
        coords=coords,
        attrs={"expid": str(std.attrs.get("expid", "")), "metric": config.fit.metric,
               "extinction_law": config.fit.extinction_law,
               "grid": str(library.attrs.get("source_directory", "")),
               "grid_synthetic": int(library.attrs.get("synthetic", 0)),
               "lsf_fwhm_coeffs": list(lsf.coeffs), "lsf_scale": lsf_fit.scale,
               "lsf_scale_err": lsf_fit.err,
               "airmass": float(std.attrs.get("airmass", np.nan))},
    )
