"""The curve of growth of Lorentzian lines (Ladenburg & Reiche 1913), inverted: the
integrated optical depth of a line from its equivalent width.

W = 2 pi g L(u), u = A / (2 pi g) (g the half width at half maximum, A the integrated
optical depth), L(u) = u exp(-u) (I0(u) + I1(u)), increasing in u, with
dL/du = exp(-u) I0(u).

The modified Bessel functions are evaluated here (:func:`growth`) rather than by SciPy's
``i0e`` and ``i1e``: importing ``scipy.special`` (its array-API wrappers parse the
docstrings of ~90 functions) was ~75 ms of the ~0.9 s of CPU from a ``calibrate``
command's start to its first exposure, for this one use.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["growth", "lorentz_strength"]

#: Below it, e^-u I0(u) and e^-u I1(u) by their power series (positive terms: no
#: cancellation); above, by their asymptotic expansions in 1/u.
_SERIES_LIMIT = 25.0
#: Terms of the power series in (u/2)^2: the 40th is < 1e-17 of the sum for u < 25.
_SERIES_TERMS = 40
#: Terms of the asymptotic expansions: the 30th is < 1e-18 of the sum for u > 25.
_ASYMPTOTIC_TERMS = 30
#: Power-series coefficients: I0(u) = sum (u/2)^(2k) / k!^2, I1(u) = (u/2) sum
#: (u/2)^(2k) / (k! (k+1)!).
_SERIES_I0 = np.array([1.0 / math.factorial(k) ** 2 for k in range(_SERIES_TERMS)])
_SERIES_I1 = np.array([1.0 / (math.factorial(k) * math.factorial(k + 1))
                       for k in range(_SERIES_TERMS)])


def _asymptotic(order):
    """Coefficients of u^-k of sqrt(2 pi u) e^-u I_order(u) (Abramowitz & Stegun 9.7.1):
    (-1)^k prod_{j=1..k} (4 order^2 - (2j - 1)^2) / (k! 8^k)."""
    coefficients, term = [], 1.0
    for k in range(_ASYMPTOTIC_TERMS):
        coefficients.append(term)
        term *= -(4.0 * order**2 - (2 * k + 1) ** 2) / ((k + 1) * 8.0)
    return np.array(coefficients)


_ASYMPTOTIC_I0, _ASYMPTOTIC_I1 = _asymptotic(0), _asymptotic(1)


def growth(u):
    """The curve of growth L(u) = u e^-u (I0(u) + I1(u)) and its derivative e^-u I0(u).

    Parameters
    ----------
    u : numpy.ndarray
        Positive, finite.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        L(u) and dL/du, relative error ~1e-15.
    """
    u = np.asarray(u, dtype=np.float64)
    i0e, i1e = np.empty_like(u), np.empty_like(u)
    small = u < _SERIES_LIMIT
    if small.any():
        v = u[small]
        powers = np.power.outer(0.25 * v * v, np.arange(_SERIES_TERMS))
        scale = np.exp(-v)
        i0e[small] = powers @ _SERIES_I0 * scale
        i1e[small] = powers @ _SERIES_I1 * (0.5 * v * scale)
    if not small.all():
        v = u[~small]
        powers = np.power.outer(1.0 / v, np.arange(_ASYMPTOTIC_TERMS))
        scale = 1.0 / np.sqrt(2.0 * np.pi * v)
        i0e[~small] = powers @ _ASYMPTOTIC_I0 * scale
        i1e[~small] = powers @ _ASYMPTOTIC_I1 * scale
    return u * (i0e + i1e), i0e


#: Newton's method stops when its step in ln u is below this (relative to max(|ln u|, 1)).
_TOLERANCE = 16 * np.finfo(np.float64).eps


def lorentz_strength(ew, hwhm):
    """Integrated optical depths A of Lorentzian lines with equivalent widths ``ew`` and
    half widths ``hwhm`` (Angstrom): L(u) = ew / (2 pi hwhm) solved for ln u in [-12, 12]
    (a root beyond it is its end) by Newton's method in ln u, bracketed (a step leaving the
    bracket bisects it), to the precision of L (~1e-15).

    Returns
    -------
    numpy.ndarray
        A, Angstrom.
    """
    target = np.asarray(ew / (2.0 * np.pi * hwhm), dtype=np.float64)
    ends = growth(np.exp([-12.0, 12.0]))[0]
    lo, hi = np.full(target.shape, -12.0), np.full(target.shape, 12.0)
    # L(u) ~ u for small u, ~ sqrt(2 u / pi) for large: a start near the root.
    x = np.clip(np.log(np.maximum(target, 0.5 * np.pi * target**2)), lo, hi)
    x[target <= ends[0]], x[target >= ends[1]] = -12.0, 12.0
    todo = (target > ends[0]) & (target < ends[1])
    for _ in range(60):  # ~5 steps from the start; at most 60 bisections of the bracket
        if not todo.any():
            break
        u = np.exp(x[todo])
        value, slope = growth(u)
        below = value < target[todo]
        lo[todo], hi[todo] = np.where(below, x[todo], lo[todo]), np.where(below, hi[todo],
                                                                          x[todo])
        step = x[todo] - (value - target[todo]) / (slope * u)
        step = np.where((step >= lo[todo]) & (step <= hi[todo]), step,
                        0.5 * (lo[todo] + hi[todo]))
        # converged: the step is at the level of L's rounding errors (~1e-15)
        done = np.abs(step - x[todo]) <= _TOLERANCE * np.maximum(np.abs(step), 1.0)
        x[todo] = step
        todo[todo] = ~done
    return 2.0 * np.pi * hwhm * np.exp(x)
