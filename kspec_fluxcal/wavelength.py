"""Wavelength axes: air/vacuum conversion and pixel edges."""

from __future__ import annotations

import numpy as np

__all__ = [
    "vacuum_to_air",
    "air_to_vacuum",
    "pixel_edges",
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
