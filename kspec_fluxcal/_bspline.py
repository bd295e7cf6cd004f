"""B-spline design matrices (the basis values of every point), vectorised over the points.

``scipy.interpolate.BSpline.design_matrix`` gives the same matrix, but importing
``scipy.interpolate`` (which brings ``scipy.optimize`` and ``scipy.spatial``) costs ~0.1 s of
every command's start-up for a few lines of arithmetic; tests compare the two.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse

from .wavelength import pixels_key

__all__ = ["design_matrix", "cached_design_matrix", "cached_normal_matrix",
           "cached_curve_variance", "basis_values"]


def design_matrix(x, knots, degree=3):
    """Values of the B-splines of ``knots`` at the points ``x``, as a sparse matrix.

    Parameters
    ----------
    x : array_like, shape (m,)
        Points inside ``[knots[degree], knots[-degree - 1]]`` (callers clip; a point beyond
        gets the values of the end interval's polynomials).
    knots : array_like, shape (n + degree + 1,)
        Non-decreasing knot vector (boundary knots repeated ``degree + 1`` times for a
        clamped basis).
    degree : int

    Returns
    -------
    scipy.sparse.csr_matrix, shape (m, n)
        Row ``j`` holds the ``degree + 1`` non-zero basis values at ``x[j]`` (they sum to 1
        for a clamped basis).
    """
    return _band_matrix(*basis_values(x, knots, degree))


def _band_matrix(first, values, n):
    """:func:`design_matrix` from :func:`basis_values`, built directly in CSR order (the
    arrays scipy's COO conversion gave: each row's values in column order, zeros kept; 3x
    faster)."""
    m = values.shape[1]
    itype = np.int32 if max(n, m * first.size + 1) < 2**31 else np.intp
    cols = (first[:, None] + np.arange(m)[None, :]).astype(itype).ravel()
    return scipy.sparse.csr_matrix(
        (values.ravel(), cols, np.arange(0, m * first.size + 1, m, dtype=itype)),
        shape=(first.size, n))


def cached_design_matrix(x, knots, degree=3):
    """:func:`design_matrix`, kept for the last few (x, knots): fits repeated on the same
    pixels and knots (an exposure's response) build it once. Do not modify the result."""
    return _design_cached(*_key(x, knots, degree))[0]


def cached_normal_matrix(x, knots, weights, degree=3):
    """B^T diag(``weights``) B, dense, for the :func:`cached_design_matrix` B: the values of
    ``(B.T @ B.multiply(weights[:, None])).toarray()`` to rounding (its sums in another
    order): each point's products of its B-splines' values summed over every run of points
    on the same B-splines at once, then the runs' sums (a third of scipy's product's time,
    0.2 against 0.6 ms on 4096 points)."""
    basis, (runs, cells), values_t, _ = _design_cached(*_key(x, knots, degree))
    m, n = values_t.shape[0], basis.shape[1]
    products = values_t[:, None, :] * (values_t * weights)[None, :, :]  # (a, b, points)
    sums = np.add.reduceat(products.reshape(m * m, -1), runs, axis=1)
    return np.bincount(cells, sums.ravel(), minlength=n * n).reshape(n, n)


def cached_curve_variance(x, knots, cov, degree=3):
    """diag(B ``cov`` B^T) for the :func:`cached_design_matrix` B (the variance of a spline
    fit at the points, ``cov`` its coefficients' covariance): the values of
    ``np.asarray(B.multiply(B @ cov).sum(axis=1)).ravel()``, from B's band of values.

    scipy sums (B cov)_pk from zero over B's entries of the row in order (B_pa cov_ak) and
    the row of B (B cov) from zero in order too: so do these sums, over the points at once
    and only where B is not zero (the products scipy makes beyond the band are not needed:
    5x faster)."""
    _, _, values_t, pairs = _design_cached(*_key(x, knots, degree))
    m, points = values_t.shape
    blocks = np.take(cov, pairs)  # cov_ab of each point's B-splines a, b: (a, b, points)
    row = np.zeros((m, points))  # (B cov)_pb for the point's B-splines b
    for a in range(m):
        row += values_t[a] * blocks[a]
    variance = np.zeros(points)
    for b in range(m):
        variance += values_t[b] * row[b]
    return variance


def _key(x, knots, degree):
    """The caches' key: the bytes of (x, knots) as float64 and the degree; arrays seen
    recently give the same bytes objects again, whose hashes Python keeps
    (:data:`~kspec_fluxcal.wavelength.pixels_key`; an exposure's response is fitted three
    times, 2-3 look-ups each: 32 kB copied and hashed anew took ~35 us a look-up)."""
    return pixels_key(x), pixels_key(knots), degree


@functools.lru_cache(maxsize=4)
def _design_cached(x_bytes, knots_bytes, degree):
    """The design matrix, the runs of points on the same B-splines (their first points, and
    the flat indices of their pairs of B-splines (a, b) in an (n, n) matrix, (a, b, runs)),
    the band of values (degree + 1, points) and the flat indices of each point's pairs of
    B-splines (a, b, points)."""
    first, values, n = basis_values(np.frombuffer(x_bytes), np.frombuffer(knots_bytes), degree)
    basis = _band_matrix(first, values, n)
    splines = first[None, :] + np.arange(values.shape[1])[:, None]
    pairs = splines[:, None, :] * n + splines[None, :, :]
    pairs = pairs.astype(np.int32) if n * n < 2**31 else pairs  # kept: half the memory
    runs = np.flatnonzero(np.diff(first, prepend=first[:1] - 1))
    return basis, (runs, pairs[:, :, runs].ravel()), np.ascontiguousarray(values.T), pairs


def basis_values(x, knots, degree=3):
    """The non-zero B-spline values at each point, as a band: what :func:`design_matrix`
    holds, for callers that build other products from it.

    Returns
    -------
    first : numpy.ndarray of int, shape (m,)
        Index of the first of the ``degree + 1`` basis functions not zero at each point.
    values : numpy.ndarray, shape (m, degree + 1)
        Their values.
    n : int
        Number of basis functions.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    t = np.asarray(knots, dtype=np.float64)
    k = int(degree)
    n = t.size - k - 1
    # The knot interval [t[i], t[i+1]) of each point, among the basis' own intervals.
    i = np.clip(np.searchsorted(t, x, side="right") - 1, k, n - 1)
    return i - k, _de_boor(x, t, i, k), n


def _de_boor(x, t, i, k):
    """(m, k + 1) values of the B-splines ``i - k .. i`` at ``x``: the Cox-de Boor recursion,
    one degree at a time for all points, in FITPACK's order of operations (``fpbspl``, as
    scipy evaluates it), so that the values are scipy's to the last bit. Computed as (k + 1,
    m) rows (contiguous) and returned transposed; zero knot spans (repeated knots) are
    handled only where there are any (the same values, in half the time)."""
    h = np.zeros((k + 1, x.size))
    h[0] = 1.0
    for j in range(1, k + 1):
        previous = h[:j].copy()
        h[0] = 0.0
        for n in range(1, j + 1):
            right, left = t[i + n], t[i + n - j]
            span = right - left
            zero = span == 0.0
            if zero.any():
                w = previous[n - 1] / np.where(zero, 1.0, span)
                h[n - 1] += np.where(zero, 0.0, w * (right - x))
                h[n] = np.where(zero, 0.0, w * (x - left))
            else:
                w = previous[n - 1] / span
                h[n - 1] += w * (right - x)
                h[n] = w * (x - left)
    return h.T
