"""The FIBRES table of a RED file (formats contract section 1): one row per fiber, read into
per-fiber coordinates (TYPE, NAME, RA, DEC, OBJID checked; other scalar columns kept, so that
the calibrated file carries the table unchanged)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .._astropy import fits
from ..constants import FIBER_TYPES
from ..errors import ExposureError
from ..fits_bytes import PlainHDU
from ..fits_file import table_columns

__all__ = ["fibres_coords", "table_text", "FIBRES_EXTNAMES"]

FIBRES_EXTNAMES = ("FIBRES", "FIBRES_IFU")
# Known FIBRES columns and their coordinate names.
_FIBRES_COLUMNS = {"NAME": "fiber_name", "TYPE": "fiber_type", "RA": "ra", "DEC": "dec",
                   "OBJID": "objid"}
# TUNIT spellings of RA and DEC (any case): degrees (the contract's default, also without a
# TUNIT) and radians, as 2dfdr writes them.
_DEGREES = ("", "deg", "degree", "degrees")
_RADIANS = ("rad", "radian", "radians")


def fibres_coords(hdu, nfib, path):
    """The FIBRES table ``hdu`` as per-fiber coordinates, checked against ``nfib`` fibers.

    Returns a dict of name -> :class:`xarray.Variable` along ``fiber``: ``fiber_type``,
    ``fiber_name``, ``ra``, ``dec`` (deg, NaN: no position) and ``objid`` (-1: none), each
    with its FITS column name, then ``fibres_<column>`` for every other scalar column.
    """
    where = f"HDU {hdu.name}"
    plain = isinstance(hdu, PlainHDU)  # read without astropy, which is not imported then
    if hdu.is_image if plain else not isinstance(hdu, fits().BinTableHDU):
        # An ASCII table too: the contract's is binary (typed columns: OBJID int64).
        kind = ("an ASCII table" if not plain and isinstance(hdu, fits().TableHDU)
                else "not a table")
        raise ExposureError(path, where, f"is {kind} ({type(hdu).__name__}); expected a "
                            "binary table with one row per fiber")
    nrows, columns = table_columns(hdu, path, hdu.name)
    if nrows != nfib:
        raise ExposureError(path, where, f"has {nrows} rows but the primary has {nfib} fibers")
    names = {name.upper(): name for name in columns}
    if "TYPE" not in names:
        raise ExposureError(path, f"{where} column TYPE", "missing")
    coords = {"fiber_type": _fiber_types(columns[names["TYPE"]][0], path, where)}
    if "NAME" in names:
        coords["fiber_name"] = table_text(columns[names["NAME"]][0])
    else:
        coords["fiber_name"] = np.full(nfib, "")
    for key in ("RA", "DEC"):
        coords[key.lower()] = (_sky_coordinate(columns[names[key]], key, path, where)
                               if key in names else np.full(nfib, np.nan))
    if "OBJID" in names:
        coords["objid"] = _objid_column(columns[names["OBJID"]][0], path,
                                        f"{where} column OBJID")
    else:
        coords["objid"] = np.full(nfib, -1, dtype=np.int64)
    result = {}
    for key, name in _FIBRES_COLUMNS.items():
        result[name] = xr.Variable("fiber", coords[name], {"fits_column": key})
    result["ra"].attrs["units"] = "deg"
    result["dec"].attrs["units"] = "deg"
    return {**result, **_other_columns(columns)}


def _fiber_types(column, path, where):
    """The TYPE column as one-letter strings; a letter not in the contract is an error."""
    types = table_text(column)
    unknown = ~np.isin(types, list(FIBER_TYPES))
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ExposureError(path, f"{where} column TYPE row {row}",
                            f"unknown fiber type {str(types[row])!r} "
                            f"(valid: {', '.join(FIBER_TYPES)})")
    return types.astype("<U1")


def _sky_coordinate(column, key, path, where):
    """The RA or DEC ``column`` (values, unit) in degrees (radians converted); NaN means no
    position, any other value must lie on the sky."""
    values, unit_read = column
    try:
        values = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ExposureError(path, f"{where} column {key}", "is not numeric") from None
    unit = str(unit_read or "").strip().lower()
    if unit in _RADIANS:
        values = np.degrees(values)
    elif unit not in _DEGREES:
        # Hours or arcsec read as degrees would put every fiber elsewhere on the sky: the
        # standards matched by position would silently match nothing.
        raise ExposureError(path, f"{where} column {key}", f"unit (TUNIT) {unit_read!r} is "
                            "neither degrees ('deg', or none) nor radians ('rad', 'radians')")
    # NaN means 'no position'; anything else must be a real sky position, or the
    # positional match of the standards fails far from here.
    limit = 90.0 if key == "DEC" else 360.0
    low = -90.0 if key == "DEC" else 0.0
    bad = ~np.isnan(values) & ~((values >= low) & (values <= limit))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ExposureError(path, f"{where} column {key} row {row}",
                            f"value {float(values[row])!r} is outside {low:g}..{limit:g} "
                            "deg")
    return values


def _other_columns(columns):
    """Every other scalar column of the table (:func:`~kspec_fluxcal.fits_file.table_columns`),
    as ``fibres_<name>`` variables (strings stripped, units kept), so that the calibrated
    file carries the table unchanged."""
    result = {}
    for name, (values, unit) in columns.items():
        if name.upper() in _FIBRES_COLUMNS or values.ndim != 1:
            continue
        if values.dtype.kind in "SU":
            values = table_text(values)
        attrs = {"fits_column": name}
        if unit:
            attrs["units"] = str(unit)
        result[f"fibres_{name.lower()}"] = xr.Variable("fiber", values, attrs)
    return result


def table_text(column):
    """A table's text column as stripped ``str``. FITS text is ASCII, but a NAME typed in
    Latin-1 ('\xe9toile') is not rare: the bytes are read as Latin-1, one character each,
    so that none is lost and the product, which carries the table verbatim, has them as
    they were. (Decoded as ASCII they failed the read: UnicodeDecodeError.)"""
    values = np.asarray(column)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "latin-1")
    return np.char.strip(values.astype(str))


def _objid_column(values, path, where):
    """OBJIDs as int64; floats must be whole (a NaN or 12.5 is no catalog objid)."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        # Beyond 2**53 a float is not every integer: Refcat2's objids (~1e17) would come
        # out as other objids, and the standard would silently match nothing.
        bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > 2.0**53)
    else:
        text = table_text(values)
        bad = ~np.char.isdecimal(np.char.lstrip(text, "+-")) | (np.char.str_len(text) == 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = values[row].item()
        why = ("is beyond 2**53, where a float column does not hold every integer (write "
               "OBJID as int64)" if isinstance(value, float) and np.isfinite(value)
               and value == round(value) else "is not an integer (use -1 for none)")
        raise ExposureError(path, f"{where} row {row}", f"value {value!r} {why}")
    return values.astype(np.int64) if values.dtype.kind == "f" else text.astype(np.int64)


