"""The weights of the survey model's fit (:mod:`kspec_fluxcal.survey.model`): per point, from
the formal errors and the error model, and per exposure, from its residual (Huber).

The weight of a point is ``h_e c / (f_e(l) + sigma_star^2 / n_e + tau^2)``: ``f_e`` the
formal variance of ln(own_smooth), ``sigma_star`` the shape error of one standard (template
mismatch), ``n_e`` the standards used, ``tau`` the real exposure-to-exposure scatter about the
model, ``c`` the fit grid's step over the smoothing scale (points within a knot interval of the
smooth response are not independent) and ``h_e`` a Huber weight from the exposure's residual
(outlier exposures count less). ``sigma_star`` and ``tau``, functions of wavelength, are
re-estimated from the residuals (:func:`error_model`): exposures with 1, 2, 3 standards
scatter by ``tau^2 + sigma_star^2 / n`` at each wavelength (the far blue, where the standards
are faint and fiber losses chromatic, scatters most).
"""

from __future__ import annotations

import numpy as np

__all__ = ["point_weights", "error_sums", "error_model", "huber_weights", "VARIANCE_FLOOR"]

#: Floors of the error model's variances: (0.1 %)^2.
VARIANCE_FLOOR = 1e-6


def point_weights(spec, formal, nstars, huber, tau2, star_var):
    """Weights of the fit-grid points of exposures (E, J) (see the module docstring);
    ``tau2`` and ``star_var`` are per fit-grid point (J,) or scalars."""
    n = np.maximum(np.asarray(nstars, dtype=np.float64), 1.0)[:, None]
    extra = np.asarray(star_var, dtype=np.float64) / n + np.asarray(tau2, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = spec.independence * np.asarray(huber, dtype=np.float64)[:, None] / (formal + extra)
    return np.where(np.isfinite(w) & np.isfinite(formal), w, 0.0)


def error_sums(resid, formal, nstars, weight):
    """Per fit-grid point sums (5, J) from which :func:`error_model` fits ``tau^2`` and
    ``sigma_star^2``; they add over batches of exposures.

    Parameters
    ----------
    resid, formal : numpy.ndarray, shape (E, J)
        Shape residuals from the model and formal variances (NaN: no data).
    nstars : numpy.ndarray, shape (E,)
        Standards used.
    weight : numpy.ndarray, shape (E,)
        Huber weights (outliers count less).
    """
    excess = resid**2 - formal
    ok = np.isfinite(excess)
    h = np.where(ok, np.asarray(weight, dtype=np.float64)[:, None], 0.0)
    inv = 1.0 / np.maximum(np.asarray(nstars, dtype=np.float64), 1.0)[:, None]
    x = np.where(ok, excess, 0.0)
    return np.stack([h.sum(0), (h * inv).sum(0), (h * inv**2).sum(0), (h * x).sum(0),
                     (h * x * inv).sum(0)])


def error_model(sums, *, start, smooth_points, floor=VARIANCE_FLOOR):
    """(tau^2, sigma_star^2) per fit-grid point from :func:`error_sums` summed: the weighted
    least-squares fit of ``resid^2 - formal = tau^2 + sigma_star^2 / n`` over exposures at
    each point, then a running median over ``smooth_points`` and the floor. Where every
    exposure has the same number of standards the two cannot be told apart: the total is
    split in the ratio of ``start`` (tau^2, sigma_star^2, the configured values).

    Returns
    -------
    tau2, star_var : numpy.ndarray, shape (J,)
    """
    import scipy.ndimage

    s0, s1, s2, sx, sxi = sums
    det = s0 * s2 - s1**2
    with np.errstate(invalid="ignore", divide="ignore"):
        tau2 = (s2 * sx - s1 * sxi) / det
        star = (s0 * sxi - s1 * sx) / det
        total = sx / s0
        mean_inv = s1 / s0
    share = start[0] / (start[0] + start[1] * np.where(np.isfinite(mean_inv), mean_inv, 1.0))
    split = ~(det > 1e-6 * s0**2) | ~np.isfinite(tau2) | ~np.isfinite(star)
    tau2 = np.where(split, share * total, tau2)
    with np.errstate(invalid="ignore", divide="ignore"):
        star = np.where(split, (1.0 - share) * total / mean_inv, star)
    out = []
    for values in (tau2, star):
        ok = np.isfinite(values)
        filled = np.interp(np.arange(values.size), np.flatnonzero(ok), values[ok]) \
            if ok.any() else np.full(values.size, floor)
        size = max(1, int(smooth_points)) | 1
        out.append(np.maximum(scipy.ndimage.median_filter(filled, size, mode="nearest"), floor))
    return tuple(out)


def huber_weights(mean_square, expected, threshold, clip=np.inf):
    """Huber weights of exposures from their residual relative to the expected one:
    ``min(1, threshold / u)``, ``u = sqrt(mean_square / expected)``; 0 beyond ``clip``
    (outliers: a wrong standard's few per cent would still pull a night's curves) and where
    unknown."""
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.sqrt(np.asarray(mean_square, float) / np.asarray(expected, float))
        h = np.where(u > clip, 0.0, np.minimum(1.0, threshold / u))
    return np.where(np.isfinite(h), h, 0.0)

