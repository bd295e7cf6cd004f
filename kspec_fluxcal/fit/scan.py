"""The standards against the library (steps 3-4 of :mod:`kspec_fluxcal.fit.standards`):
velocities by cross-correlation, every candidate template scored, the velocity refined on the
best."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import xarray as xr

from .exposure_templates import reference_templates
from .matching import (
    ScoringTemplates,
    correction_parameters,
    rest_frame_stars,
    sampled_rest_frames,
    score_rest_frames,
    score_templates,
    stars_corrections,
)
from .velocity import cross_correlate_rv, refine_rv

__all__ = ["initial_rv", "scan_templates"]

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
    fast = knots and fit.metric == "chi2"
    # The fast mode's scores take the templates as kept (float32) and sum them in float64.
    prepared = ScoringTemplates(tm.stored(cand)) if fast else None
    wanted = prior.window[:, cand]  # the scores kept: each star's window
    norm_c = None if fast else tm.fetch(cand)

    def scores_at(template_ids, rv, once=False):
        out = np.full(prior.window.shape, np.nan)
        if prepared is not None and once:
            # The first velocities serve this pass alone: the stars' shifts sampled, no
            # operators made (and kept) for them.
            out[:, cand] = score_rest_frames(sampled_rest_frames(
                obs.norm, obs.ivar, tm.fetch(template_ids), rv, obs.wave, knots,
                obs.star_wave), prepared, wanted)
            return np.where(prior.window, out, np.nan)
        corr = None
        if knots:  # the stars' templates fetched and their corrections fitted at once
            corr = stars_corrections(obs.norm, obs.ivar, tm.fetch(template_ids)[:, None], rv,
                                     obs.wave, knots, obs.star_wave)
        if prepared is not None:  # score_templates' fast mode, the candidates prepared once
            out[:, cand] = score_rest_frames(rest_frame_stars(
                obs.norm, obs.ivar, rv, obs.wave, corr, obs.star_wave), prepared, wanted)
            return np.where(prior.window, out, np.nan)
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
    spec = scores_at(ref, rv0, once=True)
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
