"""Standard-star fitting: template, radial velocity, line spread, reddening and flux scale of
every standard star (TYPE 'C') of an exposure, and its calibration vector
Cal_star(lambda) = F_model(lambda) / counts(lambda).

:func:`fit_standards` matches the standards to the catalog and runs :func:`_fit` on their
arrays (per block with Dask); :func:`_fit` composes the named steps, each on plain arrays, in
the order they run:

1. :func:`~kspec_fluxcal.fit.inputs.observed_standards` -- the standards on their own pixels,
   continuum-normalised (tellurics, bad and non-positive pixels masked), their S/N.
2. :func:`~kspec_fluxcal.fit.inputs.catalog_priors` -- Teff window from the Gaia BP-RP colour
   (else PS1 g-r) dereddened with the catalog's extinction and read off the templates' own
   synthetic colours; the catalog's E(B-V); the parallax.
3. :func:`~kspec_fluxcal.fit.scan.initial_rv` -- velocity by cross-correlation against a
   template near that Teff.
4. :func:`~kspec_fluxcal.fit.scan.scan_templates` -- every template of the windows scored
   in one vectorised pass (chi^2 or Huber, float64, each with a smooth multiplicative
   correction), the velocity refined on the best and the templates scored again.
5. :func:`~kspec_fluxcal.fit.line_spread.choose_with_line_spread`, first
   :func:`~kspec_fluxcal.fit.parameter_choice.choose_parameters` -- spectral scores (per effective
   degree of freedom) plus the photometric chi^2 of each scaled, reddened model
   (:class:`~kspec_fluxcal.fit.model_photometry.PhotometricScore`: E(B-V) with the catalog's as a
   prior, a log g prior from the parallax): the choice of grid points, then lattice refinement
   between grid points from several starts, then [alpha/M] between its nodes.
6. :func:`~kspec_fluxcal.fit.line_spread.fit_lsf_scale` -- the width of the line spread the
   stars show, relative to the header's (FWHMPCk measured on arcs differ from the stars' by
   pixel response, focus drift, the library's own resolution): a chi^2 parabola in the width
   of the refined models, pooled over the stars; templates re-prepared at that width and the
   refinement (step 5) restarted where it ended.
7. :func:`~kspec_fluxcal.fit.final_model.final_model` -- the interpolated model, its velocity once
   more, its photometric scale, E(B-V) and warp (with Gaia XP where given), and the model
   error: the fractional mismatch per pixel that makes chi^2/dof = 1 (every real grid is 1-3 %
   from real stars).
8. :func:`~kspec_fluxcal.fit.acceptance.star_vectors` -- Cal_star with variance (photon noise,
   model error, scale error) and a mask (bad pixels and strong-line cores; telluric bands are
   kept: every fiber shares the atmosphere); the throughput it implies.
9. :func:`~kspec_fluxcal.fit.acceptance.acceptance` -- a star is rejected only for what makes it
   wrong for calibration; template mismatch is a quality figure, not a reason.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from .._datasets import dataset, index_coordinate, string_variables
from .._inputs import expect_dataset
from ..catalog import match_standards
from ..config import Config
from ..constants import CAL_UNIT, FLUX_UNIT, PIXEL_OUTLIER_PASSES, PIXEL_OUTLIER_SIGMA
from ..exposure.wavelengths import bridged_wavelengths
from ..grid import PARAMS
from ..lsf import exposure_lsf
from ..xp import standards_xp
from .acceptance import acceptance, implied_throughput, star_flags, star_vectors
from .exposure_templates import ExposureTemplates, template_library
from .final_model import final_model, outlier_pixels
from .inputs import catalog_priors, implausible_variance, observed_standards, spike_pixels
from .line_spread import choose_with_line_spread
from .model_photometry import PhotometricScore
from .scan import initial_rv, scan_templates

__all__ = ["fit_standards"]

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
        scale_err, chi2_dof, model_error, line_error, lsf_scale (+ ``_err``), logg_parallax
        (+ ``_err``), throughput (implied peak), phot_rms, snr, good_fraction, n_bands,
        dropped_bands, flags, status ('ok' or the reason for rejection), and the XP results
        ``xp_used``, ``xp_ratio`` (median XP / model before the warp), ``xp_rms`` (XP about
        the final model, its median level removed), ``xp_match`` ('source_id', 'position',
        'none'). With ``xp``, also ``xp_flux``, ``xp_flux_error``, ``xp_model`` (before the
        warp) and ``xp_model_warped`` (final) at XP's resolution, dims (star,
        xp_wavelength; air Angstrom), in FLUX_UNIT. Attr ``lsf_scale``: the width correction
        applied (pooled over the stars). With a Dask-backed exposure, its standards' fibers
        (a few of its rows) are read when they are fitted: the result is in memory, with the
        exposure-level results in its attrs (the fitted width and the line spread it gives,
        which :func:`kspec_fluxcal.combine_vectors` and the products use), which a lazy
        result could not carry; the exposure itself stays lazy.
    """
    expect_dataset(exposure, "exposure", "fit_standards", "kspec_fluxcal.open_exposure",
                   ("flux", "variance", "good", "fiber_type"))
    expect_dataset(catalog, "catalog", "fit_standards", "kspec_fluxcal.read_catalog",
                   ("mag", "band", "objid"))
    config = Config() if config is None else config
    lsf = exposure_lsf(exposure, config)
    library = template_library(grid, exposure, config, cache_dir=cache_dir)
    have = catalog.variables["band"].values  # one lookup, not one per configured band
    bands = [b for b in config.photometry.bands if b in have]
    # The bands chosen from the matched rows, not from the catalog: the catalog's look-up
    # index is kept per catalog object (a selected copy was a new one for every exposure,
    # its index built again), and a catalog with these bands in this order needs no selection.
    matched = match_standards(exposure, catalog)
    if not np.array_equal(have, bands):
        matched = matched.sel(band=bands)
    xp = standards_xp(matched, xp)
    std = _standard_rows(exposure, matched.variables["fiber"].values)
    if "fiber_wavelength" in std.coords:
        # A standard's pixels without a wavelength (NaN in WAVELA: an arc solution short of
        # the detector's ends) are bad pixels; its fit shifts, convolves and interpolates on
        # every pixel and needs them finite (a NaN failed the velocity shift's operator).
        fiber_wave = std.variables["fiber_wavelength"]
        bridged = bridged_wavelengths(fiber_wave.values, std.variables["wavelength"].values)
        if bridged is not fiber_wave.values:
            std = std.assign_coords(fiber_wavelength=(fiber_wave.dims, bridged,
                                                      fiber_wave.attrs))
    kwargs = {"matched": matched, "library": library, "lsf": lsf, "config": config, "xp": xp}
    if not matched.sizes["star"]:
        return _no_standards(std, matched, xp)
    # A lazy fit (xr.map_blocks) returned its template's attrs, not the fit's: the combination
    # then had no line spread, skipped the telluric fit, and the product's keywords lied.
    return _fit(std.compute() if std.variables["flux"].chunks is not None else std, **kwargs)


def _standard_rows(exposure, fibers):
    """``exposure.isel(fiber=fibers)[["flux", "variance", "good"]]``, the same Dataset, from
    its variables (:func:`~kspec_fluxcal._datasets.dataset`; the selection's ~0.5 ms was
    mostly xarray's indexing of each variable: ~0.25 ms)."""
    indexes = dict(exposure.xindexes)
    variables = {}
    for name, var in exposure.variables.items():
        if name not in exposure.coords and name not in ("flux", "variance", "good"):
            continue
        if "fiber" in var.dims:
            axis = var.dims.index("fiber")
            var = (xr.Variable(var.dims, np.take(var.data, fibers, axis=axis), var.attrs,
                               var.encoding)
                   if isinstance(var.data, np.ndarray) else var.isel(fiber=fibers))
            if name in indexes:
                indexes[name] = indexes[name].isel({"fiber": fibers})
                var = indexes[name].create_variables({name: var})[name]
        variables[name] = var
    data = {name: variables.pop(name) for name in ("flux", "variance", "good")}
    return dataset(data, variables, exposure.attrs, indexes)


_STAR_VARS = {  # name: (dtype, units)
    "teff": (np.float64, "K"), "teff_err": (np.float64, "K"), "logg": (np.float64, "dex"),
    "logg_err": (np.float64, "dex"), "feh": (np.float64, "dex"), "feh_err": (np.float64, "dex"),
    "alpha": (np.float64, "dex"), "alpha_err": (np.float64, "dex"),
    "teff_colour": (np.float64, "K"), "ebv": (np.float64, "mag"),
    "ebv_err": (np.float64, "mag"), "ebv_catalog": (np.float64, "mag"),
    "rv": (np.float64, "km/s"), "rv_err": (np.float64, "km/s"), "scale": (np.float64, "1"),
    "scale_err": (np.float64, "1"), "chi2_dof": (np.float64, "1"),
    "model_error": (np.float64, "1"), "line_error": (np.float64, "1"),
    "warp_rms": (np.float64, "1"),
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
_STAR_ATTRS = {name: {"units": units} if units else {} for name, (_, units) in _STAR_VARS.items()}
#: Per-star XP spectra of the result (star, xp_wavelength), with ``xp``.
_XP_ARRAYS = ("xp_flux", "xp_flux_error", "xp_model", "xp_model_warped")
_XP_DESCRIPTIONS = {
    "xp_flux": "the star's Gaia XP spectrum (NaN: no sample)",
    "xp_flux_error": "its error",
    "xp_model": "the model at Earth before the warp, at XP's resolution",
    "xp_model_warped": "the final model (warp included), at XP's resolution",
}


def _no_standards(std, matched, xp=None):
    """The result of an exposure without standard-star fibers: the structure, no star."""
    nwave, bands = std.sizes["wavelength"], matched["band"].values
    data = {name: (("star", "wavelength"), np.empty((0, nwave), dtype=dtype))
            for name, dtype in (("cal", float), ("cal_variance", float), ("model_flux", float),
                                ("obs_norm", float), ("model_norm", float), ("cal_mask", bool),
                                ("match_mask", bool))}
    data.update({name: (("star", "band"), np.empty((0, bands.size), dtype=dtype))
                 for name, dtype in (("mag_obs", float), ("mag_err", float),
                                     ("mag_model", float), ("phot_resid", float),
                                     ("band_used", bool))})
    coords = {name: ("star", np.empty(0, dtype=dtype)) for name, (dtype, _) in _STAR_VARS.items()}
    coords.update(fiber=("star", matched["fiber"].values), objid=("star", matched["objid"].values),
                  fiber_name=("star", matched["fiber_name"].values),
                  wavelength=std["wavelength"].variable, band=("band", bands),
                  star_wavelength=(("star", "wavelength"), np.empty((0, nwave))),
                  fiber_lsf_scale=("star", np.empty(0)))
    if xp is not None:
        data.update({name: (("star", "xp_wavelength"), np.empty((0, xp.wave.size)))
                     for name in _XP_ARRAYS})
        coords["xp_wavelength"] = ("xp_wavelength", xp.wave)
    return dataset(data, coords, {"lsf_scale": 1.0})


def _fit(std, matched, library, lsf, config, xp=None):
    """The fit on in-memory arrays (one exposure's standards): the steps in the order they run
    (the module docstring says what each does), fitted again without the pixels its models
    cannot explain (:func:`_fit_models`). Returns the result Dataset (:func:`_result`)."""
    obs, prior, scan, phot, params, errors, lsf_fit, tm, model, masked = _fit_models(
        std, matched, library, lsf, config, xp)
    vectors = star_vectors(obs, model, config, tm.lsf)
    model.throughput = implied_throughput(obs, model, vectors, config)
    status = acceptance(obs, prior, scan, model, params, matched, library, config)
    flags = star_flags(params, library, model, config, prior)
    flags = [_outlier_flag(f, n) for f, n in zip(flags, masked.sum(axis=1), strict=True)]
    # A star without a spectrum to fit (a dead fiber, no valid pixel) has no parameters: the
    # scan's default template had it at 5250 K, 'at the grid edge, far from its colours'.
    unfit = ~scan.usable
    flags = ["" if u else f for f, u in zip(flags, unfit, strict=True)]
    params, errors = ({p: np.where(unfit, np.nan, v) for p, v in d.items()}
                      for d in (params, errors))
    return _result(std, obs, prior, lsf_fit, params, errors, model, vectors, status, flags,
                   matched, library, tm.lsf, config)


def _fit_models(std, matched, library, lsf, config, xp):
    """Steps 1-7 without the pixels brighter than the line spread allows
    (:func:`~kspec_fluxcal.fit.inputs.spike_pixels`) or of an implausibly small variance
    (:func:`~kspec_fluxcal.fit.inputs.implausible_variance`), repeated (up to PIXEL_OUTLIER_PASSES
    fits) while the final models find
    pixels they cannot explain (:func:`~kspec_fluxcal.fit.final_model.outlier_pixels`: a
    cosmic ray of 1000 times the star's counts gave it a model error of 100 % and lost it,
    one of 1.5 times bent the calibration by 1 % over 250 A): those are masked as bad pixels
    and the stars fitted again. The warnings of a superseded fit are dropped. Returns
    (obs, prior, scan, phot, params, errors, lsf_fit, tm, model, masked (S, P))."""
    masked = spike_pixels(std, lsf, PIXEL_OUTLIER_SIGMA) | implausible_variance(std)
    prior = catalog_priors(matched, library, config)  # what the catalog says: once
    phot = PhotometricScore(matched, library, prior, config)
    first = None  # the templates at the header's line spread, prepared once for all passes
    for attempt in range(PIXEL_OUTLIER_PASSES):
        std = _without(std, masked)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            obs = observed_standards(std, config)
            if first is None:
                first = ExposureTemplates(library, obs.wave, lsf, prior.candidates)
            tm = first
            rv = initial_rv(obs, prior, tm, config)
            scan = scan_templates(obs, tm, prior, rv, config)
            params, errors, lsf_fit, tm = choose_with_line_spread(obs, tm, scan, phot, prior,
                                                                  config)
            model = final_model(obs, tm, scan, params, matched, phot, config, xp)
        new = outlier_pixels(obs, model, config.fit, PIXEL_OUTLIER_SIGMA) & ~masked
        last = attempt == PIXEL_OUTLIER_PASSES - 1
        if not new.any() or last:
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                       source=w.source)
            if new.any():  # the last fit's own outliers: kept out of its vectors at least
                masked |= new
                obs.good = obs.good & ~new
            break
        masked |= new
    return obs, prior, scan, phot, params, errors, lsf_fit, tm, model, masked


def _without(std, masked):
    """The standards with the ``masked`` pixels (S, P) no longer good."""
    if not masked.any():
        return std
    # On the Variable: a DataArray aligned its coordinates with the mask's (~3 ms).
    good = std.variables["good"]
    return std.assign(good=good.copy(data=good.values & ~masked))


def _outlier_flag(flags, n):
    """A star's flags with its masked outlier pixels named."""
    if not n:
        return flags
    note = f"{int(n)} outlier pixel(s) masked (cosmic ray or bad pixel?)"
    return f"{flags}, {note}" if flags else note


# ----------------------------------------------------------------------------- result


def _result(std, obs, prior, lsf_fit, params, errors, model, vectors, status, flags, matched,
            library, lsf, config):
    """The steps' results as the Dataset :func:`fit_standards` returns (per-star coordinates,
    spectra, photometry, XP spectra, attrs)."""
    pf = model.phot
    variables = matched.variables  # arrays without a DataArray around each (~25 us apiece)
    bands = list(variables["band"].values)
    dropped = [",".join(np.asarray(bands)[row]) for row in pf["dropped"]] if obs.nstar else []
    per_star = {
        **{p: params[p] for p in PARAMS}, **{f"{p}_err": errors[p] for p in PARAMS},
        "teff_colour": prior.teff_colour, "ebv": model.ebv, "ebv_err": pf["ebv_err"],
        "ebv_catalog": prior.ebv_catalog, "rv": model.rv, "rv_err": model.rv_err,
        "scale": model.scale, "scale_err": model.scale_err, "chi2_dof": model.chi2_dof,
        "model_error": model.model_error, "line_error": model.line_error,
        "warp_rms": model.warp_rms,
        "phot_rms_spectral": model.phot_rms_spectral,
        "lsf_scale": lsf_fit.star,
        "lsf_scale_err": lsf_fit.star_err, "logg_parallax": model.logg_parallax,
        "logg_parallax_err": model.logg_parallax_err, "phot_rms": pf["rms"], "snr": obs.snr,
        "good_fraction": obs.good_fraction, "n_bands": pf["n_bands"],
        "dropped_bands": dropped,
        "flags": flags,
        "throughput": model.throughput,
        "status": status,
        "xp_used": model.xp["used"], "xp_ratio": model.xp["ratio"], "xp_rms": model.xp["rms"],
        "xp_match": model.xp["match"],
    }
    strings = string_variables("star", {name: (per_star[name], _STAR_ATTRS[name])
                                        for name, (dtype, _) in _STAR_VARS.items()
                                        if dtype is object})
    coords = {name: strings[name] if dtype is object
              else ("star", np.asarray(per_star[name], dtype=dtype), _STAR_ATTRS[name])
              for name, (dtype, _) in _STAR_VARS.items()}
    coords.update(fiber=("star", variables["fiber"].values),
                  objid=("star", variables["objid"].values),
                  fiber_name=("star", variables["fiber_name"].values),
                  wavelength=index_coordinate(std.variables["wavelength"], obs.wave,
                                              {"units": "Angstrom", "medium": "air"}),
                  star_wavelength=(("star", "wavelength"), obs.star_wave,
                                   {"units": "Angstrom", "medium": "air",
                                    "description": "each star's own pixels"}),
                  fiber_lsf_scale=("star", obs.lsf_scale),
                  band=index_coordinate(variables["band"], np.asarray(bands)))
    spectra = (("star", "wavelength"))
    xp_data = {}
    if model.xp["arrays"] is not None:
        coords["xp_wavelength"] = ("xp_wavelength", model.xp["wave"],
                                   {"units": "Angstrom", "medium": "air"})
        xp_data = {name: (("star", "xp_wavelength"), model.xp["arrays"][name],
                          {"units": FLUX_UNIT, "description": _XP_DESCRIPTIONS[name]})
                   for name in _XP_ARRAYS}
    data = {
        "cal": (spectra, vectors.cal, {"units": CAL_UNIT}),
        "cal_variance": (spectra, vectors.cal_var, {"units": f"({CAL_UNIT})**2"}),
        "cal_mask": (spectra, vectors.cal_mask,
                     {"description": "True = reliable (not a bad pixel or line core)"}),
        "model_flux": (spectra, model.model_flux, {"units": FLUX_UNIT}),
        "obs_norm": (spectra, obs.norm),
        "model_norm": (spectra, model.model_nobs),
        "match_mask": (spectra, obs.ivar > 0,
                       {"description": "pixels used for template matching"}),
        "mag_obs": (("star", "band"), variables["mag"].values, {"units": "mag",
                                                                "system": "AB"}),
        "mag_err": (("star", "band"), variables["mag_err"].values, {"units": "mag"}),
        "mag_model": (("star", "band"), model.mag_model, {"units": "mag", "system": "AB",
                                                          "description": "the model at "
                                                          "Earth, warp included"}),
        "phot_resid": (("star", "band"), pf["resid"], {"units": "mag",
                                                       "description": "catalog - model"}),
        "band_used": (("star", "band"), pf["used"]),
        **xp_data,
    }
    return dataset(data, coords, attrs={
        "expid": str(std.attrs.get("expid", "")), "metric": config.fit.metric,
        "extinction_law": config.fit.extinction_law,
        "grid": str(library.attrs.get("source_directory", "")),
        "grid_synthetic": int(library.attrs.get("synthetic", 0)),
        "lsf_fwhm_coeffs": list(lsf.coeffs), "lsf_scale": lsf_fit.scale,
        "lsf_scale_err": lsf_fit.err, "airmass": float(std.attrs.get("airmass", np.nan))})
