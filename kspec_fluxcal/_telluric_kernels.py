"""Gaussian line-spread kernels as a sparse matrix acting on the telluric model's boxes'
moments, and the sampler of high-resolution spectra at pixels built on it (:class:`_Sampler`)."""

from __future__ import annotations

import numpy as np
import scipy.sparse

#: Line-spread kernels reach this many sigma.
NSIGMA = 5.0
#: Rows of a kernel matrix computed at a time (see _kernel_terms).
_KERNEL_ROWS = 1024


def reached(boxes, wave, reach, ok):
    """Flat indices of the points ``wave`` (where ``ok``) that an absorbing box's centre c
    reaches: wave - reach <= c < wave + reach, i.e. the first centre at or above wave - reach
    lies below wave + reach (an infinite one closing them).

    The first centres are found by one search per point; for increasing points outnumbering
    the centres (a fibers' node model's 14k), by one search per centre among them and a
    count (the same indices: 0.6 -> 0.2 ms)."""
    absorbing = np.append(boxes.centres[boxes.active], np.inf)
    lower = np.where(ok, wave - reach, np.inf)
    if lower.size > absorbing.size and np.all(lower[1:] >= lower[:-1]):
        # Centres below point i: those whose count of points at or below them is <= i.
        first = np.bincount(np.searchsorted(lower, absorbing, side="right"),
                            minlength=lower.size + 1).cumsum()[:-1]
    else:
        first = np.searchsorted(absorbing, lower)
    return np.flatnonzero(ok & (absorbing[first] < wave + reach))


def kernel_matrix(boxes, wave_out, sigma_out):
    """Gaussian kernels for any (unsorted) output points, each with its own sigma, on a
    telluric model's boxes: the kernel and its first and second derivatives (over 1 and 2) at
    the box centres, which act on the boxes' zeroth, first and second moments of the
    absorption, normalised over the whole Gaussian (near the grid's ends the caller adds the
    value beyond it).

    Parameters
    ----------
    boxes : kspec_fluxcal.telluric._Boxes
        The high-resolution grid's boxes (their centres and which absorb).
    wave_out, sigma_out : numpy.ndarray
        The output points and their Gaussian sigmas, Angstrom.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix, shape (len(wave_out), 3 m + 3)
        Columns: term t of the k-th of the active boxes from ``first`` in ``order`` at 3 k + t,
        the moments' layout (no scatter into all boxes: 0.2 ms an evaluation); the others'
        terms in the last three, kept 0.
    first : int
        The first box reached.
    order : numpy.ndarray or None
        The reached active boxes (0 the first) by ``boxes.kind``, stable: O2's, both's, then
        H2O's (a model sums each species' terms over its own boxes only); None without kinds
        (their order along the grid).
    """
    wave_in = boxes.centres
    step = wave_in[1] - wave_in[0]
    half = int(np.ceil(NSIGMA * np.max(sigma_out, initial=step) / step))
    n, width = wave_out.size, 2 * half + 1
    # Indices in the type scipy would convert them to (after scanning them).
    itype = np.int32 if max(n * 3 * width, 3 * wave_in.size + width) < 2**31 else np.intp
    cols = (np.round((wave_out - wave_in[0]) / step).astype(itype)[:, None]
            + np.arange(-half, half + 1, dtype=itype)[None, :])
    # Taylor terms of g(x_j + d) in the offset d from a box's centre, each row's three in
    # turn: the CSR arrays directly. Every row keeps all its entries (zeros beyond reach,
    # clipped columns at the grid's ends): a fixed row length builds 2-4x faster than
    # dropping them, and the zeros cost a product only a few per cent.
    terms = np.empty((n, 3, width))
    for first in range(0, n, _KERNEL_ROWS):
        rows = slice(first, first + _KERNEL_ROWS)
        _kernel_terms(terms[rows], cols[rows], wave_in, wave_out[rows], sigma_out[rows, None])
    np.clip(cols, 0, wave_in.size - 1, out=cols)
    # Only the boxes the rows reach have columns (each row's columns increase).
    first_box = int(cols[:, 0].min()) if n else 0
    count = int(cols[:, -1].max()) - first_box + 1 if n else 0
    in_reach = boxes.active[first_box:first_box + count]
    m = int(np.count_nonzero(in_reach))
    rank, order = np.cumsum(in_reach, dtype=itype) - 1, None
    if boxes.kind is not None:
        order = np.argsort(boxes.kind[first_box:first_box + count][in_reach], kind="stable")
        position = np.empty(m + 1, itype)  # (the last for the boxes before the first active)
        position[order], position[m] = np.arange(m, dtype=itype), 0
        rank = position[rank]
    column = np.where(in_reach, 3 * rank, 3 * m).astype(itype)
    index = column[cols - first_box][:, None, :] + np.arange(3, dtype=itype)[None, :, None]
    return scipy.sparse.csr_matrix(
        (terms.ravel(), index.ravel(), np.arange(0, (n + 1) * 3 * width, 3 * width, dtype=itype)),
        shape=(wave_out.size, 3 * m + 3)), first_box, order


def _kernel_terms(terms, cols, wave_in, wave_out, sig):
    """The three Taylor terms (rows, 3, width) of :func:`kernel_matrix` at columns ``cols``
    of the rows ``wave_out`` (sigma ``sig``), written into ``terms``, for a thousand rows at
    a time (their temporaries stay in the processor's cache: 20-30 % faster for an
    exposure's fibers than all at once, 10-15 % faster than 256 rows)."""
    step = wave_in[1] - wave_in[0]
    u = np.multiply(cols, step)  # u = (wave_in[0] + cols * step - wave_out) / sig
    u += wave_in[0]
    u -= wave_out[:, None]
    u /= sig
    # The terms in float32 once the offsets are known (in float64: they are differences of
    # wavelengths): numpy vectorises float32's exp (not float64's) on processors without
    # AVX-512, and every pass moves half the bytes. Their relative errors, ~1e-7 (1e-6 at
    # the kernel's reach), move no transmission by more than ~1e-7 (the boxes' own: 2e-5).
    u = u.astype(np.float32)
    inverse = (1.0 / sig).astype(np.float32)
    u2 = np.square(u)
    vals = np.exp(u2 * np.float32(-0.5))
    vals[u2 > np.float32(NSIGMA**2)] = 0.0
    vals /= np.maximum(vals.sum(axis=1, keepdims=True), np.float32(1e-30))
    vals[(cols < 0) | (cols >= wave_in.size)] = 0.0
    terms[:, 0] = vals
    np.multiply(vals, u, out=u)  # first = -vals * u / sig
    u *= -inverse
    terms[:, 1] = u
    u2 -= 1.0  # second = 0.5 * vals * (u**2 - 1.0) / sig**2
    u2 *= vals
    u2 *= np.float32(0.5) * inverse**2
    terms[:, 2] = u2


class _Sampler:
    """High-resolution spectra sampled at pixels through Gaussian line spreads: which pixels
    the absorption reaches, and the kernel matrix from the boxes' moments to them.

    Each box of the high-resolution grid (:class:`kspec_fluxcal.telluric._Boxes`) is
    represented by the zeroth, first and second moments of the absorption (outside level
    minus the values) about its centre: the Gaussian's Taylor expansion over a box then errs
    by third-order terms only, so boxes a third of the narrowest sigma wide (adaptive box
    size) change no transmission by more than 2e-5 against the full high-resolution sum.
    """

    def __init__(self, boxes, wavelength, sigma):
        wave = np.asarray(wavelength, dtype=np.float64)
        self.box, self.n, self.moments = boxes.box, boxes.n, boxes.moments
        self.shape = wave.shape
        flat, sig = wave.ravel(), np.broadcast_to(sigma, wave.shape).ravel()
        ok = np.isfinite(flat) & np.isfinite(sig)
        reach = np.where(ok, NSIGMA * sig, 0.0)
        self.index = reached(boxes, flat, reach, ok)
        self.matrix, first, self.order = kernel_matrix(boxes, flat[self.index], sig[self.index])
        # Only the boxes with absorption (the rest transmit 1) within the pixels' reach are
        # computed: on a 3500-8500 A exposure, 30 % of the line list's absorbing points lie
        # beyond it. ``points``: theirs among the boxes' absorbing points (in order).
        self.absorbing = self.matrix.shape[1] // 3 - 1  # boxes
        start = int(np.count_nonzero(boxes.active[:first]))
        self.points = slice(start * self.box, (start + self.absorbing) * self.box)
        # The points from which on (in this order) boxes absorb by H2O too, by H2O only.
        self.split = None if self.order is None else tuple(self.box * np.searchsorted(
            boxes.kind[boxes.active][start:start + self.absorbing][self.order], [1, 2]))

    def sample(self, values, outside):
        """``values`` (k, ``points`` of the boxes' absorbing high-resolution points) seen at
        the pixels: (k,) + shape; ``outside`` (k,) where the absorption does not reach."""
        outside = np.asarray(outside, dtype=np.float64)
        return self.sample_deficit(outside[:, None] - values, outside)

    def sample_deficit(self, deficit, outside):
        """:meth:`sample` of ``outside - values`` given as ``deficit``."""
        k = outside.size
        boxed = np.zeros((k, self.absorbing + 1, 3))
        np.matmul(deficit.reshape(k, -1, self.box), self.moments, out=boxed[:, :-1])
        return self.sample_moments(boxed, outside)

    def sample_moments(self, boxed, outside):
        """:meth:`sample_deficit` of the deficits' moments ``boxed`` (k, absorbing + 1, 3),
        the last box's zero."""
        k = outside.size
        full = np.broadcast_to(outside[:, None], (k, int(np.prod(self.shape)))).copy()
        # One product per vector: scipy's product with k vectors at once costs 1.4x as much
        # (each row's sum is the same, its terms in turn).
        for row, vector in zip(full, boxed.reshape(k, -1), strict=True):
            row[self.index] -= self.matrix @ vector
        return full.reshape((k,) + self.shape)
