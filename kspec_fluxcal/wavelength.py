"""Wavelength axes: air/vacuum conversion, pixel edges and flux-conserving resampling."""

from __future__ import annotations

import numpy as np

__all__ = [
    "vacuum_to_air",
    "air_to_vacuum",
    "pixel_edges",
    "resample_conserving",
]


def _morton_index(wave_vac):
    """Refractive index of standard air at vacuum wavelength ``wave_vac`` (Angstrom).

    Morton (2000, ApJS 130, 403, eq. 8), the IAU standard conversion (Edlén 1966 as revised by
    Birch & Downs 1994); valid above 2000 Angstrom.
    """
    sigma2 = (1e4 / np.asarray(wave_vac, dtype=np.float64)) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - sigma2) + 1.5998e-4 / (38.9 - sigma2)


def vacuum_to_air(wave_vac):
    """Convert vacuum wavelengths (Angstrom) to air; values below 2000 Angstrom are kept.

    Parameters
    ----------
    wave_vac : array_like
        Vacuum wavelengths, Angstrom.

    Returns
    -------
    numpy.ndarray
        Air wavelengths, Angstrom (vacuum below 2000 Angstrom, the BOSZ 2024 convention).
    """
    wave_vac = np.asarray(wave_vac, dtype=np.float64)
    return np.where(wave_vac >= 2000.0, wave_vac / _morton_index(wave_vac), wave_vac)


def air_to_vacuum(wave_air):
    """Convert air wavelengths (Angstrom) to vacuum, inverting :func:`vacuum_to_air` exactly.

    Three fixed-point iterations of ``vac = air * n(vac)`` converge to 1e-10 Angstrom, so the
    two conversions are inverse to each other to numerical precision (a closed-form inverse
    formula would not be).

    Parameters
    ----------
    wave_air : array_like
        Air wavelengths, Angstrom (vacuum below 2000 Angstrom).

    Returns
    -------
    numpy.ndarray
        Vacuum wavelengths, Angstrom.
    """
    wave_air = np.asarray(wave_air, dtype=np.float64)
    vac = wave_air.copy()
    for _ in range(4):
        vac = wave_air * _morton_index(vac)
    return np.where(wave_air >= 2000.0, vac, wave_air)


def pixel_edges(centres, axis=-1):
    """Pixel edges (n + 1) from pixel centres (n): midpoints, ends extrapolated by half a pixel.

    Parameters
    ----------
    centres : array_like
        Increasing pixel centres along ``axis``.
    axis : int
        Axis of the pixel index.

    Returns
    -------
    numpy.ndarray
        Edges, one more than ``centres`` along ``axis``.
    """
    c = np.moveaxis(np.asarray(centres, dtype=np.float64), axis, -1)
    mid = 0.5 * (c[..., 1:] + c[..., :-1])
    first = c[..., :1] - (mid[..., :1] - c[..., :1])
    last = c[..., -1:] + (c[..., -1:] - mid[..., -1:])
    return np.moveaxis(np.concatenate([first, mid, last], axis=-1), -1, axis)


def resample_conserving(wave_in, flux, variance, wave_out):
    """Resample per-pixel counts onto a new pixel grid, conserving flux, with variance.

    Each output pixel receives the fraction of every input pixel that it overlaps (counts per
    pixel are integrals over the pixel), so the total is conserved; variances are propagated
    with the squared fractions (covariance between output pixels is ignored). An output pixel
    touching a bad input pixel (NaN flux, variance not > 0) or reaching beyond the input grid
    is NaN.

    Parameters
    ----------
    wave_in : numpy.ndarray, shape (nrow, n)
        Increasing pixel-centre wavelengths of every input row.
    flux, variance : numpy.ndarray, shape (nrow, n)
        Counts per pixel and their variance.
    wave_out : numpy.ndarray, shape (m,)
        Increasing pixel-centre wavelengths of the output grid, shared by every row.

    Returns
    -------
    flux_out, variance_out : numpy.ndarray, shape (nrow, m)
    """
    wave_in = np.atleast_2d(np.asarray(wave_in, dtype=np.float64))
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    variance = np.atleast_2d(np.asarray(variance, dtype=np.float64))
    nrow, n = flux.shape
    e_in = pixel_edges(np.broadcast_to(wave_in, (nrow, n)))
    e_out = pixel_edges(np.asarray(wave_out, dtype=np.float64))
    lo, hi = e_out[:-1], e_out[1:]

    # One searchsorted for all rows: shift each row by a constant larger than any span so
    # the concatenated edges stay sorted.
    span = max(np.nanmax(e_in), e_out[-1]) - min(np.nanmin(e_in), e_out[0]) + 1.0
    shift = span * np.arange(nrow)[:, None]
    flat = (e_in + shift).ravel()
    first = np.searchsorted(flat, (lo[None, :] + shift).ravel(), side="right").reshape(nrow, -1)
    last = np.searchsorted(flat, (hi[None, :] + shift).ravel(), side="left").reshape(nrow, -1)
    base = np.arange(nrow)[:, None] * (n + 1)
    first = first - base - 1  # index of the input pixel holding the output's lower edge
    last = last - base - 1  # ... and its upper edge
    covered = (first >= 0) & (last <= n - 1)
    first_c = np.clip(first, 0, n - 1)
    nmax = int(np.max(np.clip(last, 0, n - 1) - first_c)) + 1

    good_in = np.isfinite(flux) & np.isfinite(variance) & (variance > 0)
    f0 = np.where(good_in, flux, 0.0)
    v0 = np.where(good_in, variance, 0.0)
    width = np.diff(e_in, axis=-1)
    rows = np.arange(nrow)[:, None]
    out_f = np.zeros((nrow, lo.size))
    out_v = np.zeros((nrow, lo.size))
    bad = ~covered
    for k in range(nmax):  # a handful of overlapping input pixels per output pixel
        idx = np.clip(first_c + k, 0, n - 1)
        use = (first_c + k) <= last
        overlap = np.minimum(hi, e_in[rows, idx + 1]) - np.maximum(lo, e_in[rows, idx])
        frac = np.where(use, np.clip(overlap, 0.0, None) / width[rows, idx], 0.0)
        out_f += frac * f0[rows, idx]
        out_v += frac**2 * v0[rows, idx]
        bad |= (frac > 0) & ~good_in[rows, idx]
    out_f[bad] = np.nan
    out_v[bad] = np.nan
    return out_f, out_v
