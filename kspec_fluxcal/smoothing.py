"""The smooth response of a combined calibration vector: a weighted cubic B-spline in
ln(lambda) with a light second-difference penalty and, optionally, a Gaussian prior on its
curvature relative to its own level (or a Savitzky-Golay filter); gaps bridged linearly
when there is too little to fit. Used by :func:`kspec_fluxcal.combine_vectors` (see the
``Smoothing`` section of :mod:`kspec_fluxcal.calibration`). Also the running median over a
wavelength window that the accuracy metrics smooth with.
"""

from __future__ import annotations

import functools

import numpy as np

from ._bspline import cached_curve_variance, cached_design_matrix, cached_normal_matrix
from ._nan import nan_to_num
from .continuum import fill_gaps

__all__ = ["running_median"]


def running_median(values, wavelength, window=100.0):
    """Running median over ``window`` Angstrom along the last axis, NaN gaps bridged first."""
    import scipy.ndimage  # 0.1 s of start-up that the calibration itself does not need

    step = float(np.median(np.diff(wavelength)))
    size = max(3, int(round(window / step)) | 1)
    values = np.asarray(values, dtype=np.float64)
    rows = values.reshape(-1, values.shape[-1])
    ok = np.isfinite(rows)
    filled = fill_gaps(np.where(ok, rows, 0.0), ok)
    filled[~ok.any(axis=1)] = np.nan  # nothing to bridge from
    return scipy.ndimage.median_filter(filled.reshape(values.shape),
                                       size=(1,) * (values.ndim - 1) + (size,), mode="nearest")


def _bridge(wave, values, variance, measured):
    x = np.log(wave)
    if measured.sum() < 2:
        return np.full(wave.size, np.nan), np.full(wave.size, np.nan)
    curve = np.interp(x, x[measured], values[measured])
    var = np.interp(x, x[measured], variance[measured])
    return curve, var


def _smooth(wave, values, variance, fit, opts, no_knots=None):
    """The smooth curve through ``values`` at pixels ``fit``, bridging the others: a cubic
    B-spline in ln(lambda) (knots every ``smooth_scale`` A at mid-range, none where
    ``no_knots``, weighted) or a Savitzky-Golay filter; and its variance as a function,
    computed when called (of the response's successive fits only the last one's is used,
    ~0.7 ms each)."""
    if fit.sum() < 10:
        curve, curve_variance = _bridge(wave, values, variance, fit)
        return curve, lambda: curve_variance
    if opts.smooth_method == "savgol":
        # 0.3 s of start-up (it imports scipy.stats): only when asked for.
        from scipy.signal import savgol_coeffs, savgol_filter

        base, base_var = _bridge(wave, values, variance, fit)
        step = np.median(np.diff(wave))
        window = max(5, int(round(opts.smooth_scale / step)) | 1)
        window = min(window, (wave.size - 1) | 1 if wave.size % 2 == 0 else wave.size)
        # The filter's noise gain (sum of its squared coefficients; ~2.2 / window for a cubic).
        gain = float(np.sum(savgol_coeffs(window, 3) ** 2))
        return savgol_filter(base, window, 3, mode="interp"), lambda: base_var * gain
    x, knots, step = _knots(wave, opts.smooth_scale, no_knots)
    basis = cached_design_matrix(x, knots)  # sparse: four B-splines per pixel
    w = np.where(fit, 1.0 / variance, 0.0)
    normal = cached_normal_matrix(x, knots, w)
    rhs = basis.T @ (w * nan_to_num(values))
    # A light second-difference penalty bridges knot intervals without data.
    normal += 1e-6 * np.trace(normal) / basis.shape[1] * _second_difference_penalty(
        basis.shape[1])
    if opts.smooth_curvature > 0:
        differences = _cached_second_differences(knots.tobytes(), step)
        normal += _curvature_prior(_solve(normal, rhs), differences, opts.smooth_curvature)

    def curve_variance():  # diag(B cov B^T), cov solved: 0.1 ms, the pseudo-inverse 0.9
        return cached_curve_variance(x, knots, _solve(normal, np.eye(normal.shape[0])))

    return basis @ _solve(normal, rhs), curve_variance


def _knots(wave, smooth_scale, no_knots):
    """ln(``wave``), the knots of :func:`_smooth`'s spline and their spacing ``step``, kept
    for the last few: an exposure's response is fitted three times on the same pixels and
    knots (0.1 ms a fit for the medians and logarithms)."""
    wave = np.asarray(wave)
    banned = None if no_knots is None else np.asarray(no_knots, dtype=bool).tobytes()
    return _cached_knots(wave.tobytes(), wave.dtype.str, float(smooth_scale), banned)


@functools.lru_cache(maxsize=4)
def _cached_knots(wave_bytes, dtype, smooth_scale, no_knots_bytes):
    """:func:`_knots` of the wavelengths' and ``no_knots``' bytes (read-only arrays)."""
    wave = np.frombuffer(wave_bytes, dtype=dtype)
    x = np.log(wave)
    step = smooth_scale / np.median(wave)  # the knot spacing in ln(lambda)
    nseg = max(1, int(np.ceil((x[-1] - x[0]) / step)))
    inner = np.linspace(x[0], x[-1], nseg + 1)
    if no_knots_bytes is not None:  # interior knots inside the excluded regions are dropped
        no_knots = np.frombuffer(no_knots_bytes, dtype=bool)
        banned = np.interp(inner, x, no_knots.astype(float)) > 0
        banned[[0, -1]] = False
        inner = inner[~banned]
    knots = np.concatenate([[x[0]] * 3, inner, [x[-1]] * 3])
    x.flags.writeable = knots.flags.writeable = False  # shared by the fits
    return x, knots, step


def _solve(normal, rhs):
    """``normal``^-1 ``rhs`` for the normal matrix of a fit, which its ridge and penalty keep
    regular: solved (a third of a pseudo-inverse's time), by the pseudo-inverse only if it
    is singular after all."""
    try:
        return np.linalg.solve(normal, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(normal) @ rhs


@functools.lru_cache(maxsize=4)
def _second_difference_penalty(n):
    """D^T D for the plain second differences D of ``n`` coefficients (the same for every
    fit of a response: made once, not three times, with its identity and product)."""
    diff = np.diff(np.eye(n), n=2, axis=0)
    penalty = diff.T @ diff
    penalty.flags.writeable = False  # shared by the fits
    return penalty


@functools.lru_cache(maxsize=4)
def _cached_second_differences(knots_bytes, step):
    """:func:`_second_differences`, kept for the last few knots (an exposure's response is
    fitted three times on the same knots)."""
    rows = _second_differences(np.frombuffer(knots_bytes), step)
    rows.flags.writeable = False  # shared by the fits
    return rows


def _second_differences(knots, step, degree=3):
    """Rows of second divided differences of cubic B-spline coefficients at their Greville
    abscissae, times ``step``^2: the plain second differences where knots are evenly spaced
    ``step`` apart, and zero for a straight line across a gap without knots (a telluric
    band), where plain differences of unevenly spaced coefficients are not."""
    g = np.convolve(knots[1:-1], np.ones(degree) / degree, mode="valid")
    left, right = 1.0 / np.diff(g)[:-1], 1.0 / np.diff(g)[1:]
    scale = 2.0 * step**2 / (g[2:] - g[:-2])
    rows = np.zeros((g.size - 2, g.size))
    i = np.arange(g.size - 2)
    rows[i, i] = scale * left
    rows[i, i + 1] = -scale * (left + right)
    rows[i, i + 2] = scale * right
    return rows


def _curvature_prior(coef, diff, rms):
    """Normal-matrix term of a Gaussian prior on the spline's second differences: rms ``rms``
    relative to the curve's own level (that of a first solution ``coef``), so that the
    response stays smooth where the stars' vectors are weak (lines weighted down, low S/N)
    and follows them where they are strong."""
    level = np.abs(coef[1:-1])
    level = np.maximum(level, 0.1 * np.median(level))
    return diff.T @ (diff / (rms * level[:, None]) ** 2)
