"""The Lorentzian curve of growth without SciPy's special functions (kspec_fluxcal.line_growth):
SciPy's exponentially scaled Bessel functions to ~1e-15, and its inversion."""

import numpy as np
import scipy.special

from kspec_fluxcal.line_growth import growth, lorentz_strength


def test_growth_is_scipys_bessel_functions():
    """L(u) = u e^-u (I0 + I1) and dL/du = e^-u I0 over the range inverted, both sides of
    where the power series gives way to the asymptotic expansion."""
    u = np.exp(np.linspace(-12.0, 12.0, 20001))
    u = np.concatenate([u, np.nextafter(25.0, [0.0, 50.0]), [25.0]])
    value, slope = growth(u)
    i0e, i1e = scipy.special.i0e(u), scipy.special.i1e(u)
    np.testing.assert_allclose(value, u * (i0e + i1e), rtol=3e-15, atol=0)
    np.testing.assert_allclose(slope, i0e, rtol=3e-15, atol=0)
    # the derivative is the curve's
    h = 1e-6 * u
    np.testing.assert_allclose((growth(u + h)[0] - growth(u - h)[0]) / (2 * h), slope,
                               rtol=1e-7)


def test_lorentz_strength_inverts_the_curve_of_growth():
    """The integrated optical depth gives back the equivalent width (to L's precision), and
    is the bisection's of SciPy's curve (as it was computed); a root beyond ln u = +-12 is the
    end of the range."""
    rng = np.random.default_rng(3)
    ew, hwhm = 10 ** rng.uniform(-7, 5, 3000), 10 ** rng.uniform(-3, 0, 3000)
    strength = lorentz_strength(ew, hwhm)
    u = strength / (2 * np.pi * hwhm)
    target, ends = ew / (2 * np.pi * hwhm), growth(np.exp([-12.0, 12.0]))[0]
    inside = (target > 1.01 * ends[0]) & (target < 0.99 * ends[1])
    assert inside.sum() > 1500
    np.testing.assert_allclose(2 * np.pi * hwhm[inside] * growth(u[inside])[0], ew[inside],
                               rtol=1e-14)
    lo, hi = np.full(ew.shape, -12.0), np.full(ew.shape, 12.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = np.exp(mid) * (scipy.special.i0e(np.exp(mid)) + scipy.special.i1e(
            np.exp(mid))) < ew / (2 * np.pi * hwhm)
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    np.testing.assert_allclose(strength, 2 * np.pi * hwhm * np.exp(0.5 * (lo + hi)),
                               rtol=1e-14)
    ends = lorentz_strength(np.array([1e-12, 1e4]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(ends, 2 * np.pi * np.exp([-12.0, 12.0]), rtol=1e-15)
