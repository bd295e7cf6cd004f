"""Wavelength-region masks: telluric bands and stellar-line cores, as package data files."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import ConfigError

__all__ = ["load_regions", "region_mask", "mask_coverage_fraction", "MASKS"]

#: Masks shipped with the package, by name.
MASKS = ("telluric_default", "stellar_lines")


@functools.cache
def _parse(text, source):
    regions = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            lo, hi = float(fields[0]), float(fields[1])
        except (IndexError, ValueError):
            raise ConfigError(source, f"line {number}",
                              "expected 'lo hi [name]' (wavelengths in Angstrom)") from None
        if not hi > lo:
            raise ConfigError(source, f"line {number}", f"region {lo}-{hi} is empty")
        regions.append((lo, hi))
    return tuple(sorted(regions))


def load_regions(mask):
    """Wavelength regions ``((lo, hi), ...)`` in Angstrom (air) from a mask name or file.

    Parameters
    ----------
    mask : str or path-like
        A packaged mask name (see :data:`MASKS`) or the path of a file with one
        ``lo hi [name]`` region per line ('#' starts a comment).
    """
    name = os.fspath(mask)
    if name in MASKS:
        return _packaged(name)
    path = Path(name)
    if not path.is_file():
        raise ConfigError(name, None, f"no such mask file (packaged masks: {', '.join(MASKS)})")
    return _parse(path.read_text(), name)


@functools.cache
def _packaged(name):
    """A packaged mask's regions, read once (several masks are made per exposure, ~60 us
    of reading each); a user's file is read each time: it may change."""
    text = resources.files("kspec_fluxcal").joinpath(f"data/{name}.dat").read_text()
    return _parse(text, f"kspec_fluxcal/data/{name}.dat")


def region_mask(wavelength, regions, *, pad=0.0):
    """Good-pixel mask of a wavelength axis: False inside any region.

    Parameters
    ----------
    wavelength : xarray.DataArray or array_like
        Wavelengths, Angstrom (air).
    regions : str, path-like or sequence of (lo, hi)
        Regions, or a mask name/file for :func:`load_regions`.
    pad : float or array_like
        Widen every region by this much on each side (e.g. one resolution element), Angstrom.

    Returns
    -------
    xarray.DataArray or numpy.ndarray
        Boolean, True = good; a DataArray when ``wavelength`` is one.
    """
    if isinstance(regions, (str, os.PathLike)):
        regions = load_regions(regions)
    wave = np.asarray(wavelength, dtype=np.float64)
    bounds = np.asarray(regions, dtype=np.float64).reshape(-1, 2)
    pad = np.asarray(pad, dtype=np.float64)
    if pad.ndim == 0:
        inside = _inside(wave, bounds[:, 0] - pad, bounds[:, 1] + pad)
    else:
        inside = _inside_padded(*np.broadcast_arrays(wave, pad), bounds[:, 0], bounds[:, 1])
    good = ~inside
    if isinstance(wavelength, xr.DataArray):
        return xr.DataArray(good, dims=wavelength.dims, coords=wavelength.coords,
                            attrs={"description": "True outside the masked regions"})
    return good


def _inside(wave, lo, hi):
    """Which of ``wave`` lie inside any of the regions [lo, hi]: those beyond the start of
    some region and within the farthest end of the regions started (a search per pixel, not
    a comparison with every region)."""
    if not lo.size:
        return np.zeros(wave.shape, bool)
    if lo.size <= _FEW_REGIONS and wave.ndim and wave.size and _increasing(wave, hi):
        return _inside_rows(wave, lo, hi)
    order = np.argsort(lo, kind="stable")
    reach = np.maximum.accumulate(hi[order])
    started = np.searchsorted(lo[order], wave, side="right")
    return (started > 0) & (reach[np.maximum(started - 1, 0)] >= wave)


#: Regions up to this many: :func:`_inside` finds the pixels of increasing rows inside each
#: region by a search of its ends in the rows (~5 for a telluric mask: ~0.06 ms for three
#: stars' 4096 pixels by a search per pixel, ~0.02 ms by the regions' ends, a slice per
#: region).
_FEW_REGIONS = 32


def _increasing(wave, hi):
    """Whether every row of ``wave`` (at least 1-D) is non-decreasing (a NaN fails a
    comparison; a row of one NaN is inside nothing either way) and no region ends at NaN
    (:func:`_inside`'s running farthest end would be NaN from there on): what
    :func:`_inside_rows` needs."""
    return bool(np.all(wave[..., 1:] >= wave[..., :-1]) and not np.isnan(hi).any())


def _inside_rows(wave, lo, hi):
    """:func:`_inside` of rows (along the last axis) of non-decreasing wavelengths: each
    region's pixels a slice of each row, between the searches of its ends (lo <= w <= hi,
    the same comparisons)."""
    rows = wave.reshape(-1, wave.shape[-1])
    inside = np.zeros(rows.shape, bool)
    for row, out in zip(rows, inside, strict=True):
        starts = np.searchsorted(row, lo, side="left").tolist()
        ends = np.searchsorted(row, hi, side="right").tolist()
        for start, end in zip(starts, ends, strict=True):
            out[start:end] = True
    return inside.reshape(wave.shape)


def _inside_padded(wave, pad, lo, hi):
    """:func:`_inside` for regions [lo - pad, hi + pad] widened by a pad per pixel: the
    result of comparing every region with every pixel, by one search per pixel (the 18 line
    cores at 4096 pixels of three stars: 1 -> 0.2 ms). For a pixel's pad p, lo - p and
    hi + p round non-decreasing with lo and hi, so the regions started at w (lo - p <= w)
    are a prefix of those sorted by lo, and their farthest reach is max(hi) + p: the prefix
    is found by a search for w + p (rounded otherwise now and then) corrected by the
    comparisons themselves."""
    if not lo.size:
        return np.zeros(wave.shape, bool)
    order = np.argsort(lo, kind="stable")
    lo, reach = lo[order], np.maximum.accumulate(hi[order])
    started = np.searchsorted(lo, wave + pad, side="right")
    last = lo.size - 1
    while True:  # regions after the prefix found that start at w after all
        more = (started <= last) & (lo[np.minimum(started, last)] - pad <= wave)
        if not more.any():
            break
        started += more
    while True:  # ... and regions in it that do not
        fewer = (started > 0) & (lo[np.maximum(started - 1, 0)] - pad > wave)
        if not fewer.any():
            break
        started -= fewer
    return (started > 0) & (reach[np.maximum(started - 1, 0)] + pad >= wave)


def mask_coverage_fraction(wavelength, regions):
    """Fraction of the pixels of ``wavelength`` inside the regions.

    A telluric mask covering none or nearly all of an optical spectrum points to a unit
    error (nm read as Angstrom) or a wrong mask.
    """
    good = np.asarray(region_mask(wavelength, regions))
    return float(1.0 - good.mean()) if good.size else 0.0
