"""FITS files read for the formats contract: opening a file whole and complete, finding an
extension by name, reading its data and header keywords, with every failure an
:class:`~kspec_fluxcal.errors.ExposureError` naming the file, the HDU or the keyword; and
binary-table columns made from NumPy arrays."""

from __future__ import annotations

import os
import warnings

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from ._atomic import check_regular_file
from .errors import ExposureError

__all__ = ["open_fits", "find_hdu", "hdu_data", "header_value", "fits_column"]


def open_fits(path):
    """Open a FITS file whole (no memory map, every HDU read), checked complete; a file
    that is missing, not FITS or cut short is an :class:`ExposureError`."""
    check_regular_file(path, ExposureError)
    try:
        # Astropy's truncation warnings are replaced by the check below, which is an error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except FileNotFoundError:
        raise ExposureError(path, None, "no such file") from None
    except Exception as err:  # astropy raises OSError, ValueError, TypeError... on garbage
        if "SIMPLE" in str(err):  # its advice (ignore_missing_simple=True) is not for users
            raise ExposureError(path, None, "not a FITS file (it does not start with "
                                "SIMPLE = T)") from None
        raise ExposureError(path, None, f"not a readable FITS file ({err})") from None
    try:
        _check_complete(hdul, path)
    except ExposureError:
        hdul.close()
        raise
    return hdul


def _check_complete(hdul, path):
    """A file cut short (an interrupted copy) must not pass for a smaller valid one.

    Astropy reads what it can: a file cut inside an extension's header silently loses that
    extension, and one cut inside the data only fails when the data are read. The file size
    must be where the last HDU's data (padded to 2880 bytes) end.
    """
    with open(path, "rb") as fh:
        if fh.read(2) in (b"\x1f\x8b", b"BZ", b"PK"):
            return  # compressed: the sizes are those of the decompressed stream
    info = hdul.fileinfo(len(hdul) - 1)
    end = info["datLoc"] + info["datSpan"]
    size = os.path.getsize(path)
    if size < end:
        raise ExposureError(path, None, f"truncated: {size} bytes, but its HDUs need {end} "
                            "(an interrupted copy or write?)")
    if size > end:
        raise ExposureError(path, f"after HDU {hdul[-1].name or len(hdul) - 1}",
                            f"{size - end} bytes that are no complete HDU: a truncated or "
                            "damaged extension")


def find_hdu(hdul, path, names, required=True):
    """The extension named one of ``names`` (None when absent and not ``required``); two
    such extensions are an error, since which one was meant cannot be told."""
    found = [k for k, hdu in enumerate(hdul) if k and hdu.name.upper() in names]
    if len(found) > 1:
        # Which one kspecdr meant cannot be told; the first would be used silently.
        which = " and ".join(str(k) for k in found)
        kinds = sorted({hdul[k].name.upper() for k in found})
        listed = f": {', '.join(kinds)}" if len(kinds) > 1 else ""
        raise ExposureError(path, f"HDU {names[0]}", f"{len(found)} extensions have this name "
                            f"(HDUs {which}{listed}); expected one")
    if found:
        return hdul[found[0]]
    if required:
        present = ", ".join(h.name or "(unnamed)" for h in hdul[1:]) or "none"
        raise ExposureError(path, f"HDU {names[0]}", f"missing (extensions present: {present})")
    return None


def hdu_data(hdu, path, label):
    """The data of ``hdu``; none, or unreadable (a truncated file), is an error naming
    the HDU ``label``."""
    try:
        data = hdu.data
    except Exception as err:  # a truncated file fails here, not at open
        raise ExposureError(path, f"HDU {label}",
                            f"data unreadable ({err}); truncated file?") from None
    if data is None:
        raise ExposureError(path, f"HDU {label}", "has no data")
    return data


def header_value(header, keys, path, required, kind=float):
    """The value of the first of ``keys`` present in ``header``, as ``kind`` (a float must
    be finite); None when absent and not ``required``."""
    for key in keys:
        if key in header and header[key] not in (None, ""):
            value = header[key]
            # FITS logicals are Python bools, which float() would silently turn into 0 or 1.
            try:
                if isinstance(value, bool):
                    raise TypeError
                value = kind(value)
            except (TypeError, ValueError):
                raise ExposureError(path, f"primary header {key}",
                                    f"value {header[key]!r} is not a {kind.__name__}") from None
            if kind is float and not np.isfinite(value):
                raise ExposureError(path, f"primary header {key}", f"value {value!r} is not finite")
            return value
    if required:
        raise ExposureError(path, "primary header",
                            f"missing {' (or '.join(keys)}{')' * (len(keys) - 1)}")
    return None


def fits_column(name, values, unit=None):
    """A binary-table column of ``values`` (strings, logicals, 64-bit integers or
    doubles)."""
    kind = values.dtype.kind
    if kind in "SUO":
        values = values.astype(str)
        width = max(1, int(np.char.str_len(values).max(initial=1)))
        return fits.Column(name=name, format=f"{width}A", array=values, unit=unit)
    if kind == "b":
        return fits.Column(name=name, format="L", array=values, unit=unit)
    if kind in "iu":
        return fits.Column(name=name, format="K", array=values.astype(np.int64), unit=unit)
    return fits.Column(name=name, format="D", array=values.astype(np.float64), unit=unit)

