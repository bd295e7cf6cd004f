"""Wavelength axes: air/vacuum conversion, pixel edges and widths, distinct rows of pixels,
the caches' keys of pixels."""

from __future__ import annotations

import numpy as np

from ._recent import RecentKeys

__all__ = [
    "vacuum_to_air",
    "air_to_vacuum",
    "pixel_edges",
    "pixel_widths",
    "central_steps",
    "width_ratio",
    "distinct_rows",
    "keyed_wavelengths",
    "wavelength_key",
    "pixels_key",
]


def _morton_index(wave_vac):
    """Refractive index of standard air at vacuum wavelength ``wave_vac`` (Angstrom).

    Morton (2000, ApJS 130, 403, eq. 8), the IAU standard conversion (Edlén 1966 as revised by
    Birch & Downs 1994); valid above 2000 Angstrom.
    """
    # 1 + 8.34254e-5 + 2.406147e-2 / (130 - sigma2) + 1.5998e-4 / (38.9 - sigma2) in the
    # same operations, in place: each temporary of an exposure's 14 x 4096 pixels is a fresh
    # 0.5 MB (~0.4 -> ~0.2 ms)
    wave_vac = np.asarray(wave_vac, dtype=np.float64)
    sigma2 = np.divide(1e4, wave_vac, out=np.empty_like(wave_vac))  # an array, even 0-d
    np.square(sigma2, out=sigma2)
    index = np.subtract(130.0, sigma2, out=np.empty_like(sigma2))
    np.divide(2.406147e-2, index, out=index)
    np.divide(1.5998e-4, np.subtract(38.9, sigma2, out=sigma2), out=sigma2)
    index += 1.0 + 8.34254e-5
    index += sigma2
    return index


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
    air = _morton_index(wave_vac)
    np.divide(wave_vac, air, out=air)
    np.copyto(air, wave_vac, where=~(wave_vac >= 2000.0))  # NaN too, as np.where kept it
    return air


def air_to_vacuum(wave_air):
    """Convert air wavelengths (Angstrom) to vacuum, inverting :func:`vacuum_to_air` exactly.

    Four fixed-point iterations of ``vac = air * n(vac)`` (three reach 1e-11 Angstrom), so the
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


def pixel_widths(centres, axis=-1):
    """Pixel widths from pixel centres: the distance between the edges of :func:`pixel_edges`.

    A pixel next to one without a wavelength (NaN) takes its width from its other neighbour;
    a pixel with neither has none (NaN).

    Parameters
    ----------
    centres : array_like
        Increasing pixel centres along ``axis``, NaN where a pixel has no wavelength.
    axis : int
        Axis of the pixel index.

    Returns
    -------
    numpy.ndarray
        Widths, the shape of ``centres``, in their unit.
    """
    c = np.moveaxis(np.asarray(centres, dtype=np.float64), axis, -1)
    step = np.diff(c, axis=-1)
    if c.shape[-1] > 1 and np.isfinite(step).all():  # every pixel has both or its one step
        width = np.empty_like(c)
        np.add(step[..., :-1], step[..., 1:], out=width[..., 1:-1])
        width[..., 1:-1] *= 0.5
        width[..., 0], width[..., -1] = step[..., 0], step[..., -1]
        return np.moveaxis(width, -1, axis)
    nan = np.full(c.shape[:-1] + (1,), np.nan)
    before, after = np.concatenate([nan, step], axis=-1), np.concatenate([step, nan], axis=-1)
    # The mean of the two steps where both exist (the edges' distance), else the one there is.
    width = np.where(np.isfinite(before), np.where(np.isfinite(after), 0.5 * (before + after),
                                                   before), after)
    return np.moveaxis(width, -1, axis)


def central_steps(rows):
    """``np.gradient(rows, axis=-1)`` of rows (..., n >= 2) of increasing pixel centres, the
    same numbers (central differences halved, one-sided at the ends) without its generic
    steps: 55 against 137 us for a fit's three rows of 4096 pixels.

    Parameters
    ----------
    rows : numpy.ndarray
        Pixel centres along the last axis.

    Returns
    -------
    numpy.ndarray
        The steps, the shape of ``rows``.
    """
    rows = np.asarray(rows, dtype=np.float64)
    out = np.empty(rows.shape)
    inner = np.subtract(rows[..., 2:], rows[..., :-2], out=out[..., 1:-1])
    inner /= 2.0
    out[..., 0] = rows[..., 1] - rows[..., 0]
    out[..., -1] = rows[..., -1] - rows[..., -2]
    return out


def width_ratio(reference, wave, ln=None):
    """Width of each pixel of ``wave`` (..., P) over the width of the ``reference`` grid's
    pixels (P,) at its wavelength (interpolated in ln lambda): how many more counts the pixel
    collects of the same flux density. 1 where a pixel has no width (an isolated
    wavelength) and exactly 1 on the reference pixels themselves. ``ln``: (ln reference,
    ln wave) when the caller has them (ln wave free where ``wave`` is not positive)."""
    ln_reference, ln_wave = (np.log(reference), np.log(wave)) if ln is None else ln
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = pixel_widths(wave) / np.interp(ln_wave, ln_reference, pixel_widths(reference))
    return np.where(np.isfinite(ratio) & (ratio > 0), ratio, 1.0)


def distinct_rows(wavelength, scale):
    """The distinct rows of pixels of ``wavelength`` (..., P) and their line-spread ``scale``
    (..., or None: 1), as rows (R, 1 + P) of the scale and the wavelengths, and the index of
    each row of ``wavelength`` among them (fibers sharing a wavelength solution and line
    spread are one row; so are the stars, the reference grid and the fibers of an exposure
    on a shared solution)."""
    wave = np.asarray(wavelength, dtype=np.float64)
    scale = np.ones(wave.shape[:-1]) if scale is None else np.asarray(scale, np.float64)
    rows = np.concatenate([np.broadcast_to(scale[..., None], wave.shape[:-1] + (1,)), wave],
                          axis=-1).reshape(-1, wave.shape[-1] + 1)
    # Rows equal in every byte are one; grouped first by the (wrapping) sum of their bits,
    # then compared whole: 3x faster than their bytes as keys (hashing 14 fibers' 32 kB rows).
    bits = rows.view(np.int64)
    first, groups, inverse = [], {}, np.empty(len(rows), dtype=int)
    for i, key in enumerate(bits.sum(axis=1).tolist()):
        group = groups.setdefault(key, [])
        same = [k for k in group if np.array_equal(bits[i], bits[first[k]])]
        if not same:
            group.append(len(first))
            first.append(i)
        inverse[i] = same[0] if same else len(first) - 1
    # Every row its own (14 fibers' own solutions): the rows as they are, not a 0.5 MB copy.
    return (rows if len(first) == len(rows) else rows[first]), inverse


def keyed_wavelengths(wavelength):
    """Wavelengths as the cached operators (shifts, the library's convolution) take them:
    rounded to 1e-6 A (exposures of one setup differ by ~1e-11 A, unit and air/vacuum
    conversions, and must share cache entries)."""
    return np.ascontiguousarray(np.round(np.asarray(wavelength, dtype=np.float64), 6))


#: ``wavelength_key(wavelength)``: the bytes of :func:`keyed_wavelengths`, the same key
#: object for wavelengths seen recently (rounded and hashed once: a 32 kB row took ~20 us a
#: look-up). An exposure's few rows of pixels are looked up ~17 times (shift and library
#: operators).
wavelength_key = RecentKeys(lambda wave: keyed_wavelengths(wave).tobytes(), keep=16)

#: ``pixels_key(wavelength)``: the bytes of the pixels (float64) as they are, the same key
#: object for pixels seen recently (hashed once: ~11 us a 32 kB row), for caches of exact
#: pixels (an exposure's ~15 correction bases and its median pixel width).
pixels_key = RecentKeys(lambda wave: wave.tobytes())
