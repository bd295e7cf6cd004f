"""Reduced exposures (RED files, formats contract section 1) as xarray Datasets, and the
calibrated products (section 4).

An exposure is a Dataset with dims (fiber, wavelength): ``flux`` (counts), ``variance``,
``good`` (finite and variance > 0), a 1-D ``wavelength`` coordinate in Angstrom in air, and
per-fiber coordinates ``fiber_name``, ``fiber_type``, ``ra``, ``dec``, ``objid``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from . import __version__
from ._atomic import atomic_file, check_regular_file
from .constants import CAL_UNIT, FIBER_TYPES, FLUX_UNIT
from .errors import ExposureError
from .lsf import LineSpread
from .wavelength import air_to_vacuum, vacuum_to_air

__all__ = [
    "open_exposure",
    "read_exposure_info",
    "write_calibrated",
    "read_standard_stars",
    "red_hdulist",
    "exposure_setup",
    "add_history",
    "calibration_marks",
]

FIBRES_EXTNAMES = ("FIBRES", "FIBRES_IFU")
_ANGSTROM_UNITS = {"angstrom", "angstroms", "a", "aa", "0.1 nm"}
_NM_UNITS = {"nm", "nanometer", "nanometers", "nanometre", "nanometres"}
# A calibrated spectrum covering less than this, or reaching beyond, is not in Angstrom.
_PLAUSIBLE_RANGE = (1000.0, 30000.0)
# Known FIBRES columns and their coordinate names.
_FIBRES_COLUMNS = {"NAME": "fiber_name", "TYPE": "fiber_type", "RA": "ra", "DEC": "dec",
                   "OBJID": "objid"}
_WCS_KEYS = ("CRVAL1", "CDELT1", "CD1_1", "CRPIX1", "CUNIT1", "CTYPE1")
#: Primary-header keywords of calibrated products, by the attribute that carries them:
#: (keyword, type, comment). FCALNSTR and FCALRMS are the contract's (with FLUXCAL and
#: FCALVER); the others are ours, documented in the README. A float that is not available
#: (NaN) is written as -1; an attr that is None (a check that measured nothing: FCALSP*) is
#: not written.
CALIBRATION_KEYWORDS = {
    "fcalnstr": ("FCALNSTR", int, "standard stars used"),
    "fcalrms": ("FCALRMS", float, "fractional rms between standards (-1: n/a)"),
    "fcalsrc": ("FCALSRC", str, "origin of the calibration"),
    "fcalqual": ("FCALQUAL", str, "quality grade A (best) to D (see README)"),
    "fcalmerr": ("FCALMERR", float, "median model error of standards used (-1: n/a)"),
    "fcallsf": ("FCALLSF", float, "stars' LSF width / header FWHM (fitted)"),
    "fcalunsl": ("FCALUNSL", int, "pixels without a wavelength solution (NaN)"),
    "fcalo2": ("FCALO2", float, "telluric O2 column, airmasses (fitted; -1: n/a)"),
    "fcalh2o": ("FCALH2O", float, "telluric H2O column, ref. columns (-1: n/a)"),
    "model_id": ("FCALMOD", str, "survey model used (FCALSRC with 'model')"),
    "sphot_g": ("FCALSPG", float, "median synthetic - catalog g, program stars"),
    "sphot_r": ("FCALSPR", float, "median synthetic - catalog r, program stars"),
    "sphot_i": ("FCALSPI", float, "median synthetic - catalog i, program stars"),
    "sphot_scatter": ("FCALSPS", float, "robust scatter of synthetic - catalog, mag"),
    "sphot_n": ("FCALSPN", int, "program stars in the spectrophotometric check"),
}


def add_history(ds, text):
    """Append a timestamped HISTORY entry to ``ds.attrs['history']`` (in place) and return ds."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    entry = f"{stamp} kspec-fluxcal {__version__}: {text}"
    ds.attrs["history"] = [*ds.attrs.get("history", []), entry]
    return ds


# ----------------------------------------------------------------------------- reading


def _open_hdulist(path):
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


def _find_hdu(hdul, path, names, required=True):
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


def _data(hdu, path, label):
    try:
        data = hdu.data
    except Exception as err:  # a truncated file fails here, not at open
        raise ExposureError(path, f"HDU {label}",
                            f"data unreadable ({err}); truncated file?") from None
    if data is None:
        raise ExposureError(path, f"HDU {label}", "has no data")
    return data


def _header_value(header, keys, path, required, kind=float):
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


#: Plausible exposure times (s): a K-SPEC exposure is seconds to hours; 1e30 is a bad header.
EXPTIME_RANGE = (0.0, 1.0e5)
#: Plausible airmasses: 1 at the zenith; > 10 is within a degree or two of the horizon.
AIRMASS_RANGE = (1.0, 10.0)
#: Plausible seeing (optional SEEING, FWHM in arcsec at the guider): beyond 20 arcsec no
#: fiber spectrograph observes.
SEEING_RANGE = (0.0, 20.0)
#: Fewest pixels of a spectrum: fewer is a cut or transposed image, not a K-SPEC spectrum.
MIN_PIXELS = 16


def _in_range(value, key, bounds, path, unit="", open_low=False):
    lo, hi = bounds
    inside = (lo < value if open_low else lo <= value) and value <= hi
    if not inside:
        shown = f"{'(' if open_low else '['}{lo:g}, {hi:g}]"
        raise ExposureError(path, f"primary header {key}", f"value {value!r}{unit} is outside "
                            f"the plausible range {shown}{unit}")
    return value


def _exposure_keywords(header, path):
    """EXPTIME, MJD-OBS and AIRMASS (None when absent), checked for plausibility."""
    exptime = _header_value(header, ("EXPTIME", "EXPOSED"), path, True)
    key = next(k for k in ("EXPTIME", "EXPOSED") if header.get(k) not in (None, ""))
    _in_range(exptime, key, EXPTIME_RANGE, path, " s", open_low=True)
    airmass = _header_value(header, ("AIRMASS",), path, False)
    if airmass is not None:
        _in_range(airmass, "AIRMASS", AIRMASS_RANGE, path)
    seeing = _header_value(header, ("SEEING",), path, False)
    if seeing is not None:
        _in_range(seeing, "SEEING", SEEING_RANGE, path, " arcsec", open_low=True)
    return {"exptime": exptime, "mjd": _header_value(header, ("MJD-OBS", "UTMJD"), path, True),
            "airmass": airmass, "seeing": seeing}


def _check_width(path, nspec):
    if nspec < MIN_PIXELS:
        raise ExposureError(path, "HDU PRIMARY", f"image is {nspec} pixel{'s' * (nspec != 1)} "
                            f"wide; a spectrum needs at least {MIN_PIXELS}")


def _line_spread(header, path):
    coeffs = []
    while f"FWHMPC{len(coeffs)}" in header:
        key = f"FWHMPC{len(coeffs)}"
        coeffs.append(_header_value(header, (key,), path, True))
    # A coefficient beyond a gap would be silently ignored: a truncated polynomial.
    orders = sorted(int(k[6:]) for k in header if k.startswith("FWHMPC") and k[6:].isdigit())
    if orders and orders[-1] >= len(coeffs):
        raise ExposureError(path, f"primary header FWHMPC{orders[-1]}",
                            f"present but FWHMPC{len(coeffs)} is missing (the FWHM polynomial "
                            "needs every coefficient FWHMPC0..FWHMPCn)")
    if coeffs:
        return LineSpread(tuple(coeffs), "FWHMPC")
    if "SPECFWHM" in header:
        fwhm = _header_value(header, ("SPECFWHM",), path, True)
        return LineSpread.constant(fwhm, "SPECFWHM")
    raise ExposureError(path, "primary header",
                        "no line-spread description: neither SPECFWHM nor FWHMPC0 is present")


def _unit_factor(unit, path, where):
    u = str(unit).strip().lower()
    if u in _ANGSTROM_UNITS or u == "":
        return 1.0
    if u in _NM_UNITS:
        return 10.0
    raise ExposureError(path, where, f"unexpected wavelength unit {unit!r} "
                        "(expected 'Angstrom' or 'nm')")


_MEDIA = {"": "air", "air": "air", "vac": "vac", "vacuum": "vac"}


def _medium(primary, wavela, path):
    """'air' or 'vac' from AIRORVAC of the WAVELA and primary headers (absent: air).

    Both headers are checked: a bad value in either, or two that disagree, is an error, not
    a silent choice of one frame.
    """
    found = {}
    for hdr, where in ((wavela, "WAVELA header"), (primary, "primary header")):
        if hdr is None or "AIRORVAC" not in hdr:
            continue
        value = str(hdr["AIRORVAC"]).strip().lower()
        if value not in _MEDIA:
            raise ExposureError(path, f"{where} AIRORVAC",
                                f"value {value!r} is neither 'air' nor 'vac'")
        found[where] = value
    media = {_MEDIA[v] for v in found.values()}
    if len(media) > 1:
        raise ExposureError(path, "primary header AIRORVAC",
                            f"{found['primary header']!r} contradicts the WAVELA header's "
                            f"AIRORVAC {found['WAVELA header']!r}")
    return media.pop() if media else "air"


def _wcs_wavelength(header, nspec, path):
    if "CRVAL1" not in header:
        raise ExposureError(path, "HDU WAVELA",
                            "missing, and the primary header has no linear wavelength solution "
                            "(CRVAL1, CDELT1 or CD1_1, CRPIX1)")
    ctype = str(header.get("CTYPE1", "Wavelength")).strip().upper()
    if ctype not in ("WAVELENGTH", "WAVE", "AWAV", "LINEAR", ""):
        raise ExposureError(path, "primary header CTYPE1",
                            f"{ctype!r} is not a linear wavelength axis ('Wavelength')")
    delta_key = "CDELT1" if "CDELT1" in header else "CD1_1"
    if delta_key not in header:
        raise ExposureError(path, "primary header", "CRVAL1 present but neither CDELT1 nor CD1_1")
    crval = _header_value(header, ("CRVAL1",), path, True)
    delta = _header_value(header, (delta_key,), path, True)
    crpix = _header_value(header, ("CRPIX1",), path, False)
    crpix = 1.0 if crpix is None else crpix
    factor = _unit_factor(header.get("CUNIT1", "Angstrom"), path, "primary header CUNIT1")
    pix = np.arange(nspec, dtype=np.float64) + 1.0
    return factor * (crval + (pix - crpix) * delta)


def _check_wavelength(wave, path, where):
    finite = np.isfinite(wave)
    if not finite.any():
        raise ExposureError(path, where, "no finite wavelength")
    if not finite.all():
        # One solution for every fiber: a pixel without a wavelength cannot be placed.
        raise ExposureError(path, where, f"wavelength of pixel {int(np.flatnonzero(~finite)[0])} "
                            "is not finite (NaN or inf)")
    w = wave
    if np.any(np.diff(w) <= 0):
        raise ExposureError(path, where, "wavelengths do not increase along the pixel axis")
    lo, hi = _PLAUSIBLE_RANGE
    if w[0] < lo or w[-1] > hi:
        hint = " (values look like nm labelled as Angstrom)" if w[-1] < lo else ""
        raise ExposureError(path, where, f"wavelengths {w[0]:.6g}-{w[-1]:.6g} Angstrom are "
                            f"outside the plausible {lo:.0f}-{hi:.0f} Angstrom{hint}")


def _fibres(hdu, nfib, path):
    where = f"HDU {hdu.name}"
    if not isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
        raise ExposureError(path, where, f"is not a table ({type(hdu).__name__}); expected a "
                            "binary table with one row per fiber")
    data = _data(hdu, path, hdu.name)
    if len(data) != nfib:
        raise ExposureError(path, where, f"has {len(data)} rows but the primary has {nfib} fibers")
    names = {c.name.upper(): c for c in hdu.columns}
    if "TYPE" not in names:
        raise ExposureError(path, f"{where} column TYPE", "missing")
    coords = {}
    types = np.char.strip(np.asarray(data[names["TYPE"].name]).astype(str))
    unknown = ~np.isin(types, list(FIBER_TYPES))
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ExposureError(path, f"{where} column TYPE row {row}",
                            f"unknown fiber type {str(types[row])!r} "
                            f"(valid: {', '.join(FIBER_TYPES)})")
    coords["fiber_type"] = types.astype("<U1")
    if "NAME" in names:
        coords["fiber_name"] = np.char.strip(np.asarray(data[names["NAME"].name]).astype(str))
    else:
        coords["fiber_name"] = np.full(nfib, "")
    for key in ("RA", "DEC"):
        if key in names:
            col = names[key]
            try:
                values = np.asarray(data[col.name], dtype=np.float64)
            except (TypeError, ValueError):
                raise ExposureError(path, f"{where} column {key}", "is not numeric") from None
            if str(col.unit or "").strip().lower() in ("rad", "radian", "radians"):
                values = np.degrees(values)
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
            coords[key.lower()] = values
        else:
            coords[key.lower()] = np.full(nfib, np.nan)
    if "OBJID" in names:
        coords["objid"] = _objid_column(np.asarray(data[names["OBJID"].name]), path,
                                        f"{where} column OBJID")
    else:
        coords["objid"] = np.full(nfib, -1, dtype=np.int64)
    result = {}
    for key, name in _FIBRES_COLUMNS.items():
        result[name] = xr.Variable("fiber", coords[name], {"fits_column": key})
    result["ra"].attrs["units"] = "deg"
    result["dec"].attrs["units"] = "deg"
    # Keep every other scalar column so the calibrated file carries the table unchanged.
    for col in hdu.columns:
        if col.name.upper() in _FIBRES_COLUMNS:
            continue
        values = np.asarray(data[col.name])
        if values.ndim != 1:
            continue
        if values.dtype.kind in "SU":
            values = np.char.strip(values.astype(str))
        attrs = {"fits_column": col.name}
        if col.unit:
            attrs["units"] = str(col.unit)
        result[f"fibres_{col.name.lower()}"] = xr.Variable("fiber", values, attrs)
    return result


def _objid_column(values, path, where):
    """OBJIDs as int64; floats must be whole (a NaN or 12.5 is no catalog objid)."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
    else:
        text = np.char.strip(values.astype(str))
        bad = ~np.char.isdigit(np.char.lstrip(text, "+-")) | (np.char.str_len(text) == 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ExposureError(path, f"{where} row {row}",
                            f"value {values[row].item()!r} is not an integer (use -1 for none)")
    return values.astype(np.int64) if values.dtype.kind == "f" else text.astype(np.int64)


def _read(path):
    """Read and validate a RED file; return plain arrays and metadata."""
    path = os.fspath(path)
    # Astropy warns about damaged files before failing; the failure becomes our error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        return _read_hdus(path)


def _raw_wavelength(hdul, path, nfib, nspec):
    """The wavelength solution as written: (wave in Angstrom, source, medium, raw).

    From WAVELA, shape (nspec,), (1, nspec) or (nfib, nspec), else from the primary header's
    linear WCS; not yet checked or converted to air. ``raw`` is None for a WCS, else
    (the WAVELA data as in the file, its header as text), so that products keep them.
    """
    header = hdul[0].header
    wave_hdu = _find_hdu(hdul, path, ("WAVELA",), required=False)
    medium = _medium(header, None if wave_hdu is None else wave_hdu.header, path)
    if wave_hdu is None:
        return _wcs_wavelength(header, nspec, path), "primary header WCS", medium, None
    data = np.asarray(_data(wave_hdu, path, "WAVELA"))
    wave = data.astype(np.float64)
    if wave.shape not in ((nspec,), (1, nspec), (nfib, nspec)):
        raise ExposureError(path, "HDU WAVELA", f"shape {wave.shape} matches neither "
                            f"({nspec},) nor the primary's {(nfib, nspec)}")
    wave = wave * _unit_factor(wave_hdu.header.get("BUNIT", "Angstrom"), path,
                               "HDU WAVELA BUNIT")
    return wave, "WAVELA", medium, (data.copy(), wave_hdu.header.tostring(sep="\n"))


def _read_hdus(path):
    with _open_hdulist(path) as hdul:
        primary = hdul[0]
        flux = _data(primary, path, "PRIMARY")
        if flux.ndim != 2:
            raise ExposureError(path, "HDU PRIMARY",
                                f"expected a 2-D (fiber, pixel) image, got shape {flux.shape}")
        nfib, nspec = flux.shape
        _check_width(path, nspec)
        var_hdu = _find_hdu(hdul, path, ("VARIANCE",))
        variance = _data(var_hdu, path, "VARIANCE")
        if variance.shape != flux.shape:
            raise ExposureError(path, "HDU VARIANCE",
                                f"shape {variance.shape} differs from the primary's {flux.shape}")
        header = primary.header
        wave, source, medium, raw = _raw_wavelength(hdul, path, nfib, nspec)
        fib_hdu = _find_hdu(hdul, path, FIBRES_EXTNAMES)
        fibres = _fibres(fib_hdu, nfib, path)
        meta = {
            "expid": str(header.get("EXPID", "") or Path(path).name.split(".")[0]),
            **_exposure_keywords(header, path),
            "bunit": str(header.get("BUNIT", "counts")),
            "lsf": _line_spread(header, path),
            "fibres_extname": fib_hdu.name,
            "wavelength_source": source,
            "medium_in": medium,
            "wavela": raw,
            "fits_header": header.tostring(sep="\n"),
        }
        cal = None
        cal_hdu = _find_hdu(hdul, path, ("FLUXCAL",), required=False)
        if cal_hdu is not None:
            cal = _data(cal_hdu, path, "FLUXCAL")
            cal = {name: np.asarray(cal[name]) for name in cal.columns.names}
            for name in ("FCALFAC", "FCALFVAR"):
                hdu = _find_hdu(hdul, path, (name,), required=False)
                if hdu is not None:
                    cal[name] = np.asarray(_data(hdu, path, name), dtype=np.float64)
            meta["fluxcal"] = {k: header.get(k) for k in
                               ("FCALVER", *(v[0] for v in CALIBRATION_KEYWORDS.values()))}
        return np.asarray(flux), np.asarray(variance), wave, fibres, meta, cal


def _fiber_wavelengths(wave, nfib, path, source="WAVELA"):
    """Each fiber's own pixel wavelengths (nfib, nspec) and the reference grid (nspec,).

    A 1-D solution (or a WCS) is every fiber's. Per-fiber rows are kept as they are (no
    pixel is resampled); a pixel without a wavelength (NaN) is a pixel without data, a row
    without any a fiber without a solution. The reference grid, on which the calibration
    vector is given, is the median of the rows; it needs a wavelength at every pixel.
    """
    where = "HDU WAVELA" if source == "WAVELA" else source
    if wave.ndim == 1 or wave.shape[0] == 1:
        wave = wave.reshape(-1)
        _check_wavelength(wave, path, where)
        return np.broadcast_to(wave, (nfib, wave.size)).copy(), wave
    finite = np.isfinite(wave)
    if np.any(finite & ~(wave > 0)):
        row, col = (int(i[0]) for i in np.nonzero(finite & ~(wave > 0)))
        raise ExposureError(path, f"{where} row {row}",
                            f"wavelength {wave[row, col]!r} of pixel {col} is not positive")
    rows = np.flatnonzero(finite.any(axis=1))
    if not rows.size:
        raise ExposureError(path, where, "no fiber has a finite wavelength solution")
    # Each row's finite pixels must increase and lie in the plausible range: all rows at
    # once, the first offending row checked alone for its message.
    lo, hi = _PLAUSIBLE_RANGE
    filled = np.where(finite, wave, np.nan)
    step = np.diff(filled, axis=1)
    bad = (np.any(step <= 0, axis=1) | (np.nanmin(np.where(finite, wave, np.inf), axis=1) < lo)
           | (np.nanmax(np.where(finite, wave, -np.inf), axis=1) > hi))
    bad &= finite.any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        _check_wavelength(wave[row][finite[row]], path, f"{where} row {row}")
    with warnings.catch_warnings():  # all-NaN columns are reported just below
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = np.nanmedian(wave[rows], axis=0)
    _check_wavelength(reference, path, f"{where} (median of the rows)")
    return np.where(finite, wave, np.nan), reference


def _unsolved(fiber_wave, fiber_type):
    """Fibers (not dead or unused) with pixels that have no wavelength: {fiber: pixels}."""
    missing = (~np.isfinite(fiber_wave)).sum(axis=1)
    live = ~np.isin(fiber_type, ("D", "N", "U"))
    return {int(f): int(missing[f]) for f in np.flatnonzero((missing > 0) & live)}


def open_exposure(path, *, chunks=None):
    """Open a RED file (formats contract section 1) as an xarray Dataset.

    Parameters
    ----------
    path : path-like
        The FITS file.
    chunks : dict or None
        If given, the data variables are Dask arrays with these chunks (e.g.
        ``{"fiber": 4}``); the file is read once, eagerly, before chunking.

    Returns
    -------
    xarray.Dataset
        Dims (fiber, wavelength): ``flux`` (counts), ``variance`` (counts^2; NaN where the
        file says bad, NaN or <= 0), ``good`` (bool: finite flux, finite variance > 0);
        coordinates ``fiber_wavelength`` (fiber, wavelength: each fiber's own pixels, from
        WAVELA or the primary header's linear WCS, in Angstrom and air, vacuum and nm
        converted; NaN where the file gives no wavelength, which makes the pixel bad) and
        ``wavelength`` (the reference grid: the median of the fibers' solutions, on which
        calibration vectors are given); per-fiber ``fiber_name``, ``fiber_type``, ``ra``,
        ``dec`` (deg), ``objid``; attrs ``expid``, ``exptime``, ``mjd``, ``airmass``,
        ``seeing`` (optional SEEING: arcsec FWHM; NaN when absent), the
        line-spread description (``lsf_fwhm_coeffs``), ``wavelength_layout`` ('shared',
        'per-fiber' or 'wcs'), ``unsolved`` ({fiber: pixels without a wavelength}) and
        ``history``. No pixel is resampled. A calibrated file (section 4) also gives
        ``cal``, ``cal_variance`` and ``cal_mask`` along wavelength, and ``cal_factor``,
        ``cal_factor_variance`` (fiber, wavelength): the factor applied to each pixel.

    Raises
    ------
    ExposureError
        When the file does not follow the contract; the message names the file, the HDU,
        column or keyword, and the problem.
    """
    flux, variance, wave, fibres, meta, cal = _read(path)
    history = []
    flux = flux.astype(np.float64)
    variance = variance.astype(np.float64)
    fiber_wave, wave = _fiber_wavelengths(wave, flux.shape[0], path, meta["wavelength_source"])
    if meta["medium_in"] == "vac":
        wave, fiber_wave = vacuum_to_air(wave), vacuum_to_air(fiber_wave)
        history.append("converted vacuum wavelengths to air (Morton 2000)")
    unsolved = _unsolved(fiber_wave, fibres["fiber_type"].values)
    good = (np.isfinite(flux) & np.isfinite(variance) & (variance > 0)
            & np.isfinite(fiber_wave))
    # A bad pixel's variance (<= 0 in the file) becomes NaN: arithmetic on it (calibration
    # adds a positive term) must not turn it into a plausible value and the pixel into a good one.
    with np.errstate(invalid="ignore"):
        variance = np.where(variance > 0, variance, np.nan)
    if not good.any():
        raise ExposureError(path, "HDU PRIMARY/VARIANCE",
                            "no valid pixel (every flux is NaN or every variance <= 0)")
    lsf = meta["lsf"]
    fwhm = lsf.fwhm(wave)  # every pixel: a polynomial can dip below zero between the ends
    if np.any(~np.isfinite(fwhm)) or np.any(fwhm <= 0):
        raise ExposureError(path, f"primary header {lsf.source}",
                            f"line-spread FWHM is not positive over {wave[0]:.0f}-{wave[-1]:.0f} A")
    counts = meta["bunit"].strip().lower() in ("counts", "count", "adu", "")
    units = "count" if counts else meta["bunit"]
    var_units = "count2" if units == "count" else f"({units})**2"
    ds = xr.Dataset(
        {
            "flux": (("fiber", "wavelength"), flux.astype(np.float32), {"units": units}),
            "variance": (("fiber", "wavelength"), variance.astype(np.float32),
                         {"units": var_units}),
            "good": (("fiber", "wavelength"), good,
                     {"description": "finite flux and finite variance > 0"}),
        },
        coords={
            "fiber": ("fiber", np.arange(flux.shape[0]),
                      {"description": "row of the primary image"}),
            "wavelength": ("wavelength", wave, {"units": "Angstrom", "medium": "air",
                                                "source": meta["wavelength_source"],
                                                "description": "reference pixel grid: the "
                                                "median of the fibers' solutions"}),
            "fiber_wavelength": (("fiber", "wavelength"), fiber_wave,
                                 {"units": "Angstrom", "medium": "air",
                                  "description": "each fiber's own pixel wavelengths (NaN: "
                                  "no solution)"}),
            **fibres,
        },
    )
    ds.attrs.update({
        "source": os.fspath(path),
        "expid": meta["expid"],
        "exptime": meta["exptime"],
        "mjd": meta["mjd"],
        "airmass": np.nan if meta["airmass"] is None else meta["airmass"],
        "seeing": np.nan if meta["seeing"] is None else meta["seeing"],
        **lsf.to_attrs(),
        "wavelength_source": meta["wavelength_source"],
        "wavelength_layout": ("wcs" if meta["wavela"] is None else
                              "per-fiber" if np.ndim(meta["wavela"][0]) == 2
                              and meta["wavela"][0].shape[0] > 1 else "shared"),
        "wavela": meta["wavela"],
        "unsolved": unsolved,
        "medium_in": meta["medium_in"],
        "fibres_extname": meta["fibres_extname"],
        "fits_header": meta["fits_header"],
        "history": [],
    })
    for text in history:
        add_history(ds, text)
    if cal is not None:
        _attach_calibration(ds, cal, meta["fluxcal"], path)
    if chunks is not None:
        # Only the data: per-fiber metadata stays in memory, read without computing anything.
        ds = ds.assign({name: ds[name].chunk(chunks) for name in ds.data_vars})
    return ds


def _attach_calibration(ds, cal, keys, path):
    needed = ("WAVELENGTH", "CAL_FACTOR", "CAL_VARIANCE", "MASK")
    missing = [c for c in needed if c not in cal]
    if missing:
        raise ExposureError(path, "HDU FLUXCAL", f"missing column(s) {', '.join(missing)}")
    if len(cal["WAVELENGTH"]) != ds.sizes["wavelength"]:
        raise ExposureError(path, "HDU FLUXCAL", f"has {len(cal['WAVELENGTH'])} rows, expected "
                            f"{ds.sizes['wavelength']} (one per pixel)")
    ds["cal"] = ("wavelength", cal["CAL_FACTOR"].astype(np.float64), {"units": CAL_UNIT})
    ds["cal_variance"] = ("wavelength", cal["CAL_VARIANCE"].astype(np.float64),
                          {"units": f"({CAL_UNIT})**2"})
    ds["cal_mask"] = ("wavelength", cal["MASK"].astype(bool), {"description": "True = reliable"})
    for name, var in (("FCALFAC", "cal_factor"), ("FCALFVAR", "cal_factor_variance")):
        if name in cal:
            if cal[name].shape != ds["flux"].shape:
                raise ExposureError(path, f"HDU {name}", f"shape {cal[name].shape} differs from "
                                    f"the primary's {ds['flux'].shape}")
            ds[var] = (("fiber", "wavelength"), cal[name])
    ds.attrs.update({"fluxcal": True, "fcalver": keys.get("FCALVER")})
    for attr, (key, kind, _) in CALIBRATION_KEYWORDS.items():
        value = keys.get(key)
        if kind is float and value is not None and value == -1:
            value = np.nan
        ds.attrs[attr] = value
    ds.attrs["fcalsrc"] = ds.attrs.get("fcalsrc") or "standards"


# Words that make a BUNIT a flux density (astropy does not parse every spelling in use:
# 'erg/s/cm^2/A' reads as per Ampere).
_FLUX_WORDS = ("erg", "jy", "jansky", "watt", "w/m", "w m-2", "w/(m")


def _is_flux_unit(text):
    text = str(text).strip().lower()
    return bool(text) and any(word in text for word in _FLUX_WORDS)


def calibration_marks(ds):
    """What says that an opened exposure is already flux-calibrated (contract section 4).

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`open_exposure`.

    Returns
    -------
    list of (str, str)
        (place, what) for each mark found: the FLUXCAL table, ``FLUXCAL = T`` and a BUNIT in
        flux-density units; empty for a RED file. A product stripped of one mark keeps the
        others.
    """
    header = fits.Header.fromstring(ds.attrs.get("fits_header", ""), sep="\n")
    marks = []
    if "cal" in ds:
        marks.append(("HDU FLUXCAL", "FLUXCAL table present"))
    if header.get("FLUXCAL") is True:
        marks.append(("primary header FLUXCAL", "FLUXCAL = T"))
    if _is_flux_unit(header.get("BUNIT", "")):
        marks.append(("primary header BUNIT", f"BUNIT = {str(header['BUNIT']).strip()!r} "
                      "(a flux density, not counts)"))
    return marks


def read_exposure_info(path):
    """Read what is needed to plan work on an exposure, without its flux.

    Parameters
    ----------
    path : path-like
        A RED file.

    Returns
    -------
    dict
        ``expid``, ``mjd``, ``exptime``, ``airmass``, ``lsf`` (:class:`LineSpread`),
        ``nfiber``, ``npixel``, ``wave_range`` (first and last wavelength of the median
        solution, Angstrom, air) and ``setup``: a key shared by every exposure with the same
        wavelength grid and line-spread function.
    """
    path = os.fspath(path)
    with _open_hdulist(path) as hdul:
        header = hdul[0].header
        if header.get("NAXIS", 0) != 2:
            raise ExposureError(path, "HDU PRIMARY", "expected a 2-D (fiber, pixel) image")
        nfib, nspec = header["NAXIS2"], header["NAXIS1"]
        _check_width(path, nspec)
        # An ambiguous file (two VARIANCE or FIBRES extensions) is refused when the survey is
        # planned, not later on a worker.
        for names in (("VARIANCE",), FIBRES_EXTNAMES):
            _find_hdu(hdul, path, names, required=False)
        wave, source, medium, _ = _raw_wavelength(hdul, path, nfib, nspec)
        if source == "WAVELA":
            wave = wave.reshape(-1, nspec)
            if wave.shape[0] > 1:
                with warnings.catch_warnings():  # an all-NaN column is reported just below
                    warnings.simplefilter("ignore", RuntimeWarning)
                    wave = np.nanmedian(wave, axis=0)
            else:
                wave = wave[0]
        _check_wavelength(wave, path, "wavelength solution")
        if medium == "vac":
            wave = vacuum_to_air(wave)
        lsf = _line_spread(header, path)
        info = {
            "path": path,
            "expid": str(header.get("EXPID", "") or Path(path).name.split(".")[0]),
            **_exposure_keywords(header, path),
            "lsf": lsf,
            "nfiber": int(nfib),
            "npixel": int(nspec),
            "wave_range": (float(wave[0]), float(wave[-1])),
        }
    info["setup"] = setup_key(wave, lsf)
    return info


def setup_key(wavelength, lsf):
    """A short key naming an instrument setup: wavelength grid (to 1e-3 A) and LSF."""
    wave = np.round(np.asarray(wavelength, dtype=np.float64), 3)
    digest = hashlib.sha1(wave.tobytes() + lsf.key().encode()).hexdigest()[:10]
    return f"n{wave.size}-{digest}"


def exposure_setup(ds):
    """The setup key of an opened exposure (see :func:`read_exposure_info`)."""
    return setup_key(ds["wavelength"].values, LineSpread.from_attrs(ds.attrs))


# ----------------------------------------------------------------------------- writing


def red_hdulist(flux, variance, fibres, header=None, *, wavelength=None, wavelength_header=None,
                fibres_extname="FIBRES"):
    """Assemble a RED-file HDU list (formats contract section 1) from plain arrays.

    Parameters
    ----------
    flux, variance : numpy.ndarray, shape (nfib, nspec)
        Primary image and VARIANCE, written as float32.
    fibres : dict of str to array or astropy.table.Table
        FIBRES columns (NAME, TYPE, RA, DEC, OBJID, ...), one row per fiber; a dict value
        may be an :class:`astropy.io.fits.Column` to control format and unit.
    header : dict or astropy.io.fits.Header, optional
        Primary header keywords (EXPTIME, MJD-OBS, SPECFWHM or FWHMPCk, WCS, ...).
    wavelength : numpy.ndarray, optional
        WAVELA data, (nspec,) or (nfib, nspec); omitted when the header carries a WCS.
    wavelength_header : dict, optional
        WAVELA header keywords (BUNIT, AIRORVAC).
    fibres_extname : str
        'FIBRES' or 'FIBRES_IFU'.

    Returns
    -------
    astropy.io.fits.HDUList
    """
    primary = fits.PrimaryHDU(np.asarray(flux, dtype=np.float32),
                              header=fits.Header(header) if header is not None else None)
    hdus = [primary, fits.ImageHDU(np.asarray(variance, dtype=np.float32), name="VARIANCE")]
    if wavelength is not None:
        wave_hdu = fits.ImageHDU(np.asarray(wavelength, dtype=np.float64), name="WAVELA")
        for key, value in (wavelength_header or {"BUNIT": "Angstrom"}).items():
            wave_hdu.header[key] = value
        hdus.append(wave_hdu)
    if isinstance(fibres, fits.BinTableHDU):
        table = fibres
        table.name = fibres_extname
    elif hasattr(fibres, "columns") and not isinstance(fibres, dict):
        table = fits.table_to_hdu(fibres)
        table.name = fibres_extname
    else:
        cols = [v if isinstance(v, fits.Column) else _column(k, np.asarray(v))
                for k, v in fibres.items()]
        table = fits.BinTableHDU.from_columns(cols, name=fibres_extname)
    hdus.append(table)
    return fits.HDUList(hdus)


def _column(name, values, unit=None):
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


def _fibres_table(ds):
    cols = []
    for coord in ds.coords.values():
        if coord.dims != ("fiber",) or "fits_column" not in coord.attrs:
            continue
        cols.append(_column(coord.attrs["fits_column"], np.asarray(coord.values),
                            coord.attrs.get("units")))
    return fits.BinTableHDU.from_columns(cols, name=ds.attrs.get("fibres_extname", "FIBRES"))


def _primary_header(ds):
    """The input's primary header (its WCS and AIRORVAC as they were), data keywords removed."""
    text = ds.attrs.get("fits_header")
    header = fits.Header.fromstring(text, sep="\n") if text else fits.Header()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND"):
        header.remove(key, ignore_missing=True)
    return header


def _wavelength_hdu(ds):
    """The WAVELA extension of a product: the input's, as it was (values, unit, medium);
    None when the input had only a linear WCS (kept in the primary header)."""
    layout = ds.attrs.get("wavelength_layout")
    if layout == "wcs":
        return None
    raw = ds.attrs.get("wavela")
    if raw is not None:
        data, text = raw
        hdu = fits.ImageHDU(np.asarray(data), name="WAVELA")
        for card in fits.Header.fromstring(text, sep="\n").cards:
            if card.keyword not in hdu.header and card.keyword not in (
                    "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT"):
                hdu.header.append(card)
        return hdu
    # Built in memory: each fiber's wavelengths (air), 1-D when they are all the same.
    fiber_wave = ds["fiber_wavelength"].values if "fiber_wavelength" in ds.coords else None
    same = fiber_wave is None or np.array_equal(
        fiber_wave, np.broadcast_to(ds["wavelength"].values, fiber_wave.shape))
    hdu = fits.ImageHDU(ds["wavelength"].values if same else fiber_wave, name="WAVELA")
    hdu.header["BUNIT"] = "Angstrom"
    hdu.header["AIRORVAC"] = "air"
    return hdu


def _calibration_table(ds):
    """The contract's FLUXCAL table: the vector on the reference grid, in the input's medium."""
    wave = ds["wavelength"].values
    medium = ds.attrs.get("medium_in", "air")
    if medium == "vac":
        wave = air_to_vacuum(wave)
    cal = fits.BinTableHDU.from_columns([
        fits.Column("WAVELENGTH", "D", unit="Angstrom", array=wave),
        fits.Column("CAL_FACTOR", "D", unit=CAL_UNIT, array=ds["cal"].values),
        fits.Column("CAL_VARIANCE", "D", unit=f"({CAL_UNIT})**2", array=ds["cal_variance"].values),
        fits.Column("MASK", "I", array=ds["cal_mask"].values.astype(np.int16)),
    ], name="FLUXCAL")
    cal.header["AIRORVAC"] = (medium, "medium of WAVELENGTH (the input's)")
    cal.header["COMMENT"] = ("The vector on the reference grid (the median of the fibers' "
                             "wavelength solutions); each fiber's own factor is in FCALFAC.")
    cal.header["COMMENT"] = "MASK: 1 = reliable, 0 = interpolated over a gap or unconstrained"
    return cal


def _factor_hdus(ds):
    """FCALFAC and FCALFVAR: the factor applied to every pixel of every fiber, its variance."""
    factor = fits.ImageHDU(ds["cal_factor"].values.astype(np.float64), name="FCALFAC")
    factor.header["BUNIT"] = CAL_UNIT
    factor.header["COMMENT"] = ("Calibrated flux = counts x FCALFAC, pixel by pixel, each fiber "
                                "on its own wavelengths (HDU WAVELA or the primary WCS).")
    variance = fits.ImageHDU(ds["cal_factor_variance"].values.astype(np.float64),
                             name="FCALFVAR")
    variance.header["BUNIT"] = f"({CAL_UNIT})**2"
    variance.header["COMMENT"] = "Variance of FCALFAC."
    return [factor, variance]


def _write_fits(hdus, path):
    """Write HDUs as a new FITS file, their binary tables first put in FITS (big-endian)
    byte order, in place.

    astropy keeps table data in the machine's order and converts them when writing: for
    vector columns element by element, in Python (20 ms of the 50 ms a product took, for the
    FCALSTAR table of 3 stars x 4096 pixels); data already big-endian are written as they
    are, and the file is byte for byte the same. The tables' columns then no longer read
    right in memory: the HDUs are for this write only.
    """
    for hdu in hdus:
        data = hdu.data if isinstance(hdu, fits.BinTableHDU) else None
        if data is not None and data.dtype != data.dtype.newbyteorder(">"):
            data.byteswap(inplace=True)
            data.dtype = data.dtype.newbyteorder(">")
    fits.HDUList(hdus).writeto(path, overwrite=True, output_verify="exception")


def write_calibrated(ds, path, *, overwrite=False, stars=None):
    """Write a calibrated exposure (formats contract section 4), atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        A calibrated exposure as returned by :func:`kspec_fluxcal.apply_calibration`: ``flux``
        and ``variance`` in flux density, ``cal``, ``cal_variance``, ``cal_mask`` along
        wavelength, attrs ``fcalnstr``, ``fcalrms``, ``history``, plus the attrs of
        :func:`open_exposure`.
    path : path-like
        Output FITS file.
    overwrite : bool
        Replace an existing file (atomically); otherwise refuse.
    stars : xarray.Dataset or astropy.io.fits.BinTableHDU, optional
        Per-star results of :func:`kspec_fluxcal.fit_standards`, written as the extra binary
        table FCALSTAR (one row per standard star) for quality control; or such a table
        already made (kept from an earlier product of the same exposure).

    Raises
    ------
    OutputExistsError
        When ``path`` exists and ``overwrite`` is false.
    ValueError
        When ``ds`` carries no calibration.
    """
    missing = [v for v in ("flux", "variance", "cal", "cal_variance", "cal_mask") if v not in ds]
    if missing:
        raise ValueError(f"dataset has no {', '.join(missing)}: calibrate it first "
                         "(kspec_fluxcal.apply_calibration)")
    ds = ds.compute()
    header = _primary_header(ds)
    header["BUNIT"] = FLUX_UNIT
    if ds.attrs.get("expid"):
        header["EXPID"] = str(ds.attrs["expid"])
    header["FLUXCAL"] = (True, "flux calibrated by kspec-fluxcal")
    header["FCALVER"] = (__version__, "kspec-fluxcal version")
    defaults = {"fcalnstr": 0, "fcalrms": np.nan, "fcalsrc": "standards"}
    for attr, (key, kind, comment) in CALIBRATION_KEYWORDS.items():
        value = ds.attrs.get(attr, defaults.get(attr))
        if value is None:
            continue
        value = kind(value)
        if kind is float and not np.isfinite(value):
            value = -1.0
        header[key] = (value, comment)
    for text in ds.attrs.get("history", []):
        header.add_history(text)
    header["COMMENT"] = ("Calibrated on each fiber's own pixels; factors in HDU FCALFAC, "
                         "variance FCALFVAR; per-star fits in FCALSTAR (kspec-fluxcal README)")
    primary = fits.PrimaryHDU(ds["flux"].values.astype(np.float32), header=header)
    var = fits.ImageHDU(ds["variance"].values.astype(np.float32), name="VARIANCE")
    var.header["BUNIT"] = f"({FLUX_UNIT})**2"
    wave = _wavelength_hdu(ds)
    hdus = [primary, var, *([wave] if wave is not None else []), _fibres_table(ds),
            _calibration_table(ds)]
    if "cal_factor" in ds:
        hdus += _factor_hdus(ds)
    if stars is not None:
        hdus.append(stars if isinstance(stars, fits.BinTableHDU) else star_table(stars))
    with atomic_file(path, overwrite=overwrite) as tmp:
        _write_fits(hdus, tmp)
    return Path(path)


def star_table(stars):
    """Per-star results as the FCALSTAR binary table (one row per standard star).

    Scalar per-star variables become columns; (star, wavelength) variables become vector
    columns; (star, band) variables become vector columns with the band names in the header;
    (star, xp_wavelength) variables (Gaia XP spectra) become vector columns ``XP_*`` with their
    wavelengths in the vector column XP_WAVELENGTH (the same on every row) and NXPWAVE in the
    header.
    """
    stars = stars.compute()
    nwave = stars.sizes.get("wavelength", 0)
    cols = []
    if "xp_wavelength" in stars.dims:
        xp_wave = np.asarray(stars["xp_wavelength"].values, dtype=np.float64)
        cols.append(fits.Column("XP_WAVELENGTH", f"{xp_wave.size}D", unit="Angstrom",
                                array=np.broadcast_to(xp_wave, (stars.sizes["star"],
                                                                xp_wave.size))))
    # Variables, not DataArrays: building a DataArray per column costs more than the file.
    for name, var in stars.variables.items():
        if name in ("star", "wavelength", "band", "xp_wavelength") or "star" not in var.dims:
            continue
        if var.dims[0] != "star":
            var = var.transpose("star", ...)
        values = np.asarray(var.values)
        fits_name = name.upper()
        if values.ndim == 1:
            cols.append(_column(fits_name, values, var.attrs.get("units")))
        elif values.ndim == 2 and values.dtype.kind in "fiub":
            fmt = "L" if values.dtype.kind == "b" else "D"
            cols.append(fits.Column(fits_name, f"{values.shape[1]}{fmt}",
                                    array=values if fmt == "L" else values.astype(np.float64),
                                    unit=var.attrs.get("units")))
    table = fits.BinTableHDU.from_columns(cols, name="FCALSTAR")
    if "band" in stars.dims:
        table.header["BANDS"] = ",".join(str(b) for b in stars["band"].values)
    table.header["NWAVE"] = nwave
    if "xp_wavelength" in stars.dims:
        table.header["NXPWAVE"] = stars.sizes["xp_wavelength"]
    return table


def read_standard_stars(path):
    """Read the per-star results (FCALSTAR table) of a calibrated file written by
    :func:`write_calibrated`, as a Dataset like :func:`kspec_fluxcal.fit_standards` returns.

    Returns
    -------
    xarray.Dataset or None
        None when the file has no FCALSTAR extension.
    """
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        with _open_hdulist(path) as hdul:
            hdu = _find_hdu(hdul, path, ("FCALSTAR",), required=False)
            if hdu is None:
                return None
            data = _data(hdu, path, "FCALSTAR")
            header = hdu.header
            bands = [b for b in str(header.get("BANDS", "")).split(",") if b]
            nwave = int(header.get("NWAVE", 0))
            nxp = int(header.get("NXPWAVE", 0))
            variables, coords = {}, {}
            for col in hdu.columns:
                values = np.asarray(data[col.name])
                name = col.name.lower()
                attrs = {"units": str(col.unit)} if col.unit else {}
                if name == "xp_wavelength" and values.ndim == 2 and values.shape[0]:
                    coords[name] = (name, values[0], {"units": "Angstrom", "medium": "air"})
                elif name.startswith("xp_") and nxp and values.ndim == 2 \
                        and values.shape[1] == nxp:
                    variables[name] = (("star", "xp_wavelength"), values, attrs)
                elif values.ndim == 1:
                    if values.dtype.kind in "SU":
                        values = np.char.strip(values.astype(str))
                    coords[name] = ("star", values, attrs)
                elif values.shape[1] == nwave and nwave != len(bands):
                    variables[name] = (("star", "wavelength"), values, attrs)
                elif values.shape[1] == len(bands):
                    variables[name] = (("star", "band"), values, attrs)
                else:
                    variables[name] = (("star", "wavelength"), values, attrs)
    ds = xr.Dataset(variables, coords=coords)
    if "wavelength" in ds.dims:  # the reference grid (air) the vectors are on
        ds = ds.assign_coords(wavelength=open_exposure(path)["wavelength"].values)
    if bands:
        ds = ds.assign_coords(band=bands)
    return ds
