"""Standard-star fitting: template, radial velocity, reddening and flux scale of every
standard star (TYPE 'C') of an exposure, and its calibration vector
Cal_star(lambda) = F_model(lambda) / counts(lambda).

Steps (reference design sections 3 and 7-10, with the improvements of issue 4):

1. Teff from the Gaia BP-RP colour (else PS1 g-r), dereddened with the catalog's extinction,
   read off the template grid's own synthetic colours; it bounds the search.
2. Radial velocity by cross-correlation in ln(lambda) against a template near that Teff.
3. Observed and template spectra continuum-normalised the same way (tellurics, bad pixels
   and non-positive pixels masked).
4. Every template scored in one vectorised pass (chi^2 or Huber, float64 sums).
5. The velocity refined against the best template, the scores recomputed there, and
   (teff, logg, [M/H]) refined by a quadratic fit of the scores around the best grid point.
6-7. The interpolated model reddened and scaled: E(B-V) and the flux scale from all valid
   bands by weighted least squares, with the catalog extinction as a Gaussian prior,
   using the grid's precomputed synthetic magnitudes and band extinction coefficients.
8. Cal_star with variance and a mask (bad pixels and strong stellar-line cores; telluric
   bands are kept: the model has none, so the vector carries the atmosphere, which every
   fiber of the exposure shares).
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import xarray as xr

from .catalog import match_standards
from .config import Config
from .constants import (
    A_GAIA_G_PER_EBV,
    A_PS1_G_PER_EBV,
    CAL_UNIT,
    FLUX_UNIT,
    FLUX_UNIT_SCALE,
)
from .continuum import fit_continuum
from .grid import PARAMS, interpolation_weights
from .lsf import LineSpread
from .masks import load_regions, region_mask
from .matching import (
    cross_correlate_rv,
    fit_corrected,
    refine_parameters,
    refine_rv,
    score_star,
    score_templates,
    shift_spectra,
    star_correction,
)
from .photometry import teff_from_color
from .reddening import extinction_per_ebv
from .templates import prepare_templates, prepared_templates

__all__ = ["fit_standards", "prepare_setup", "exposure_lsf", "fit_photometry"]

_LN10_04 = 0.4 * np.log(10.0)


def exposure_lsf(exposure, config):
    """The exposure's line-spread function, or the configured FWHM override."""
    if config.instrument.fwhm > 0:
        return LineSpread.constant(config.instrument.fwhm, "config [instrument] fwhm")
    return LineSpread.from_attrs(exposure.attrs)


def _continuum_options(config):
    c = config.continuum
    return {"method": c.method, "knot_spacing": c.knot_spacing, "degree": c.degree,
            "poly_degree": c.poly_degree, "window": c.window, "sigma_low": c.sigma_low,
            "sigma_high": c.sigma_high, "iterations": c.iterations}


# ----------------------------------------------------------------------------- setups

_SETUPS = collections.OrderedDict()
_SETUPS_LOCK = threading.Lock()


def prepare_setup(grid, wavelength, lsf, config=None, *, cache_dir=None):
    """Everything template matching needs for one instrument setup, computed once.

    Parameters
    ----------
    grid : xarray.Dataset
        A cube from :func:`kspec_fluxcal.open_grid`.
    wavelength : array_like
        The setup's wavelengths (Angstrom, air).
    lsf : LineSpread
        The setup's line-spread function.
    config : Config, optional
        Continuum options are taken from it.
    cache_dir : path-like, optional
        Where prepared cubes are cached as Zarr stores.

    Returns
    -------
    xarray.Dataset
        In memory. Dim ``template`` (existing grid points only) with ``flux`` (prepared,
        erg/s/cm^2/A), ``norm`` (continuum-normalised), ``synth_mag``, ``ext_coeff`` and
        per-template coordinates ``template_teff`` ... ``template_alpha``; and
        ``template_index`` (teff, logg, feh, alpha): position along ``template``, -1 for
        missing grid points. Small enough (~10-30 MB) to scatter to every worker.
    """
    config = Config() if config is None else config
    wave = np.asarray(wavelength, dtype=np.float64)
    options = _continuum_options(config)
    key = (str(grid.attrs.get("build_plan")), str(grid.attrs.get("store")),
           wave.size, float(wave[0]), float(wave[-1]), hash(wave.tobytes()), lsf.key(),
           tuple(sorted(options.items())))
    with _SETUPS_LOCK:
        if key in _SETUPS:
            _SETUPS.move_to_end(key)
            return _SETUPS[key]
    # The setup itself is cached below: keep the prepared cube in memory only through it, and
    # use the cube cache just for its Zarr copies on disk.
    cube = (prepared_templates(grid, wave, lsf, cache_dir=cache_dir, variables=("flux",))
            if cache_dir is not None else prepare_templates(grid, wave, lsf,
                                                             variables=("flux",)).load())
    stacked = cube.stack(template=PARAMS)
    exists = cube["exists"].values
    keep = np.flatnonzero(stacked["exists"].values)
    stacked = stacked.isel(template=keep)
    flux = stacked["flux"].transpose("template", "wavelength").values
    norm = flux / fit_continuum(flux, wave, **options)
    template_index = np.full(exists.shape, -1, dtype=np.int64)
    template_index[exists] = np.arange(keep.size)
    setup = xr.Dataset(
        {
            "flux": (("template", "wavelength"), flux.astype(np.float32),
                     {"units": "erg/(s cm2 Angstrom)"}),
            "norm": (("template", "wavelength"), norm.astype(np.float32)),
            "synth_mag": (("template", "band"),
                          stacked["synth_mag"].transpose("template", "band").values),
            "ext_coeff": (("template", "law", "band"),
                          stacked["ext_coeff"].transpose("template", "law", "band").values),
            "template_index": (PARAMS, template_index),
        },
        coords={
            "wavelength": ("wavelength", wave, {"units": "Angstrom", "medium": "air"}),
            "band": ("band", cube["band"].values),
            "law": ("law", cube["law"].values),
            **{p: (p, cube[p].values) for p in PARAMS},
            **{f"template_{p}": ("template", stacked[p].values) for p in PARAMS},
        },
        attrs={**{k: v for k, v in cube.attrs.items()}, "continuum": str(options)},
    )
    with _SETUPS_LOCK:
        _SETUPS[key] = setup
        while len(_SETUPS) > 4:
            _SETUPS.popitem(last=False)
    return setup


def _colour_table(setup):
    """Teff vs synthetic BP-RP and g-r of the grid's dwarfs (logg ~ 4.5, [M/H] ~ 0)."""
    t = setup["template_teff"].values
    g = setup["template_logg"].values
    m = setup["template_feh"].values
    a = setup["template_alpha"].values
    best_g = setup["logg"].values[np.argmin(np.abs(setup["logg"].values - 4.5))]
    best_m = setup["feh"].values[np.argmin(np.abs(setup["feh"].values))]
    best_a = setup["alpha"].values[np.argmin(np.abs(setup["alpha"].values))]
    sel = (g == best_g) & (m == best_m) & (a == best_a)
    if sel.sum() < 2:
        return None
    mag = setup["synth_mag"].isel(template=np.flatnonzero(sel))
    order = np.argsort(t[sel])
    table = xr.Dataset(coords={"teff": t[sel][order]})
    for name, blue, red in (("bp_rp", "gaiadr2-BP", "gaiadr2-RP"), ("g_r", "panstarrs-g",
                                                                   "panstarrs-r")):
        colour = (mag.sel(band=blue) - mag.sel(band=red)).values[order]
        table[name] = ("teff", colour)
    return table


# ----------------------------------------------------------------------------- photometry


def fit_photometry(mag_obs, mag_err, mag_model, ext_coeff, *, ebv_prior=None, ebv_prior_sigma=0.05,
                   reddening=True, ebv_max=1.0, error_floor=0.01, outlier_sigma=5.0,
                   outlier_mag=0.1, min_bands=2):
    """Flux scale and E(B-V) of model spectra from catalog photometry, vectorised over stars.

    Solves, by weighted least squares over the valid bands b,
    ``mag_obs_b = mag_model_b + mu + R_b * E`` with ``scale = 10**(-0.4 mu)``, a Gaussian
    prior ``E ~ N(ebv_prior, ebv_prior_sigma)`` and ``0 <= E <= ebv_max``; a band whose
    residual exceeds both ``outlier_sigma`` sigma and ``outlier_mag`` is dropped (the worst
    first, at most a third of the valid bands) and the fit repeated.

    Parameters
    ----------
    mag_obs, mag_err, mag_model, ext_coeff : numpy.ndarray, shape (nstar, nband)
        Catalog AB magnitudes and errors (NaN = not measured), model synthetic magnitudes and
        band extinction coefficients A_b / E(B-V).
    ebv_prior : numpy.ndarray, shape (nstar,), optional
        Prior mean of E(B-V) (NaN: no catalog value, then a prior of 0 +/- 0.1).

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
    if ebv_prior is None:
        ebv_prior = np.full(nstar, np.nan)
    prior_mean = np.where(np.isfinite(ebv_prior), ebv_prior, 0.0)
    prior_sig = np.where(np.isfinite(ebv_prior), ebv_prior_sigma, 0.1)
    prior_w = np.where(prior_sig > 0, 1.0 / np.maximum(prior_sig, 1e-12) ** 2, 0.0)
    used = valid.copy()
    dropped = np.zeros_like(valid)
    for _ in range(nband):
        w = np.where(used, 1.0 / sigma2, 0.0)
        r_ = np.where(used, ext_coeff, 0.0)
        d_ = np.where(used, d, 0.0)
        s0, s1, s2 = w.sum(1), (w * r_).sum(1), (w * r_**2).sum(1)
        b0, b1 = (w * d_).sum(1), (w * r_ * d_).sum(1)
        if reddening:
            a11 = s2 + prior_w
            det = s0 * a11 - s1**2
            with np.errstate(divide="ignore", invalid="ignore"):
                ebv = (s0 * (b1 + prior_w * prior_mean) - s1 * b0) / det
            ebv = np.clip(np.nan_to_num(ebv), 0.0, ebv_max)
        else:
            ebv = np.zeros(nstar)
            a11 = det = np.full(nstar, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = (b0 - s1 * ebv) / s0
        resid = np.where(used, d - mu[:, None] - ext_coeff * ebv[:, None], np.nan)
        bad = (used & (np.abs(resid) > outlier_sigma * np.sqrt(sigma2))
               & (np.abs(resid) > outlier_mag))
        # Drop a few outlier bands at most: photometry that disagrees in many bands is the
        # wrong star or the wrong model, and must show in the rms, not be pruned away.
        can_drop = (used.sum(1) > min_bands) & (dropped.sum(1) < np.maximum(1, valid.sum(1) // 3))
        worst = np.nanargmax(np.where(bad, np.abs(resid), -np.inf), axis=1)
        drop = bad.any(1) & can_drop
        if not drop.any():
            break
        used[np.flatnonzero(drop), worst[drop]] = False
        dropped[np.flatnonzero(drop), worst[drop]] = True
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = np.nansum(np.where(used, resid**2 / sigma2, 0.0), axis=1)
        if reddening:
            chi2 = chi2 + prior_w * (ebv - prior_mean) ** 2
            # Covariance of (mu, E): the inverse of the 2x2 normal matrix.
            mu_err = np.sqrt(a11 / det)
            ebv_err = np.sqrt(s0 / det)
        else:
            mu_err = np.sqrt(1.0 / s0)
            ebv_err = np.full(nstar, np.nan)
        n_bands = used.sum(1)
        rms = np.sqrt(np.sum(np.where(used, resid, 0.0) ** 2, axis=1) / n_bands)
    return {"mu": mu, "mu_err": mu_err, "ebv": ebv, "ebv_err": ebv_err, "resid": resid,
            "used": used, "dropped": dropped, "n_bands": n_bands, "rms": rms, "chi2": chi2}


# ----------------------------------------------------------------------------- the fit


def _is_setup(obj):
    return isinstance(obj, xr.Dataset) and "norm" in obj and "template_index" in obj


def fit_standards(exposure, catalog, grid, config=None, *, cache_dir=None):
    """Fit every standard star of an exposure and form its calibration vector.

    Parameters
    ----------
    exposure : xarray.Dataset
        From :func:`kspec_fluxcal.open_exposure`.
    catalog : xarray.Dataset
        From :func:`kspec_fluxcal.read_catalog`.
    grid : xarray.Dataset
        The opened template grid (prepared for the exposure's setup through the cache), or a
        setup from :func:`prepare_setup`.
    config : Config, optional
        Options (default: ``configs/default.toml``'s values).
    cache_dir : path-like, optional
        Zarr cache of prepared cubes.

    Returns
    -------
    xarray.Dataset
        Dims (star, wavelength, band): ``cal``, ``cal_variance``, ``cal_mask``,
        ``model_flux`` (the scaled, reddened model at Earth), ``obs_norm`` and ``model_norm``
        (normalised spectra compared), ``match_mask``, ``mag_obs``, ``mag_model``,
        ``phot_resid``, ``band_used``; per-star coordinates fiber, objid, teff, logg, feh,
        alpha (+ ``_err``), teff_colour, ebv, ebv_err, ebv_catalog, rv, rv_err, scale,
        scale_err, chi2_dof, phot_rms, snr, good_fraction, n_bands, dropped_bands and
        status ('ok' or the reason for rejection). Lazy when the exposure is Dask-backed.
    """
    config = Config() if config is None else config
    lsf = exposure_lsf(exposure, config)
    setup = grid if _is_setup(grid) else prepare_setup(
        grid, exposure["wavelength"].values, lsf, config, cache_dir=cache_dir)
    if not np.array_equal(setup["wavelength"].values, exposure["wavelength"].values):
        raise ValueError("the prepared setup's wavelengths differ from the exposure's; "
                         "prepare it with prepare_setup(grid, exposure.wavelength, ...)")
    bands = [b for b in config.photometry.bands if b in catalog["band"].values]
    matched = match_standards(exposure, catalog.sel(band=bands))
    std = exposure.isel(fiber=matched["fiber"].values)[["flux", "variance", "good"]]
    kwargs = {"matched": matched, "setup": setup, "lsf": lsf, "config": config}
    if not matched.sizes["star"]:
        return _output_template(std, matched, lazy=False)
    if std["flux"].chunks is None:
        return _fit(std, **kwargs)
    template = _output_template(std, matched)
    std = std.chunk({"fiber": -1, "wavelength": -1})
    return xr.map_blocks(_fit, std, kwargs=kwargs, template=template)


_STAR_VARS = {  # name: (dtype, units)
    "teff": (np.float64, "K"), "teff_err": (np.float64, "K"), "logg": (np.float64, "dex"),
    "logg_err": (np.float64, "dex"), "feh": (np.float64, "dex"), "feh_err": (np.float64, "dex"),
    "alpha": (np.float64, "dex"), "teff_colour": (np.float64, "K"), "ebv": (np.float64, "mag"),
    "ebv_err": (np.float64, "mag"), "ebv_catalog": (np.float64, "mag"),
    "rv": (np.float64, "km/s"), "rv_err": (np.float64, "km/s"), "scale": (np.float64, "1"),
    "scale_err": (np.float64, "1"), "chi2_dof": (np.float64, "1"), "phot_rms": (np.float64, "mag"),
    "snr": (np.float64, "1"), "good_fraction": (np.float64, "1"), "n_bands": (np.int64, "1"),
    "dropped_bands": (object, ""), "status": (object, ""),
}


def _output_template(std, matched, lazy=True):
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
                  wavelength=std["wavelength"].variable, band=("band", bands))
    return xr.Dataset(data, coords=coords)


def _fit(std, matched, setup, lsf, config):
    """The fit on in-memory arrays (one exposure's standards)."""
    fit = config.fit
    phot = config.photometry
    wave = std["wavelength"].values
    nstar = std.sizes["fiber"]
    flux = std["flux"].values.astype(np.float64)
    var = std["variance"].values.astype(np.float64)
    good = std["good"].values
    bands = list(matched["band"].values)

    telluric_good = region_mask(wave, config.masks.telluric)
    extra_good = np.ones(wave.size, bool)
    for extra in config.masks.extra:
        extra_good &= region_mask(wave, extra)
    match_mask = good & telluric_good & extra_good & (flux > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr_pix = np.where(good, flux / np.sqrt(var), np.nan)
    snr = np.nanmedian(np.where(good, snr_pix, np.nan), axis=1) if nstar else np.zeros(0)
    good_fraction = good.mean(axis=1) if nstar else np.zeros(0)

    # 3. Continuum normalisation of the observed spectra.
    cont = fit_continuum(flux, wave, match_mask, **_continuum_options(config))
    with np.errstate(invalid="ignore", divide="ignore"):
        obs_norm = flux / cont
        obs_ivar = np.where(match_mask & np.isfinite(obs_norm), cont**2 / var, 0.0)

    # 1. Teff from colours, dereddened with the catalog's extinction.
    a_gaia, a_g = matched["a_gaia"].values, matched["a_g"].values
    ebv_catalog = np.where(np.isfinite(a_gaia), a_gaia / A_GAIA_G_PER_EBV, a_g / A_PS1_G_PER_EBV)
    table = _colour_table(setup)
    est = teff_from_color(matched["mag"], ebv=xr.DataArray(np.nan_to_num(ebv_catalog), dims="star"),
                          table=table, window=fit.teff_window)
    teff_colour = est["teff"].values
    t_templates = setup["template_teff"].values
    lo = np.where(np.isfinite(teff_colour), est["teff_min"].values, -np.inf)
    hi = np.where(np.isfinite(teff_colour), est["teff_max"].values, np.inf)
    in_window = (t_templates[None, :] >= lo[:, None]) & (t_templates[None, :] <= hi[:, None])
    # A window between grid points still needs candidates: take the nearest Teff values.
    empty = ~in_window.any(axis=1)
    if empty.any():
        nearest = np.abs(t_templates[None, :] - teff_colour[:, None])
        in_window[empty] = nearest[empty] <= np.nanmin(nearest[empty], axis=1, keepdims=True) + 1
        in_window[empty & ~np.isfinite(teff_colour)] = True

    # 2. Radial velocity against a template near the colour Teff.
    norm_t = setup["norm"].values
    knots = fit.correction_knots or None
    ref = _reference_templates(setup, teff_colour)
    rv0, _ = cross_correlate_rv(obs_norm, obs_ivar, norm_t[ref], wave, rv_max=fit.rv_max)

    # 4-5. Scores of every template; velocity refined on the best; scores again; parameters.
    candidates = np.flatnonzero(in_window.any(axis=0))  # only what some star's window holds

    def corrections(template_index, rv):
        """Per star, the smooth correction of one of its templates (see star_correction)."""
        if not knots:
            return None
        return np.stack([star_correction(obs_norm[s], obs_ivar[s], norm_t[template_index[s]],
                                         rv[s], wave, knots) for s in range(nstar)])

    def scores_at(rv, correction):
        s = np.full(in_window.shape, np.nan)
        s[:, candidates] = score_templates(
            xr.DataArray(obs_norm, dims=("star", "wavelength")),
            xr.DataArray(obs_ivar, dims=("star", "wavelength")),
            xr.DataArray(norm_t[candidates], dims=("template", "wavelength")),
            xr.DataArray(rv, dims="star"), metric=fit.metric, huber_delta=fit.huber_delta,
            correction=None if correction is None else xr.DataArray(
                correction, dims=("star", "wavelength")),
        ).values
        return np.where(in_window, s, np.nan)

    scores = scores_at(rv0, corrections(ref, rv0))
    usable = np.isfinite(scores).any(axis=1)
    best = np.where(usable, np.nanargmin(np.where(np.isfinite(scores), scores, np.inf), axis=1), 0)
    rv, rv_err = refine_rv(obs_norm, obs_ivar, norm_t[best], wave, rv0, knot_spacing=knots)
    rv = np.where(usable, rv, rv0)
    spec = scores_at(rv, corrections(best, rv))

    # The spectrum alone leaves Teff, log g and [M/H] partly degenerate (stronger lines from a
    # cooler or a more metal-rich star); the photometry of the scaled, reddened model breaks
    # the tie. Spectral chi^2 is divided by the best chi^2/dof so that template mismatch
    # does not outweigh the photometry.
    mag_obs, mag_err = matched["mag"].values, matched["mag_err"].values
    maggies_t = 10.0 ** (-0.4 * setup["synth_mag"].sel(band=bands).values)  # (T, B)
    ext_t = setup["ext_coeff"].sel(law=fit.extinction_law, band=bands).values
    phot_options = {"ebv_prior_sigma": fit.ebv_prior_sigma, "reddening": fit.reddening,
                    "ebv_max": fit.ebv_max, "error_floor": phot.error_floor,
                    "outlier_sigma": phot.outlier_sigma, "outlier_mag": phot.outlier_mag,
                    "min_bands": phot.min_bands}

    def phot_chi2(star, maggies, ext):
        """Photometric chi^2 of models with (K, B) maggies and extinction coefficients."""
        with np.errstate(divide="ignore", invalid="ignore"):
            mags = np.where(maggies > 0, -2.5 * np.log10(maggies), np.nan)
        k = mags.shape[0]
        res = fit_photometry(np.broadcast_to(mag_obs[star], mags.shape),
                             np.broadcast_to(mag_err[star], mags.shape), mags, ext,
                             ebv_prior=np.full(k, ebv_catalog[star]), **phot_options)
        return np.where(res["n_bands"] >= phot.min_bands, res["chi2"], 0.0)

    nfree = _n_correction(wave, knots)
    npix = (obs_ivar > 0).sum(axis=1)
    spec_scale = np.maximum(np.nanmin(np.where(np.isfinite(spec), spec, np.inf), axis=1)
                            / np.maximum(npix - nfree, 1), 1.0)
    scores = spec / spec_scale[:, None]
    if fit.use_photometry:
        scores = scores + np.stack([phot_chi2(s, maggies_t, ext_t) for s in range(nstar)])
    best = np.where(usable, np.nanargmin(np.where(np.isfinite(scores), scores, np.inf), axis=1), 0)

    params = {p: setup[f"template_{p}"].values[best] for p in PARAMS}
    errors = {p: np.full(nstar, np.nan) for p in PARAMS[:3]}
    axes = {p: setup[p].values for p in PARAMS}
    if fit.refine and usable.any():
        # Refine from the best few grid points, not only the best one: between nodes the
        # scores are not convex, and the best node can sit in the wrong valley.
        ok = np.flatnonzero(usable)
        nstart = min(fit.refine_starts, scores.shape[1])
        starts = _distinct_starts(setup, scores[ok], nstart)  # (n_ok, nstart) templates
        star_of = np.repeat(ok, nstart)
        safe_maggies = np.nan_to_num(maggies_t)
        safe_weighted = np.nan_to_num(maggies_t * ext_t)

        def extra(row, weights):
            maggies = np.asarray(weights @ safe_maggies)
            with np.errstate(divide="ignore", invalid="ignore"):
                ext = np.asarray(weights @ safe_weighted) / maggies
            return phot_chi2(star_of[row], maggies, ext)

        start_corr = None
        if knots:  # each start's own correction, so that valleys compete fairly
            start_corr = np.stack([star_correction(obs_norm[s], obs_ivar[s], norm_t[t], rv[s],
                                                   wave, knots)
                                   for s, t in zip(star_of, starts.ravel(), strict=True)])
        refined, refined_err, final = refine_parameters(
            obs_norm[star_of], obs_ivar[star_of], norm_t, setup["template_index"].values, axes,
            {p: setup[f"template_{p}"].values[starts.ravel()] for p in PARAMS}, rv[star_of],
            wave, metric=fit.metric, delta=fit.huber_delta, correction=start_corr,
            spec_scale=spec_scale[star_of], extra_score=extra if fit.use_photometry else None)
        pick = np.nanargmin(np.where(np.isfinite(final), final, np.inf).reshape(ok.size, nstart),
                            axis=1)
        rows = np.arange(ok.size) * nstart + pick
        params["alpha"] = params["alpha"].astype(float)
        params["alpha"][ok] = setup["template_alpha"].values[starts.ravel()[rows]]
        for p in PARAMS[:3]:
            params[p] = params[p].astype(float)
            params[p][ok] = refined[p][rows]
            errors[p][ok] = refined_err[p][rows]

    # 6-7. Model at the refined parameters; reddening and scale from photometry.
    exists = setup["template_index"].values >= 0
    index, weight = interpolation_weights(axes, exists, params["teff"], params["logg"],
                                          params["feh"], params["alpha"])
    tpos = setup["template_index"].values[tuple(index[..., k] for k in range(4))]  # (S, 8)
    weight = np.nan_to_num(weight)
    model = np.einsum("sc,scp->sp", weight, setup["flux"].values[tpos].astype(np.float64))
    model_n = np.einsum("sc,scp->sp", weight, norm_t[tpos].astype(np.float64))
    if usable.any():  # the velocity once more, against the final model
        ok = np.flatnonzero(usable)
        rv[ok], rv_err[ok] = refine_rv(obs_norm[ok], obs_ivar[ok], model_n[ok], wave, rv[ok],
                                       knot_spacing=knots)
    chi2_dof = _chi2_dof(obs_norm, obs_ivar, model_n, wave, rv, knots)
    maggies_c = 10.0 ** (-0.4 * setup["synth_mag"].sel(band=bands).values[tpos])  # (S, 8, B)
    maggies = np.einsum("sc,scb->sb", weight, np.nan_to_num(maggies_c))
    law = setup["ext_coeff"].sel(law=fit.extinction_law, band=bands).values[tpos]
    ext = np.einsum("sc,scb->sb", weight, np.nan_to_num(maggies_c * law)) / np.where(
        maggies > 0, maggies, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag_model = np.where(maggies > 0, -2.5 * np.log10(maggies), np.nan)
    pf = fit_photometry(mag_obs, matched["mag_err"].values, mag_model, ext,
                        ebv_prior=ebv_catalog, ebv_prior_sigma=fit.ebv_prior_sigma,
                        reddening=fit.reddening, ebv_max=fit.ebv_max,
                        error_floor=phot.error_floor, outlier_sigma=phot.outlier_sigma,
                        outlier_mag=phot.outlier_mag, min_bands=phot.min_bands)
    scale = 10.0 ** (-0.4 * pf["mu"])
    scale_err = scale * _LN10_04 * pf["mu_err"]

    # 8. Calibration vector.
    model_obs = np.stack([shift_spectra(model[s], wave, rv[s]) for s in range(nstar)]) if nstar \
        else np.zeros((0, wave.size))
    # The normalised model as compared with the star: shifted, with its smooth correction.
    model_nobs = np.zeros((nstar, wave.size))
    for s in range(nstar):  # a few stars
        shifted = shift_spectra(model_n[s], wave, rv[s])
        w = np.where(np.isfinite(shifted), obs_ivar[s], 0.0)
        model_nobs[s] = fit_corrected(np.nan_to_num(obs_norm[s]), w, np.nan_to_num(shifted)[None],
                                      wave, knots)[0]
        model_nobs[s][~np.isfinite(shifted)] = np.nan
    a_lambda = extinction_per_ebv(wave, fit.extinction_law)
    model_flux = (scale[:, None] * model_obs * 10.0 ** (-0.4 * pf["ebv"][:, None] * a_lambda)
                  / FLUX_UNIT_SCALE)
    fwhm = lsf.fwhm(wave)
    line_good = region_mask(wave, load_regions(config.masks.lines), pad=0.5 * fwhm)
    with np.errstate(invalid="ignore", divide="ignore"):
        cal = model_flux / flux
        rel_scale = np.nan_to_num(scale_err / scale)
        cal_var = cal**2 * (var / flux**2 + rel_scale[:, None] ** 2)
    cal_ok = good & (flux > 0) & np.isfinite(cal) & np.isfinite(model_flux)
    cal_mask = cal_ok & line_good & extra_good
    cal = np.where(cal_ok, cal, np.nan)
    cal_var = np.where(cal_ok, cal_var, np.nan)
    expid = str(std.attrs.get("expid", ""))

    status = _status(matched, pf, snr, usable, chi2_dof, config, params["teff"], teff_colour,
                     (setup["teff"].values[0], setup["teff"].values[-1]))
    dropped = [",".join(np.asarray(bands)[row]) for row in pf["dropped"]]
    coords = {
        "fiber": ("star", matched["fiber"].values),
        "objid": ("star", matched["objid"].values),
        "fiber_name": ("star", matched["fiber_name"].values),
        **{p: ("star", np.asarray(params[p], dtype=np.float64)) for p in PARAMS},
        **{f"{p}_err": ("star", errors[p]) for p in PARAMS[:3]},
        "teff_colour": ("star", teff_colour), "ebv": ("star", pf["ebv"]),
        "ebv_err": ("star", pf["ebv_err"]), "ebv_catalog": ("star", ebv_catalog),
        "rv": ("star", rv), "rv_err": ("star", rv_err), "scale": ("star", scale),
        "scale_err": ("star", scale_err), "chi2_dof": ("star", chi2_dof),
        "phot_rms": ("star", pf["rms"]), "snr": ("star", snr),
        "good_fraction": ("star", good_fraction),
        "n_bands": ("star", pf["n_bands"].astype(np.int64)),
        "dropped_bands": ("star", np.array(dropped, dtype=object)),
        "status": ("star", np.array(status, dtype=object)),
        "wavelength": ("wavelength", wave, {"units": "Angstrom", "medium": "air"}),
        "band": ("band", np.asarray(bands)),
    }
    ds = xr.Dataset(
        {
            "cal": (("star", "wavelength"), cal, {"units": CAL_UNIT}),
            "cal_variance": (("star", "wavelength"), cal_var, {"units": f"({CAL_UNIT})**2"}),
            "cal_mask": (("star", "wavelength"), cal_mask,
                         {"description": "True = reliable (not a bad pixel or line core)"}),
            "model_flux": (("star", "wavelength"), model_flux, {"units": FLUX_UNIT}),
            "obs_norm": (("star", "wavelength"), obs_norm),
            "model_norm": (("star", "wavelength"), model_nobs),
            "match_mask": (("star", "wavelength"), obs_ivar > 0,
                           {"description": "pixels used for template matching"}),
            "mag_obs": (("star", "band"), mag_obs, {"units": "mag", "system": "AB"}),
            "mag_err": (("star", "band"), matched["mag_err"].values, {"units": "mag"}),
            "mag_model": (("star", "band"), mag_model - 2.5 * np.log10(scale)[:, None]
                          + ext * pf["ebv"][:, None], {"units": "mag", "system": "AB"}),
            "phot_resid": (("star", "band"), pf["resid"], {"units": "mag",
                                                           "description": "catalog - model"}),
            "band_used": (("star", "band"), pf["used"]),
        },
        coords=coords,
        attrs={"expid": expid, "metric": fit.metric, "extinction_law": fit.extinction_law,
               "grid": str(setup.attrs.get("source_directory", "")),
               "grid_synthetic": int(setup.attrs.get("synthetic", 0)),
               "lsf_fwhm_coeffs": list(lsf.coeffs)},
    )
    for name, (_, units) in _STAR_VARS.items():
        if units:
            ds[name].attrs["units"] = units
    return ds


def _reference_templates(setup, teff):
    """Per star, the template nearest (teff, logg 4.5, [M/H] 0, alpha 0); median Teff if NaN."""
    t = setup["template_teff"].values
    g = setup["template_logg"].values
    m = setup["template_feh"].values
    a = setup["template_alpha"].values
    target = np.where(np.isfinite(teff), teff, np.median(t))
    dist = (((t[None, :] - target[:, None]) / 250.0) ** 2 + ((g - 4.5) / 0.5) ** 2
            + (m / 0.25) ** 2 + (a / 0.25) ** 2)
    return np.argmin(dist, axis=1)


def _distinct_starts(setup, scores, n):
    """Per star, ``n`` good templates, spread over [alpha/M] values and grid valleys.

    For each [alpha/M] of the grid, candidates are taken in order of score and kept only when
    they differ from every kept one by two or more steps in Teff, log g or [M/H]. Spreading
    matters: at grid points an alpha-enhanced metal-poor model can mimic a solar one, and the
    refinement (which keeps [alpha/M]) must also start in the other valley. Short lists are
    padded with the best template.
    """
    index = np.stack([np.searchsorted(setup[p].values, setup[f"template_{p}"].values)
                      for p in PARAMS[:3]], axis=1)  # (T, 3) grid indices
    alphas = setup["template_alpha"].values
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


def _n_correction(wave, knot_spacing):
    """Free parameters of the smooth multiplicative correction fitted with each template."""
    from .continuum import spline_basis

    return spline_basis(wave, knot_spacing)[0].shape[1] if knot_spacing else 1


def _chi2_dof(obs, ivar, models, wave, rv, knot_spacing):
    """chi^2/dof of each star against its final (interpolated) model, as scored."""
    nfree = _n_correction(wave, knot_spacing)
    npix = (ivar > 0).sum(axis=1)
    chi2 = np.array([score_star(obs[s], ivar[s], models[s][None], rv[s], wave, "chi2",
                                knot_spacing=knot_spacing or None)[0]
                     for s in range(obs.shape[0])])  # a few stars
    return chi2 / np.maximum(npix - nfree, 1)


def _status(matched, pf, snr, usable, chi2_dof, config, teff, teff_colour, teff_range):
    # A fit pinned at the grid's Teff edge while the colours say the star lies beyond it is
    # extrapolation: the vector's slope would be wrong by the missing temperature.
    lo, hi = teff_range
    window = config.fit.teff_window / 3
    edge = (((teff <= lo + 1) & (teff_colour < lo - window))
            | ((teff >= hi - 1) & (teff_colour > hi + window)))
    out = []
    for s in range(len(snr)):
        if matched["match"].values[s] == "none":
            out.append("no catalog match")
        elif pf["n_bands"][s] < config.photometry.min_bands:
            out.append(f"fewer than {config.photometry.min_bands} valid bands "
                       f"({int(pf['n_bands'][s])})")
        elif not np.isfinite(snr[s]):
            out.append("no valid pixel")
        elif not snr[s] >= config.fit.min_snr:
            out.append(f"S/N {snr[s]:.1f} < {config.fit.min_snr:g}")
        elif not usable[s]:
            out.append("no usable template")
        elif not chi2_dof[s] <= config.fit.max_chi2_dof:
            out.append(f"chi2/dof {chi2_dof[s]:.2f} > {config.fit.max_chi2_dof:g}")
        elif not pf["rms"][s] <= config.photometry.max_rms:
            out.append(f"photometric rms {pf['rms'][s]:.3f} > {config.photometry.max_rms:g} mag")
        elif edge[s]:
            out.append(f"outside the grid: colour Teff {teff_colour[s]:.0f} K, fit pinned at "
                       f"the grid's edge ({teff[s]:.0f} K)")
        else:
            out.append("ok")
    return out
