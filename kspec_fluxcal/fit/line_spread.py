"""The parameters the standards choose, with the width of the line spread they show (steps
5-6 of :mod:`kspec_fluxcal.fit.standards`): the choice at the header's line spread, the width
fitted with the chosen models, and the choice refined again at that width."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np

from .._nan import nan_to_num
from ..errors import FluxCalWarning
from ..templates import library_models
from .exposure_templates import ExposureTemplates, corner_combination, interpolated_corners
from .matching import score_star
from .parameter_choice import choose_parameters

__all__ = ["choose_with_line_spread", "fit_lsf_scale", "pool_lsf_scales"]

#: Trial widths of the line spread, relative to the current one (step 6).
_LSF_TRIALS = np.array([0.9, 1.0, 1.1])
#: A fitted width closer to 1 than this is not applied (the re-scan would change nothing).
_LSF_MIN_CHANGE = 0.005
#: ... and the parameters refined again only for a larger change.
_LSF_REFINE_CHANGE = 0.02
#: A star's width is fitted within +-25 % of the current one (beyond, the parabola through
#: the trials is extrapolated too far to trust).
_LSF_MAX_OFFSET = 0.25
#: A star whose chi^2 falls steadily towards one end trial by more than this (in units of
#: its chi^2/dof: 3 sigma for one parameter), without a minimum within the fitted range,
#: has a width beyond it.
_LSF_BEYOND_DCHI2 = 9.0


def choose_with_line_spread(obs, tm, scan, phot, prior, config):
    """Steps 5-6: the parameters chosen at ``tm``'s line spread, the stars' width fitted with
    those models, and, when it differs, the templates re-prepared at that width and (for a
    change beyond 2 %) the refinement restarted where it ended (a width change of a few %
    moves the parameters, not the choice of valley; below 2 % the accuracy benchmark's
    figures did not move, for 8 ms per exposure).

    Takes the observed standards, the exposure's templates, the scan, the photometric score,
    the priors and the config. Returns ``(params, errors, lsf_fit, tm)``: the parameters and
    their errors (dicts of (S,) arrays), the width fit (:func:`fit_lsf_scale`) and the
    templates at the width used.
    """
    params, errors = choose_parameters(obs, tm, scan, phot, prior, config)
    lsf_fit = fit_lsf_scale(obs, tm, scan, params, config.fit.lsf_prior)
    if lsf_fit.beyond:
        _warn_width_beyond(obs, tm.lsf, lsf_fit.beyond)
    if abs(lsf_fit.scale - 1.0) > _LSF_MIN_CHANGE:
        tm = ExposureTemplates(tm.library, obs.wave, tm.lsf.scaled(lsf_fit.scale), [])
        if abs(lsf_fit.scale - 1.0) > _LSF_REFINE_CHANGE:
            params, errors = choose_parameters(obs, tm, scan, phot, prior, config,
                                               start=params)
    return params, errors, lsf_fit, tm


def fit_lsf_scale(obs, tm, scan, params, prior_sigma=None):
    """The stars' line-spread width relative to ``tm.lsf`` (step 6): per star a parabola
    through the chi^2 of its refined model at trial widths; pooled (inverse-variance) over
    the stars, with a Gaussian prior of width ``prior_sigma`` around 1 (None: no prior).

    The prior matters where the lines do not constrain the width (templates sampled more
    coarsely than the line spread are only interpolated, so chi^2 hardly changes with it):
    the parabola's vertex is then noise, which a 1e-7 change of the counts moved from +25 %
    to +5 %; with the prior such a width stays the header's.

    The refined (interpolated) model matters: a neighbouring grid point's lines differ in
    depth, which a width change partly mimics. Takes the observed standards, the exposure's
    templates, the scan and the chosen ``params`` (dict of (S,) arrays). Returns a namespace:
    ``scale`` and ``err`` (pooled; 1 and NaN without a usable star), ``star`` and
    ``star_err`` (S,), each star's own (without the prior)."""
    ids, combine = corner_combination(*interpolated_corners(tm.library, params))
    models = np.empty((obs.nstar, _LSF_TRIALS.size, obs.wave.size))
    # At the current width the exposure's own templates (kept, not redone); the others each
    # star's model convolved once, not its templates.
    current = _LSF_TRIALS == 1.0
    models[:, current] = (combine @ tm.fetch(ids))[:, None]
    models[:, ~current] = library_models(tm.library, obs.wave, tm.lsf, ids, combine,
                                         _LSF_TRIALS[~current]).transpose(1, 0, 2)
    chi2 = np.full((obs.nstar, _LSF_TRIALS.size), np.nan)
    for s in np.flatnonzero(scan.usable):  # a few stars, their trials in one call each
        chi2[s] = score_star(obs.norm[s], obs.ivar[s], models[s], scan.rv[s], obs.wave,
                             "chi2", knot_spacing=scan.knots,
                             star_wavelength=obs.star_wave[s], alone=True)
    # The parabola through the three trials by divided differences (what polyfit's least
    # squares give through three points, without its ~0.1 ms).
    x, y = _LSF_TRIALS - 1.0, nan_to_num(chi2, nan=0.0)
    slope = np.diff(y, axis=1) / np.diff(x)  # (S, 2)
    a = (slope[:, 1] - slope[:, 0]) / (x[2] - x[0])
    b = slope[:, 0] - a * (x[0] + x[1])
    # Errors on the chi^2 scale inflated by chi^2/dof: mismatch widens the minimum.
    inflate = np.maximum(scan.chi2_dof_best, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        vertex = np.where(a > 0, -b / (2 * a), np.nan)
        err = np.where(a > 0, np.sqrt(inflate / a), np.nan)
    ok = scan.usable & np.isfinite(vertex) & (np.abs(vertex) <= _LSF_MAX_OFFSET)
    star_scale = np.where(ok, 1.0 + vertex, np.nan)
    star_err = np.where(ok, err, np.nan)
    scale, scale_err = pool_lsf_scales(vertex[ok], err[ok], prior_sigma) if ok.any() else (
        1.0, np.nan)
    return SimpleNamespace(scale=scale, err=scale_err, star=star_scale, star_err=star_err,
                           beyond=_beyond(chi2 / inflate[:, None], scan.usable & ~ok))


def _beyond(chi2, unfitted):
    """-1 (+1) when every star is ``unfitted`` and its ``chi2`` (S, 3), in units of its
    chi^2/dof, falls steadily and significantly towards the narrowest (widest) trial: the
    stars' lines are narrower (wider) than the line spread by more than the fit reaches. 0
    otherwise, also without such a star."""
    with np.errstate(invalid="ignore"):
        narrower = (chi2[:, 0] < chi2[:, 1]) & (chi2[:, 1] < chi2[:, 2]) & (
            chi2[:, 1] - chi2[:, 0] > _LSF_BEYOND_DCHI2)
        wider = (chi2[:, 2] < chi2[:, 1]) & (chi2[:, 1] < chi2[:, 0]) & (
            chi2[:, 1] - chi2[:, 2] > _LSF_BEYOND_DCHI2)
    if not unfitted.any() or not np.array_equal(unfitted, narrower | wider):
        return 0
    return -1 if narrower[unfitted].all() else 1 if wider[unfitted].all() else 0


def _warn_width_beyond(obs, lsf, sign):
    """The standards' lines are narrower (``sign`` -1) or wider (+1) than ``lsf`` by more
    than the width fit reaches: the width is left as ``lsf`` has it (FCALLSF 1), which is
    then wrong; the header's FWHM is likely in another unit than Angstrom (pixels, km/s)."""
    source = {"FWHMPC": "FWHMPCk", "SPECFWHM": "SPECFWHM"}.get(lsf.source, lsf.source)
    where = f"primary header {source}" if source in ("FWHMPCk", "SPECFWHM") else source
    mid = float(np.median(obs.wave))
    warnings.warn(f"{obs.expid}: the standards' lines are {'narrower' if sign < 0 else 'wider'}"
                  f" than the line spread of the {where} (FWHM {float(lsf.fwhm(mid)):.3g} A at "
                  f"{mid:.0f} A) by more than {100 * _LSF_MAX_OFFSET:.0f} %, beyond what the "
                  "width fit corrects (FCALLSF left at 1): check that FWHM (the contract's "
                  "unit is Angstrom: one in pixels or km/s?)", FluxCalWarning, stacklevel=3)


def pool_lsf_scales(offsets, errors, prior_sigma=None):
    """The exposure's line-spread width from its stars' (``1 + offsets`` +- ``errors``):
    inverse-variance mean with a Gaussian prior N(1, ``prior_sigma``) (None: none).

    Returns ``(scale, error)`` as floats."""
    w = 1.0 / np.asarray(errors, dtype=np.float64) ** 2
    prior = 0.0 if prior_sigma is None else 1.0 / prior_sigma**2
    total = w.sum() + prior
    return float(1.0 + np.sum(w * offsets) / total), float(1.0 / np.sqrt(total))
