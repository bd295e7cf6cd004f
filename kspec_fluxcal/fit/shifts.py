"""Radial-velocity shifts of spectra: a Lanczos (a = 4, 8-tap windowed sinc) kernel applied as
a sparse matrix per velocity, or tap by tap for many velocities at once (a velocity scan).

Observed spectra stay on their pixels; templates are moved to each star's velocity: the
prepared templates are band-limited (>= 2 pixels per FWHM), where a windowed sinc is nearly
exact, while a cubic (4-tap) kernel biased velocities by ~1/40 pixel (5 km/s at 3.7 A/pixel).
Shifting the noiseless templates keeps the observed noise uncorrelated.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse

from ..constants import SPEED_OF_LIGHT_KMS
from ..continuum import sparse_products
from ..wavelength import keyed_wavelengths, wavelength_key

__all__ = ["shift_operator", "ShiftOperator", "shift_spectra", "sample_rows", "sample_sets",
           "sample_moments",
           "position_margin", "rest_positions", "keyed_wavelengths", "keyed_velocity"]

_LANCZOS_A = 4
_TAPS = np.arange(-_LANCZOS_A + 1, _LANCZOS_A + 1)
_TABLE_STEPS = 2048  # kernel weights tabulated per 1/2048 pixel: interpolation errs < 1e-6
_TABLE_SHIFT = _TABLE_STEPS.bit_length() - 1  # a power of two: steps to pixels by a shift


def _exact_kernel_weights(frac):
    """Lanczos weights of the taps around a position (``frac`` past the left pixel),
    normalised to unit sum so a constant stays constant."""
    t = frac[..., None] - _TAPS
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(np.abs(t) < 1e-9, 1.0, np.sinc(t) * np.sinc(t / _LANCZOS_A))
    return w / w.sum(axis=-1, keepdims=True)


_KERNEL_TABLE = _exact_kernel_weights(np.linspace(0.0, 1.0, _TABLE_STEPS + 1))
_KERNEL_STEP = np.diff(_KERNEL_TABLE, axis=0)  # one gather fewer per interpolation
# Tap-major copies for :func:`sample_rows`, which works on (taps, points) arrays, in each
# precision it samples in.
_SAMPLING_TABLES = {np.dtype(t): (np.ascontiguousarray(_KERNEL_TABLE[:-1].T, dtype=t),
                                   np.ascontiguousarray(_KERNEL_STEP.T, dtype=t))
                    for t in (np.float64, np.float32)}


def _kernel_weights(frac):
    """:func:`_exact_kernel_weights` interpolated linearly in a table (a few times faster:
    velocity scans evaluate millions of positions)."""
    x = np.asarray(frac, dtype=np.float64) * _TABLE_STEPS
    i = np.clip(x.astype(np.intp), 0, _TABLE_STEPS - 1)
    # take() gathers rows several times faster than fancy indexing; in place: no temporaries
    step = _KERNEL_STEP.take(i, axis=0)
    step *= (x - i)[..., None]
    weights = _KERNEL_TABLE.take(i, axis=0)
    weights += step
    return weights


def rest_positions(wavelength, rv, source=None):
    """Fractional pixel positions, in a rest-frame spectrum sampled on ``source`` (default:
    ``wavelength``), of the points ``wavelength`` seen at radial velocity ``rv``.

    ``wavelength`` (..., P) and ``rv`` (...) broadcast (e.g. per-star pixels and trial
    velocities); ``source`` is one 1-D grid."""
    wave = np.asarray(wavelength, dtype=np.float64)
    src = wave if source is None else np.asarray(source, dtype=np.float64)
    if src.ndim != 1:
        raise ValueError("source wavelengths must be 1-D")
    z = np.asarray(rv, dtype=np.float64)[..., None] / SPEED_OF_LIGHT_KMS
    return np.interp(wave / (1.0 + z), src, np.arange(src.size), left=-np.inf, right=np.inf)


def keyed_velocity(rv):
    """Velocities (km/s, an array) as the shift operators take them: rounded to 1e-9 km/s
    (by Python's round: np.round can differ in the last bit)."""
    rv = np.asarray(rv, dtype=np.float64)
    return np.array([_keyed_rv(v) for v in rv.ravel()]).reshape(rv.shape)


def _keyed_rv(rv):
    return round(float(rv), 9)


#: The operators' keys of wavelengths: an exposure's stars and reference grid are a few; its
#: shift operators are looked up ~11 times (each rounded and hashed two 32 kB rows: ~40 us).
_key = wavelength_key


def shift_operator(wavelength, rv, source=None):
    """The sparse operator moving a rest-frame spectrum to radial velocity ``rv``.

    Parameters
    ----------
    wavelength : array_like, shape (P,)
        The pixels to sample (e.g. a star's own wavelength solution).
    rv : float
        km/s.
    source : array_like, shape (Q,), optional
        The rest-frame spectrum's wavelengths (default: ``wavelength``).

    Returns
    -------
    ShiftOperator
        ``matrix`` (scipy.sparse.csr_matrix, shape (P, Q)) samples ``f(lambda / (1 +
        rv/c))`` at each pixel (the flux-density factor 1/(1 + z), <= 0.2 % for |rv| <= 500
        km/s, is left to the photometric scale); rows of pixels whose source falls outside
        the spectrum are empty. Operators are cached: a star's velocity is reused by every
        scoring pass.
    """
    source = wavelength if source is None else source
    return _shift_operator_cached(_key(wavelength), _key(source), _keyed_rv(rv))


class ShiftOperator:
    """A shift matrix (:func:`shift_operator`) and what its users derive from it, each
    computed once per matrix."""

    def __init__(self, matrix, margin):
        self.matrix = matrix
        self.margin = margin  # pixels at each end that lean on extrapolated taps

    @functools.cached_property
    def squared(self):
        """The matrix's squared weights: how it carries independent variances."""
        # What matrix.multiply(matrix) gives (the same products, zeros dropped) without
        # scipy's merge of two index lists; the matrix's index arrays shared (neither is
        # modified) unless a product is zero.
        m = self.matrix
        squared = scipy.sparse.csr_matrix((m.data * m.data, m.indices, m.indptr), shape=m.shape)
        if not squared.data.all():
            squared = squared.copy()
            squared.eliminate_zeros()
        return squared

    @functools.cached_property
    def absolute(self):
        """The matrix's absolute weights: how far a pixel's neighbours reach it."""
        # abs(matrix) without its copies of the index arrays (shared: neither is modified)
        m = self.matrix
        return scipy.sparse.csr_matrix((np.abs(m.data), m.indices, m.indptr), shape=m.shape)

    @functools.cached_property
    def empty(self):
        """Rows with no source pixel (beyond the spectrum's ends)."""
        return np.asarray(self.matrix.getnnz(axis=1)) == 0


# An exposure's stars and velocities need ~10, some again after others (its wavelengths are
# its own: entries of earlier exposures only hold memory, ~0.4 MB each, up to three times that
# with the derived weights).
@functools.lru_cache(maxsize=24)
def _shift_operator_cached(wave_bytes, source_bytes, rv):
    wavelength = np.frombuffer(wave_bytes, dtype=np.float64)
    source = np.frombuffer(source_bytes, dtype=np.float64)
    pos = rest_positions(wavelength, rv, source)
    n = source.size
    inside = np.isfinite(pos)
    rows = np.flatnonzero(inside)
    # Only the rows whose source is on the spectrum are computed (increasing pixels have them
    # in one block: a view, not a gather); the others stay empty (no stored zeros), so
    # callers can tell.
    keep = slice(rows[0], rows[-1] + 1) if rows.size and rows[-1] - rows[0] + 1 == rows.size \
        else rows
    base = np.floor(pos[keep])
    weights = _kernel_weights(pos[keep] - base)
    # int32 indices (what scipy makes of int64 ones for this size) given at once: no copies
    cols = base.astype(np.int32)[:, None] + _TAPS.astype(np.int32)
    np.clip(cols, 0, n - 1, out=cols)
    indptr = np.zeros(pos.size + 1, dtype=np.int32)
    np.cumsum(inside, out=indptr[1:])
    indptr *= _TAPS.size
    matrix = scipy.sparse.csr_matrix((weights.ravel(), cols.ravel(), indptr),
                                     shape=(pos.size, n))
    matrix.sum_duplicates()  # taps clipped at the ends: one entry per column
    return ShiftOperator(matrix, position_margin(pos))


def shift_spectra(spectra, wavelength, rv, source=None):
    """Shift spectra (..., Q) on ``source`` (default ``wavelength``) to radial velocity ``rv``
    (km/s, scalar), sampled at ``wavelength`` (P,); NaN beyond the edges."""
    op = shift_operator(wavelength, rv, source)
    flat = np.asarray(spectra, dtype=np.float64).reshape(-1, op.matrix.shape[1])
    # (matrix @ flat.T).T, a star's one or two templates one by one (the same sums)
    out = sparse_products(op.matrix, flat)
    out[:, op.empty] = np.nan
    return out.reshape(np.shape(spectra)[:-1] + (op.matrix.shape[0],))


#: Points sampled at a time by :func:`sample_rows`.
_SAMPLE_BLOCK = 8192


def sample_rows(spectra, pos, precision=np.float64):
    """Each row of ``spectra`` (S, Q) sampled at its own fractional pixel positions ``pos``
    (S, ..., P) with the Lanczos kernel of :func:`shift_operator`, taps beyond the ends
    clipped to the end pixels: what the shift operators do one velocity at a time, for many
    velocities at once (a velocity scan), one gather per tap. Positions that are not finite
    are sampled at pixel 0: give them no weight.

    ``precision`` is the dtype of the kernel's weights, the values and their sums (the
    result is float64 either way): float32 moves half the bytes (gathers: ~0.7x the time)
    and errs by ~2e-7 of the values, what float32 templates hold anyway.
    """
    return sample_sets((spectra,), pos, precision)[0]


def sample_sets(sets, pos, precision=np.float64):
    """:func:`sample_rows` of each of several ``sets`` of rows (S, Q) at the same positions
    ``pos``, the kernel's weights computed once for all of them (a star's flux and normalised
    models: half the weights' passes of one call on the sets stacked). Returns a list, one
    array per set."""
    return _sample(tuple(sets), (None,) * len(sets), pos, precision)


def sample_moments(flux, variance, bad, pos):
    """What a shift operator's ``matrix``, ``squared`` and ``absolute`` weights
    (:class:`ShiftOperator`) make of ``flux``, ``variance`` and ``bad`` (S, Q), each row
    sampled at its positions ``pos`` (S, P) as :func:`sample_rows` does, float64, without
    building an operator (for a velocity used once): the same numbers within rounding (the
    taps summed pairwise, not in order) where no tap is clipped (within _LANCZOS_A pixels of
    the ends the operators square the sum of the clipped taps' weights, this sums their
    squares: pixels of the margin, which the rest frames do not weigh)."""
    return _sample((flux, variance, bad), (None, np.square, np.abs), pos, np.float64)


def _sample(spectra, kinds, pos, precision):
    """:func:`sample_rows` of several sets of rows (S, Q) at the same positions, each with
    its kernel's weights transformed by its ``kinds`` function (None: as they are)."""
    # The position in table steps, split once: its whole steps give the pixel (their high
    # part) and the table row (their low part), the rest the interpolation. Scaling by a
    # power of two and taking whole parts are exact: _kernel_weights' rows and fractions to
    # the last bit, in fewer passes over the points than splitting pixel, then table step.
    # Finite positions are >= 0: truncation is the floor (the whole steps as integers at
    # once; the rows' offsets added in place: two fewer temporaries of 8 bytes a point).
    x = np.where(np.isfinite(pos), pos, 0.0).ravel()
    x *= _TABLE_STEPS
    first = x.astype(np.intp)
    x -= first
    d = x.astype(precision, copy=False)
    i = first & (_TABLE_STEPS - 1)
    first >>= _TABLE_SHIFT  # each point's pixel, then its first tap in the padded rows
    table, step = _SAMPLING_TABLES[np.dtype(precision)]
    padded = [_padded(rows, precision) for rows in spectra]
    nrow, n = np.shape(spectra[0])
    width = n + _LANCZOS_A - 1 + _LANCZOS_A
    first.reshape(pos.shape)[...] += (np.arange(nrow) * width).reshape(
        (-1,) + (1,) * (pos.ndim - 1))  # a view: ``first`` is a fresh contiguous array
    # Tap by tap, each a 1-D gather from an offset view (of the padded rows, of the kernel
    # tables' tap-major copies): _kernel_weights' weights, the values the clipped taps read.
    # A block of points at a time, so that the taps' arrays stay in the cache (8192 points:
    # 64 kB each; the whole of a 3-star, 5-velocity scan's 61k points took 1.7x the time).
    out = [np.empty(first.size) for _ in spectra]
    for start in range(0, first.size, _SAMPLE_BLOCK):
        block = slice(start, start + _SAMPLE_BLOCK)
        ib, db, fb = i[block], d[block], first[block]
        terms = [[] for _ in spectra]
        for k in range(_TAPS.size):
            weight = step[k].take(ib)
            weight *= db
            weight += table[k].take(ib)
            for rows, kind, mine in zip(padded, kinds, terms, strict=True):
                value = rows[k:].take(fb)
                value *= weight if kind is None else kind(weight)
                mine.append(value)
        for total, mine in zip(out, terms, strict=True):
            while len(mine) > 1:  # pairwise, as numpy sums the taps of one row
                mine = [mine[j] + mine[j + 1] for j in range(0, len(mine), 2)]
            total[block] = mine[0]
    return [total.reshape(pos.shape) for total in out]


def _padded(spectra, precision):
    """Rows (S, Q) of ``precision`` padded with their end pixels, flattened: the taps'
    clipped values without a clip per tap (finite positions lie in [0, Q - 1], so taps reach
    at most _LANCZOS_A - 1 before the first pixel and _LANCZOS_A past the last)."""
    spectra = np.asarray(spectra, dtype=precision)  # products in place: rows of that dtype
    left = _LANCZOS_A - 1
    return np.concatenate([np.repeat(spectra[:, :1], left, axis=1), spectra,
                           np.repeat(spectra[:, -1:], _LANCZOS_A, axis=1)], axis=1).ravel()


def position_margin(pos):
    """Pixels at each end whose value, sampled at positions ``pos`` (from
    :func:`rest_positions`), leans on extrapolated taps."""
    shift = pos - np.arange(pos.shape[-1])
    np.abs(shift, out=shift)
    # np.nanmax's value without its copy (positions off the spectrum are infinite, not NaN)
    return int(np.ceil(np.max(shift, where=np.isfinite(shift), initial=0.0))) + _LANCZOS_A + 1
