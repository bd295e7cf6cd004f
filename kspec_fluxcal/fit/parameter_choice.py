"""The choice of each standard's parameters (step 5 of :mod:`kspec_fluxcal.fit.standards`): grid
points by spectral + photometric + prior scores, then refined between the grid's nodes."""

from __future__ import annotations

import numpy as np

from .._recent import Recent, per_library, read_only
from ..grid import PARAMS
from ..templates import library_arrays
from .exposure_templates import corner_combination, interpolated_corners, lattice
from .matching import stars_corrections
from .refinement import refine_parameters, score_points, star_rest_frames

__all__ = ["choose_parameters"]


def _spectral_weight(scan, config):
    """Divisor of each star's spectral chi^2: its best chi^2 per effective degree of freedom.

    Template mismatch makes residuals correlated: the spectral chi^2 is scaled so that its
    best value counts as ``spectral_dof`` independent measurements (or the pixels' dof),
    not as thousands of pixels outweighing the photometry.
    """
    neff = config.fit.spectral_dof or scan.dof
    best = np.nanmin(np.where(np.isfinite(scan.spec), scan.spec, np.inf), axis=1)
    return np.maximum(best / np.minimum(neff, scan.dof), 1.0)


def choose_parameters(obs, tm, scan, phot, prior, config, start=None):
    """Grid points by spectral + photometric + prior scores, refined between nodes; or, from
    ``start`` (parameters of a previous pass), a short refinement around them (step 5).

    Takes the observed standards, the exposure's templates, the scan, the photometric score
    (:class:`~kspec_fluxcal.fit.model_photometry.PhotometricScore`), the priors and the config.
    Returns ``params`` and ``errors``: dicts of (S,) arrays for teff, logg, feh and alpha
    (errors NaN where not refined)."""
    fit = config.fit
    library = tm.library
    spec_scale = _spectral_weight(scan, config)
    if start is not None:
        return _refine_from(obs, tm, scan, phot if fit.use_photometry else None, start,
                            spec_scale, config)
    scores = scan.spec / spec_scale[:, None]
    if fit.use_photometry:
        cand = prior.candidates
        extra = phot.nodes(np.arange(obs.nstar), cand) if obs.nstar else \
            np.zeros((0, cand.size))
        scores[:, cand] = scores[:, cand] + extra
    finite = np.where(np.isfinite(scores), scores, np.inf)
    best = np.where(scan.usable, np.argmin(finite, axis=1), 0)
    params = {p: library_arrays(library)[f"template_{p}"][best].astype(float) for p in PARAMS}
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
    axes, template_index = lattice(library)
    nstart = min(fit.refine_starts, scores.shape[1])
    starts = _distinct_starts(library, scores, nstart)  # (n_ok, nstart) templates
    star_of = np.repeat(ok, nstart)
    corr = None
    if scan.knots:  # each start's own correction, so that valleys compete fairly
        # the stars' starts in one call (the same corrections as one by one, in one shift
        # per star and one fit per set of pixels)
        corr = stars_corrections(obs.norm[ok], obs.ivar[ok],
                                 tm.fetch(starts.ravel()).reshape(starts.shape + (-1,)),
                                 scan.rv[ok], obs.wave, scan.knots, obs.star_wave[ok])
    options = {"metric": fit.metric, "delta": fit.huber_delta, "correction": corr,
               "spec_scale": np.repeat(spec_scale, nstart),
               "star_wavelength": obs.star_wave[star_of],
               "extra_score": None if phot is None else
               (lambda row, weights, points: phot(star_of[row], weights, points))}
    # The starts in their rest frames, once for the lattices and the [alpha/M] line.
    norm, ivar, rv = obs.norm[star_of], obs.ivar[star_of], scan.rv[star_of]
    rest = options["rest_frames"] = star_rest_frames(norm, ivar, rv, obs.wave, **options)
    start = {p: library_arrays(library)[f"template_{p}"][starts.ravel()] for p in PARAMS}
    refined, refined_err, final = refine_parameters(norm, ivar, tm, template_index, axes, start,
                                                    rv, obs.wave, **options)
    pick = np.argmin(np.where(np.isfinite(final), final, np.inf).reshape(ok.size, nstart),
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
            "rest_frames": None if rest is None else [rest[r] for r in rows],
            "extra_score": None if phot is None else
            (lambda row, weights, points: phot(chosen[row], weights, points))}
        params["alpha"], errors["alpha"] = _refine_alpha(obs, tm, scan, params, chosen,
                                                         alpha_options, axes, template_index,
                                                         fit)
    return params, errors


def _refine_from(obs, tm, scan, phot, start, spec_scale, config):
    """A lattice of a third of a grid step around ``start`` (and [alpha/M] again)."""
    fit = config.fit
    library = tm.library
    axes, template_index = lattice(library)
    ok = np.flatnonzero(scan.usable)
    params = {p: np.array(start[p], dtype=float) for p in PARAMS}
    errors = {p: np.full(obs.nstar, np.nan) for p in PARAMS}
    if not ok.size:
        return params, errors
    corr = None
    if scan.knots:
        # the stars' weights of their distinct corners: no (S, 48, P) gather of the corners
        ids, combine = corner_combination(*interpolated_corners(
            library, {p: params[p][ok] for p in PARAMS}))
        models = combine @ tm.fetch(ids)
        corr = stars_corrections(obs.norm[ok], obs.ivar[ok], models[:, None], scan.rv[ok],
                                 obs.wave, scan.knots, obs.star_wave[ok])
    options = {"metric": fit.metric, "delta": fit.huber_delta, "correction": corr,
               "spec_scale": spec_scale[ok], "star_wavelength": obs.star_wave[ok],
               "extra_score": None if phot is None else
               (lambda row, weights, points: phot(ok[row], weights, points))}
    options["rest_frames"] = star_rest_frames(obs.norm[ok], obs.ivar[ok], scan.rv[ok],
                                              obs.wave, **options)
    refined, refined_err, _ = refine_parameters(
        obs.norm[ok], obs.ivar[ok], tm, template_index, axes,
        {p: params[p][ok] for p in PARAMS}, scan.rv[ok], obs.wave, levels=((5, 1.0 / 3),),
        **options)
    for p in PARAMS[:3]:
        params[p][ok], errors[p][ok] = refined[p], refined_err[p]
    if axes["alpha"].size > 1:
        params["alpha"][ok], errors["alpha"][ok] = _refine_alpha(
            obs, tm, scan, {p: params[p][ok] for p in PARAMS}, ok, options, axes,
            template_index, fit)
    return params, errors


def _refine_alpha(obs, tm, scan, params, ok, options, axes, template_index, fit):
    """[alpha/M] between the grid's nodes and up to ``fit.alpha_extrapolation`` above them:
    scores on a line of alpha at the refined (teff, logg, [M/H]), with the prior
    ``fit.alpha_prior`` above what the grid has at the star's [M/H], and a parabola through
    the best points."""
    beyond, prior = fit.alpha_extrapolation, fit.alpha_prior
    alphas = axes["alpha"]
    step = np.min(np.diff(alphas)) / 4
    lo, hi = alphas[0], alphas[-1] + beyond
    trial = np.linspace(lo, hi, int(round((hi - lo) / step)) + 1)
    points = np.zeros((ok.size, trial.size, 4))
    for d, p in enumerate(PARAMS[:3]):
        points[..., d] = params[p][:, None]
    points[..., 3] = trial
    scores = score_points(obs.norm[ok], obs.ivar[ok], tm, template_index, axes, points,
                          scan.rv[ok], obs.wave, **options)
    if prior > 0:  # one-sided: what the grid has at the star's [M/H] is not penalised
        cover = _alpha_cover(axes, template_index, params["feh"])
        scores = scores + (np.maximum(trial[None, :] - cover[:, None], 0.0) / prior) ** 2
    finite = np.where(np.isfinite(scores), scores, np.inf)
    k = np.argmin(finite, axis=1)
    best = trial[k]
    # Parabola through the best point and its neighbours (not at the ends of the range).
    rows = np.arange(ok.size)
    km, kp = np.clip(k - 1, 0, None), np.clip(k + 1, None, trial.size - 1)
    y0, ym, yp = finite[rows, k], finite[rows, km], finite[rows, kp]
    inner = (k > 0) & (k < trial.size - 1) & np.isfinite(ym) & np.isfinite(yp)
    h = trial[1] - trial[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        curv = (ym - 2 * y0 + yp) / h**2
        shift = np.where(inner & (curv > 0), -0.5 * h * (yp - ym) / (ym - 2 * y0 + yp), 0.0)
        err = np.where(inner & (curv > 0), np.sqrt(2.0 / curv), np.nan)
    return np.clip(best + np.clip(shift, -h, h), lo, hi), err


def _alpha_cover(axes, template_index, feh):
    """The largest [alpha/M] the grid has at each [M/H] ``feh`` (linear between its nodes):
    above it a model is a response transferred from other [M/H], or extrapolated."""
    has = (template_index >= 0).any(axis=(0, 1))  # (feh, alpha)
    # Each [M/H]'s last alpha with a model (argmax of the reversed row: its first), in whole
    # arrays (a loop over the nodes cost 75 instead of 30 us a call)
    good = has.any(axis=1)
    top = has.shape[1] - 1 - np.argmax(has[:, ::-1], axis=1)
    return np.interp(feh, axes["feh"][good], axes["alpha"][top[good]])


#: :func:`_alpha_groups` of the libraries met so far.
_GROUPS = Recent(8)


def _alpha_groups(library):
    """The templates' grid indices (T, 3) in (teff, logg, [M/H]) and the templates of each
    [alpha/M] value, as :func:`_distinct_starts` reads them (once per library)."""
    arrays = library_arrays(library)
    index = np.stack([np.searchsorted(arrays[p], arrays[f"template_{p}"])
                      for p in PARAMS[:3]], axis=1)
    alphas = arrays["template_alpha"]
    return read_only(index), tuple(read_only(np.flatnonzero(alphas == a))
                                   for a in np.unique(alphas))


def _distinct_starts(library, scores, n):
    """Per star, ``n`` good templates, spread over [alpha/M] values and grid valleys.

    For each [alpha/M] of the grid, candidates are taken in order of score and kept only when
    they differ from every kept one by two or more steps in Teff, log g or [M/H]. Spreading
    matters: at grid points an alpha-enhanced metal-poor model can mimic a solar one, and the
    lattice refinement (which keeps [alpha/M]) must also start in the other valley. Short
    lists are padded with the best template.
    """
    index, groups = per_library(_GROUPS, _alpha_groups, library)
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
