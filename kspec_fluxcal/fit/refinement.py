"""Refinement of the standards' parameters between grid points: scores of interpolated models
on lattices of (teff, logg, [M/H]) and a quadratic through the last one."""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse

from ..grid import PARAMS, alpha_response_weights
from .exposure_templates import ExposureTemplates
from .matching import fast_mode, rest_frame_stars, score_own_templates, score_star

__all__ = ["refine_parameters", "score_points", "quadratic_minimum", "star_rest_frames",
           "canonical_weights"]



def quadratic_minimum(x, y):
    """Minimum of a full quadratic fitted to scores ``y`` (S, K) at points ``x`` (S, K, d).

    Returns
    -------
    xmin : numpy.ndarray, shape (S, d)
        Stationary point (NaN where the fit is not a bowl).
    cov : numpy.ndarray, shape (S, d, d)
        ``2 H^-1``: the covariance for delta chi^2 = 1.
    """
    nstar, _, d = x.shape
    if d == 0:  # a grid of one node on every axis: nothing to refine
        return np.zeros((nstar, 0)), np.zeros((nstar, 0, 0))
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    design = np.concatenate([np.ones(x.shape[:2] + (1,)), x,
                             np.stack([x[..., i] * x[..., j] for i, j in pairs], axis=-1)], -1)
    ok = np.isfinite(y)
    design = np.where(ok[..., None], design, 0.0)
    normal = np.einsum("ski,skj->sij", design, design)
    rhs = np.einsum("ski,sk->si", design, np.where(ok, y, 0.0))
    coef = (np.linalg.pinv(normal) @ rhs[..., None])[..., 0]
    grad = coef[:, 1:1 + d]
    hess = np.zeros((nstar, d, d))
    for k, (i, j) in enumerate(pairs):
        c = coef[:, 1 + d + k]
        if i == j:
            hess[:, i, i] = 2 * c
        else:
            hess[:, i, j] = hess[:, j, i] = c
    bowl = np.all(np.linalg.eigvalsh(hess) > 0, axis=1) & (ok.sum(1) > design.shape[-1])
    xmin = np.full((nstar, d), np.nan)
    cov = np.full((nstar, d, d), np.nan)
    if bowl.any():
        xmin[bowl] = -np.linalg.solve(hess[bowl], grad[bowl][..., None])[..., 0]
        cov[bowl] = 2.0 * np.linalg.inv(hess[bowl])
    return xmin, cov


def score_points(obs_norm, obs_ivar, templates, template_index, axes, points, rv, wavelength,
                 *, metric="chi2", delta=3.0, knot_spacing=None, spec_scale=None,
                 extra_score=None, correction=None, star_wavelength=None, rest_frames=None):
    """Scores of models interpolated at parameter points, vectorised over points.

    Parameters
    ----------
    obs_norm, obs_ivar : numpy.ndarray, shape (nstar, npix)
    templates : numpy.ndarray (ntemplate, npix) or ExposureTemplates
        Normalised templates of the existing grid points on ``wavelength``, or the
        exposure's (:class:`~kspec_fluxcal.fit.exposure_templates.ExposureTemplates`: only
        the corners used are prepared).
    template_index : numpy.ndarray of int, shape of the grid axes
        Position of each grid point along the templates, -1 when missing.
    axes : dict
        Grid axes (teff, logg, feh, alpha).
    points : numpy.ndarray, shape (nstar, K, 4)
        (teff, logg, feh, alpha) of each star's K points.
    rv : numpy.ndarray, shape (nstar,)
    spec_scale : numpy.ndarray, shape (nstar,), optional
        Divide each star's spectral scores by this.
    extra_score : callable, optional
        ``extra_score(stars, weights, points)`` -> scores (N,) added to the spectral ones,
        for N = nstar x K points: ``stars`` (N,) is each point's star (row of ``obs_norm``),
        ``weights`` (N, ntemplate) the sparse interpolation matrix of the points (N, 4)
        (e.g. the photometric chi^2 of the interpolated models).
    correction : numpy.ndarray, shape (nstar, npix), optional
        Fixed smooth corrections (fast mode of :func:`score_star`).
    star_wavelength : numpy.ndarray, shape (nstar, npix), optional
        Each star's own pixels.
    rest_frames : list, optional
        In the fast mode, the stars as :func:`star_rest_frames` gives them for these
        arguments (computed here when not given: pass them to score the same stars again).

    Returns
    -------
    numpy.ndarray, shape (nstar, K)
    """
    nstar, k = points.shape[:2]
    flat = points.reshape(-1, 4)
    # Trial points, each asked for once: not kept
    index, weight = alpha_response_weights(axes, template_index >= 0, *flat.T, keep=False)
    cols = template_index[index[..., 0], index[..., 1], index[..., 2], index[..., 3]]
    # NaN (a point without corners) as 0, as np.nan_to_num (the weights are never infinite)
    weight = np.where((cols >= 0) & ~np.isnan(weight), weight, 0.0)
    used = weight != 0  # the [alpha/M] response's lower node is subtracted
    weights_on = canonical_weights(weight[used], np.flatnonzero(used.ravel()) // weight.shape[1],
                                   cols[used], flat.shape[0])
    data = templates.table(cols[used]) if isinstance(templates, ExposureTemplates) else \
        np.asarray(templates)
    if data.dtype.kind != "f":
        data = data.astype(np.float64)
    # The interpolation reads the templates used in place (no gather of their rows, nor a
    # column selection), in the templates' dtype (a float32 model is rounded as its
    # templates are; the scores sum in float64).
    models = (weights_on(data.shape[0], data.dtype) @ data).reshape(nstar, k, -1)
    if rest_frames is None:
        rest_frames = star_rest_frames(obs_norm, obs_ivar, rv, wavelength, metric=metric,
                                       knot_spacing=knot_spacing, correction=correction,
                                       star_wavelength=star_wavelength)
    if rest_frames is not None:
        scores = score_own_templates(rest_frames, models)
    else:
        star_wave = [None] * nstar if star_wavelength is None else star_wavelength
        scores = np.stack([score_star(obs_norm[s], obs_ivar[s], models[s], rv[s], wavelength,
                                      metric, delta, knot_spacing,
                                      None if correction is None else correction[s],
                                      star_wave[s])
                           for s in range(nstar)])
    if spec_scale is not None:
        scores = scores / np.asarray(spec_scale, dtype=float)[:, None]
    if extra_score is not None:  # every star's points in one call
        full = weights_on(int(template_index.max()) + 1)
        scores = scores + extra_score(np.repeat(np.arange(nstar), k), full, flat).reshape(
            nstar, k)
    return scores


def canonical_weights(values, rows, cols, nrow):
    """Sparse (CSR) matrices of the entries ``values`` at (``rows``, ``cols``), rows in
    increasing order: a function ``(ncol, dtype=float64) -> scipy.sparse.csr_matrix``.

    Each matrix is the one ``scipy.sparse.csr_matrix((values.astype(dtype), (rows, cols)),
    shape=(nrow, ncol))`` gives (columns sorted in each row, duplicates summed in ``dtype``),
    so its products are the same to the bit; the sorting is done once for all of them
    (scipy's own construction sorts again for each: 0.3 ms of a lattice's ~4 ms, for two).
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    width = int(cols.max()) + 1 if cols.size else 1
    key = rows * width + cols
    order = np.argsort(key, kind="stable")
    key = key[order]
    # Where a key starts (np.diff with a prepended -1 costs 5x as much on ~2000 keys)
    starts = np.empty(key.size, dtype=bool)
    starts[:1] = True
    np.not_equal(key[1:], key[:-1], out=starts[1:])
    first = np.flatnonzero(starts)
    indices = (key[first] % width).astype(np.int32)
    indptr = np.zeros(nrow + 1, dtype=np.int32)
    np.cumsum(np.bincount(key[first] // width, minlength=nrow), out=indptr[1:])
    values = np.asarray(values)[order]

    def matrix(ncol, dtype=np.float64):
        summed = np.add.reduceat(values.astype(dtype), first) if first.size else \
            np.zeros(0, dtype)
        return scipy.sparse.csr_matrix((summed, indices, indptr), shape=(nrow, ncol))

    return matrix


def star_rest_frames(obs_norm, obs_ivar, rv, wavelength, *, metric="chi2", knot_spacing=None,
                     correction=None, star_wavelength=None, **_):
    """The stars (nstar, npix) in their rest frames as :func:`score_points` scores them in
    the fast mode of :func:`~kspec_fluxcal.fit.matching.score_star` (a list of
    :func:`~kspec_fluxcal.fit.matching.rest_frame_star`), None when it does not: computed
    once for every lattice scored against the same stars, velocities and corrections.

    Takes the arguments of :func:`score_points` (others ignored)."""
    if not fast_mode(metric, knot_spacing, correction):
        return None
    return rest_frame_stars(obs_norm, obs_ivar, rv, wavelength, correction, star_wavelength)


def _median_step(axis):
    """np.median(np.diff(axis)) (0 for one node), in Python floats: the same value (the middle
    difference, or the mean of the two middle ones) for a tenth of np.median's cost."""
    values = np.asarray(axis, dtype=np.float64).tolist()
    if len(values) < 2:
        return 0.0
    diffs = sorted(b - a for a, b in zip(values, values[1:], strict=False))
    mid = len(diffs) // 2
    return diffs[mid] if len(diffs) % 2 else (diffs[mid - 1] + diffs[mid]) / 2


@functools.lru_cache(maxsize=8)
def _lattice_offsets(n, half):
    """The (n^3, 3) offsets of a lattice of n points a side spanning +-``half`` (read-only)."""
    u = np.linspace(-half, half, n)
    grid = np.array(np.meshgrid(u, u, u, indexing="ij")).reshape(3, -1).T
    grid.flags.writeable = False
    return grid


def refine_parameters(obs_norm, obs_ivar, templates, template_index, axes, start, rv,
                      wavelength, *, levels=((3, 1.0), (3, 0.5), (3, 0.25)), **options):
    """Refine (teff, logg, [M/H]) between grid points by a lattice search on interpolated
    templates, then a quadratic fit of the scores for the minimum and its errors.

    Each level scores a lattice of n^3 parameter sets spanning +/- ``half`` grid steps around
    the current best (at the start's [alpha/M]) with :func:`score_points`, vectorised over
    lattice points.

    Parameters
    ----------
    obs_norm, obs_ivar, templates, template_index, axes, rv, wavelength
        As for :func:`score_points`.
    start : dict of numpy.ndarray
        Starting parameters (the best grid point) of each star, including alpha.
    **options
        ``metric``, ``delta``, ``knot_spacing``, ``spec_scale``, ``extra_score``,
        ``correction``, ``star_wavelength``, ``rest_frames``: see :func:`score_points`.

    Returns
    -------
    params : dict of numpy.ndarray
        Refined teff, logg, feh (alpha unchanged).
    errors : dict of numpy.ndarray
        1-sigma errors (delta score = 1, inflated by sqrt(chi^2/dof) when above 1 and no
        ``spec_scale`` is given).
    score : numpy.ndarray, shape (nstar,)
        The best score found (to compare refinements started from different points).
    """
    names = PARAMS[:3]
    nstar = obs_norm.shape[0]
    steps = np.array([_median_step(axes[p]) for p in names])
    lo = np.array([axes[p][0] for p in names])
    hi = np.array([axes[p][-1] for p in names])
    centre = np.stack([np.asarray(start[p], dtype=float) for p in names], axis=1)  # (S, 3)
    alpha = np.asarray(start["alpha"], dtype=float)
    if options.get("rest_frames") is None:  # the same stars at every level
        options["rest_frames"] = star_rest_frames(obs_norm, obs_ivar, rv, wavelength, **options)
    for n, half in levels:
        grid = _lattice_offsets(n, half)  # (K, 3)
        # Lattices that would cross the grid's edge are moved inside it, not clipped:
        # clipping would merge points and leave the final quadratic undetermined.
        inner = np.clip(centre, np.minimum(lo + half * steps, hi),
                        np.maximum(hi - half * steps, lo))
        points = np.clip(inner[:, None, :] + grid[None] * steps, lo, hi)  # (S, K, 3)
        full = np.concatenate([points, np.broadcast_to(alpha[:, None, None],
                                                       points.shape[:2] + (1,))], axis=2)
        scores = score_points(obs_norm, obs_ivar, templates, template_index, axes, full, rv,
                              wavelength, **options)
        best = np.argmin(np.where(np.isfinite(scores), scores, np.inf), axis=1)
        centre = points[np.arange(nstar), best]
    # Quadratic through the last lattice, in grid steps around its best point.
    free = steps > 0
    x = (points - centre[:, None, :])[..., free] / steps[free]
    xmin, cov = quadratic_minimum(x, scores)
    inside = np.all(np.abs(xmin) <= half, axis=1)
    params = dict(start)
    errors = {}
    dof_scale = np.ones(nstar) if options.get("spec_scale") is not None else np.sqrt(
        np.maximum(np.nanmin(scores, axis=1) / np.maximum((obs_ivar > 0).sum(axis=1) - 1, 1),
                   1.0))
    j = 0
    for i, p in enumerate(names):
        if not free[i]:
            params[p] = centre[:, i]
            errors[p] = np.full(nstar, np.nan)
            continue
        refined = np.where(inside, centre[:, i] + xmin[:, j] * steps[i], centre[:, i])
        params[p] = np.clip(refined, lo[i], hi[i])
        errors[p] = np.sqrt(np.abs(cov[:, j, j])) * steps[i] * dof_scale
        j += 1
    return params, errors, np.nanmin(scores, axis=1)
