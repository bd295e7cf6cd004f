"""The standards against the library (steps 3-4 and 6 of :mod:`kspec_fluxcal.fit.standards`):
velocities by cross-correlation, every candidate template scored, the velocity refined on the
best; and the width of the line spread the stars show."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import xarray as xr

from ..templates import library_spectra
from .exposure_templates import interpolated_corners, reference_templates
from .matching import correction_parameters, score_star, score_templates, star_correction
from .velocity import cross_correlate_rv, refine_rv

__all__ = ["initial_rv", "scan_templates", "fit_lsf_scale"]

#: Trial widths of the line spread, relative to the current one (step 6).
_LSF_TRIALS = np.array([0.9, 1.0, 1.1])


def initial_rv(obs, prior, tm, config):
    """Velocities (S,) km/s by cross-correlation against a template near each star's colour
    Teff (step 3): takes the observed standards, the priors, the exposure's templates ``tm``
    (:class:`~kspec_fluxcal.fit.exposure_templates.ExposureTemplates`) and the config (rv_max)."""
    ref = reference_templates(tm.library, prior.teff_colour)
    rv, _ = cross_correlate_rv(obs.norm, obs.ivar, tm.fetch(ref), obs.wave,
                               rv_max=config.fit.rv_max, star_wavelength=obs.star_wave)
    return rv


def scan_templates(obs, tm, prior, rv0, config):
    """Spectral scores of every candidate, velocities refined on the best (step 4).

    Each star is scored in the fast mode: divided by the smooth correction of one template
    (its reference, then its best), every template with a single amplitude. Takes the
    observed standards, the exposure's templates, the priors (windows), the initial
    velocities ``rv0`` (S,) and the config. Returns a namespace: ``spec`` (S, T_library)
    scores (NaN outside the windows), ``best`` (S,) template, ``rv``, ``rv_err``, ``usable``
    (a star with any score), ``dof`` and ``chi2_dof_best`` of the best, ``knots`` (the
    correction's knot spacing or None).
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

    ref = reference_templates(tm.library, prior.teff_colour)
    spec = scores_at(ref, rv0)
    usable = np.isfinite(spec).any(axis=1)
    best = np.where(usable, np.nanargmin(np.where(np.isfinite(spec), spec, np.inf), axis=1), 0)
    rv, rv_err = refine_rv(obs.norm, obs.ivar, tm.fetch(best), obs.wave, rv0,
                           knot_spacing=knots, star_wavelength=obs.star_wave)
    rv = np.where(usable, rv, rv0)
    spec = scores_at(best, rv)
    best = np.where(usable, np.nanargmin(np.where(np.isfinite(spec), spec, np.inf), axis=1), 0)
    npix = (obs.ivar > 0).sum(axis=1)
    dof = np.maximum(npix - correction_parameters(obs.wave, knots), 1)
    chi2_dof_best = np.nanmin(np.where(np.isfinite(spec), spec, np.inf), axis=1) / dof
    return SimpleNamespace(spec=spec, best=best, rv=rv, rv_err=rv_err, usable=usable, dof=dof,
                           chi2_dof_best=chi2_dof_best, knots=knots)


def fit_lsf_scale(obs, tm, scan, params):
    """The stars' line-spread width relative to ``tm.lsf`` (step 6): per star a parabola
    through the chi^2 of its refined model at trial widths; pooled (inverse-variance) over
    the stars.

    The refined (interpolated) model matters: a neighbouring grid point's lines differ in
    depth, which a width change partly mimics. Takes the observed standards, the exposure's
    templates, the scan and the chosen ``params`` (dict of (S,) arrays). Returns a namespace:
    ``scale`` and ``err`` (pooled; 1 and NaN without a usable star), ``star`` and
    ``star_err`` (S,)."""
    corners, weight = interpolated_corners(tm.library, params)
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
