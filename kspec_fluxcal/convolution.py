"""Gaussian convolution in ln(lambda) as a sparse operator: one row per output pixel, its own
width (the line spread there, the input's resolution removed in quadrature), sampled on the
input's wavelengths with their ln(lambda) steps as weights and normalised to unit sum (the
method: :mod:`kspec_fluxcal.templates`). What the template libraries, the prepared cubes, the
pre-blurred libraries (:mod:`kspec_fluxcal.preblur`) and the simulator build their operators
with."""

from __future__ import annotations

import numpy as np
import scipy.sparse

from .constants import FWHM_PER_SIGMA

__all__ = ["convolution_matrix", "convolution_entries", "excess_variance", "gaussian_rows",
           "gaussian_widths", "log_sampling", "width_entries", "NSIGMA"]

#: Kernels reach this many sigma on each side.
NSIGMA = 5.0


def convolution_matrix(wave_in, wave_out, lsf, resolving_power=None):
    """Sparse operator convolving spectra on ``wave_in`` to ``lsf`` and sampling at ``wave_out``.

    Parameters
    ----------
    wave_in : numpy.ndarray
        Increasing input wavelengths (Angstrom), e.g. the grid's.
    wave_out : numpy.ndarray
        Increasing output pixel centres (Angstrom).
    lsf : LineSpread
        Instrument line-spread function.
    resolving_power : float, optional
        Resolving power of the input spectra (Gaussian FWHM = lambda / R), removed in
        quadrature; None for infinitely sharp input.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix, shape (len(wave_out), len(wave_in))
        Rows sum to 1.
    sharper : float
        Fraction of output pixels where the instrument is sharper than the input.
    """
    vals, cols, indptr, sharper = convolution_entries(log_sampling(wave_in), wave_out, lsf,
                                                       resolving_power)
    matrix = scipy.sparse.csr_matrix((vals, cols, indptr),
                                     shape=(indptr.size - 1, np.size(wave_in)))
    return matrix, sharper


def log_sampling(wave_in):
    """ln(wave_in) and its gradient, as :func:`convolution_entries` takes the input
    sampling (a library's computed once, not for every operator built)."""
    ln_in = np.log(np.asarray(wave_in, dtype=np.float64))
    return ln_in, np.gradient(ln_in)


def convolution_entries(log_in, wave_out, lsf, resolving_power=None, dtype=np.float64):
    """The CSR arrays (values, columns, row pointers) of :func:`convolution_matrix` and its
    ``sharper``, from the input's :func:`log_sampling`: what
    ``kspec_fluxcal.templates._library_operator`` turns into a float32 matrix in one step
    (``dtype``: of the values, see :func:`gaussian_rows`)."""
    wave_out = np.asarray(wave_out, dtype=np.float64)
    return gaussian_rows(log_in, np.log(wave_out), excess_variance(wave_out, lsf,
                                                                   resolving_power), dtype)


def excess_variance(wave_out, lsf, resolving_power=None):
    """The Gaussian variances in ln(lambda) at pixels ``wave_out`` (float64) that convolve
    input of ``resolving_power`` (None: infinitely sharp) to ``lsf``: its width with the
    input's removed in quadrature (negative where the input is the coarser)."""
    sig_inst = lsf.fwhm(wave_out) / wave_out / FWHM_PER_SIGMA
    sig_grid = 0.0 if resolving_power is None else 1.0 / (resolving_power * FWHM_PER_SIGMA)
    return sig_inst**2 - sig_grid**2


def gaussian_rows(log_in, ln_out, excess, dtype=np.float64):
    """:func:`convolution_entries` for rows centred on ``ln_out`` in the input's coordinate
    (``log_in``: ln(lambda), or any increasing coordinate in its units, and its steps) with
    Gaussian variances ``excess`` (at least half the input's step, squared: where smaller,
    the fraction ``sharper``). The values are ``dtype``: float32 for an operator kept in
    float32 (the libraries'), the Gaussians then computed in float32 from their float64
    offsets in sigma (float32's exp is SIMD: half of the ~2 ms of an operator of 4096
    pixels; the values differ from float64's rounded by up to ~3e-6 of themselves, where
    the argument's rounding is amplified by the exp) and normalised by float64 sums."""
    ln_in, dln = log_in
    floor = 0.5 * np.interp(ln_out, ln_in, dln)
    sharper = float(np.mean(excess <= floor**2))
    sigma = np.sqrt(np.maximum(excess, floor**2))
    counts, cols, indptr, vals = _reach_entries(ln_in, ln_out, NSIGMA * sigma)
    vals /= np.repeat(sigma, counts)
    vals = vals.astype(dtype, copy=False)
    vals *= -0.5 * vals
    np.exp(vals, out=vals)
    vals *= dln.astype(dtype, copy=False).take(cols)
    # Each row's sum, in float64 and in column order (np.bincount's), as a product with ones:
    # scipy adds a row's products in order, without bincount's row numbers and its passes
    # over them (0.2 against 0.3-0.6 ms for 4096 pixels; the whole 1.69 -> 1.49 ms). Its
    # matrix shares ``vals`` and gives the indices as scipy keeps them (int32 where they fit,
    # what the libraries' operators take).
    rows = scipy.sparse.csr_matrix((vals, cols, indptr), shape=(ln_out.size, ln_in.size))
    sums = rows @ np.ones(ln_in.size)
    vals /= np.repeat(sums.astype(dtype, copy=False), counts)
    return vals, rows.indices, rows.indptr, sharper


#: :func:`gaussian_widths` multiplies up to this many weighted spectra (their sum's row
#: included) one by one.
_ONE_BY_ONE = 4


def gaussian_widths(log_in, ln_out, excesses, spectra, entries=None):
    """``spectra`` (nin, M) on ``log_in`` convolved as :func:`gaussian_rows` does for each row
    of ``excesses`` (W, nout): a few widths of a few spectra (the line-spread width fit's
    trials of its models), without an operator each.

    The rows' entries (:func:`width_entries`) span the widest variance's kernels (+-NSIGMA
    of it: the narrower Gaussians reach further into their tails than :func:`gaussian_rows`
    takes them, by up to their 1e-6), or those of ``entries`` (made for wider ones on the
    same samplings), their offsets squared once for every width, and each row normalised by
    the product of its kernel with the input's steps (a column of the product, instead of a
    pass over the entries). Kernels and products are float32, as the library's operators
    (and float32's exp is SIMD). Returns ``(out, sharper)``: (W, nout, M), float64, and (W,)
    as :func:`gaussian_rows` gives ``sharper``."""
    ln_in, dln = log_in
    floor2 = (0.5 * np.interp(ln_out, ln_in, dln)) ** 2
    excesses = np.atleast_2d(excesses)
    sharper = np.mean(excesses <= floor2, axis=1)
    variance = np.maximum(excesses, floor2)
    if entries is None:
        entries = width_entries(log_in, ln_out, excesses.max(axis=0))
    counts, cols, indptr, offset2 = entries
    # The steps weigh the spectra (and, as the last row, give the rows' sums): one row each.
    weighted = np.empty((spectra.shape[1] + 1, ln_in.size), dtype=np.float32)
    np.multiply(np.transpose(spectra), dln, out=weighted[:-1])
    weighted[-1] = dln
    # A few rows multiplied one by one: scipy's one-vector kernel adds each row's products
    # in the same order as its several-vector one (the same sums), at about half its cost per
    # vector for 2-3 vectors on these matrices (~0.2 ms a vector for 4096 pixels).
    columns = None if len(weighted) <= _ONE_BY_ONE else np.ascontiguousarray(weighted.T)
    matrix = scipy.sparse.csr_matrix((offset2, cols, indptr), shape=(ln_out.size, ln_in.size))
    out = np.empty((len(excesses), ln_out.size, spectra.shape[1]))
    for k, var in enumerate(variance):
        matrix.data = np.repeat((-0.5 / var).astype(np.float32), counts)
        matrix.data *= offset2
        np.exp(matrix.data, out=matrix.data)
        sums = matrix @ columns if columns is not None else np.stack(
            [matrix @ row for row in weighted], axis=1)
        np.divide(sums[:, :-1], sums[:, -1:], out=out[k])
    return out, sharper


def width_entries(log_in, ln_out, excess):
    """The entries :func:`gaussian_widths` takes for Gaussian variances up to ``excess``
    (nout,; as :func:`gaussian_rows` takes it, at least the input's half step squared):
    ``(counts, cols, indptr, offset2)``, the rows' entry counts, the CSR columns and row
    pointers (int32) of their +-NSIGMA reach and their squared offsets (float32)."""
    ln_in, dln = log_in
    reach = NSIGMA * np.sqrt(np.maximum(excess, (0.5 * np.interp(ln_out, ln_in, dln)) ** 2))
    counts, cols, indptr, offset2 = _reach_entries(ln_in, ln_out, reach)
    offset2 *= offset2
    return counts, cols.astype(np.int32), indptr.astype(np.int32), offset2.astype(np.float32)


def _reach_entries(ln_in, ln_out, reach):
    """The entries of rows centred on ``ln_out`` reaching ``reach`` (nout,) each side in the
    input's ``ln_in``: ``(counts, cols, indptr, offset)``, the rows' entry counts, the CSR
    columns and row pointers and each entry's offset ``ln_in[col] - ln_out[row]``.

    Each row's columns are consecutive and increasing, so the CSR arrays are built directly,
    entry by entry (through (row, col) pairs scipy would sort and check them again; a
    rectangle of the widest row's width would compute twice the entries), in place (each
    (nnz,) temporary of ~0.75 MB for 4096 pixels costs its page faults). Per-row values are
    repeated along the row (cheaper than gathering them by row number)."""
    lo = np.searchsorted(ln_in, ln_out - reach, side="left")
    hi = np.searchsorted(ln_in, ln_out + reach, side="right")
    counts = hi - lo
    indptr = np.concatenate([[0], np.cumsum(counts)])
    cols = np.arange(indptr[-1])
    cols -= np.repeat(indptr[:-1] - lo, counts)
    offset = ln_in.take(cols)
    offset -= np.repeat(ln_out, counts)
    return counts, cols, indptr, offset
