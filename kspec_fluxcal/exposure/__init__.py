"""Reduced exposures (RED files, formats contract section 1) as xarray Datasets.

An exposure is a Dataset with dims (fiber, wavelength): ``flux`` (counts), ``variance``,
``good`` (finite and variance > 0), a 1-D ``wavelength`` coordinate in Angstrom in air, and
per-fiber coordinates ``fiber_name``, ``fiber_type``, ``ra``, ``dec``, ``objid``. A calibrated
file (section 4) opens the same way, with its calibration; products are written by
:mod:`kspec_fluxcal.products`. The file's parts are read by :mod:`kspec_fluxcal.fits_file`
(HDUs), :mod:`kspec_fluxcal.exposure.header` (keywords, line spread),
:mod:`kspec_fluxcal.exposure.wavelengths` and :mod:`kspec_fluxcal.exposure.fibres`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import warnings

import numpy as np
import xarray as xr

from .. import __version__
from .._astropy import fits
from .._datasets import dataset
from ..constants import CAL_UNIT, CALIBRATION_KEYWORDS, CONFIGURATION_STEP
from ..errors import ExposureError
from ..fits_bytes import header_text, keep_extensions, read_plain
from ..fits_file import cards_named, find_hdu, fits_column, hdu_data, open_fits
from ..lsf import LineSpread
from ..wavelength import vacuum_to_air
from .fibres import FIBRES_EXTNAMES, fibres_coords
from .header import (
    COUNT_UNITS,
    check_line_spread,
    check_width,
    data_unit,
    exposure_id,
    exposure_keywords,
    is_flux_unit,
    line_spread,
)
from .wavelengths import (
    check_wavelength,
    fiber_wavelengths,
    median_of_rows,
    raw_wavelength,
    unsolved_pixels,
)

__all__ = [
    "open_exposure",
    "read_exposure_info",
    "red_hdulist",
    "exposure_setup",
    "setup_key",
    "configuration_key",
    "add_history",
    "calibration_marks",
]


def add_history(ds, text):
    """Append a timestamped HISTORY entry to ``ds.attrs['history']`` (in place) and return ds."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    entry = f"{stamp} kspec-fluxcal {__version__}: {text}"
    ds.attrs["history"] = [*ds.attrs.get("history", []), entry]
    return ds


def _computed(ds):
    """``ds`` with its Dask arrays computed; ``ds`` itself when it holds NumPy arrays only
    (``compute`` would copy every variable: 0.4 ms for a FCALSTAR table or a fit's stars).
    Indexes are pandas' (their ``data`` made an array of each: half of this check's time)."""
    if all(isinstance(v, xr.IndexVariable) or isinstance(v.data, np.ndarray)
           for v in ds.variables.values()):
        return ds
    return ds.compute()


def _read(path):
    """Read and validate a RED file; return plain arrays and metadata."""
    path = os.fspath(path)
    # A plain file is read from its bytes (fits_bytes: ~1 ms instead of astropy's ~5),
    # without importing astropy.
    hdul = read_plain(path, FIBRES_EXTNAMES)
    if hdul is not None:
        read = _read_hdus(hdul, path)
        # Its bytes, which the arrays read copy and do not modify, for the product's copy of
        # its extensions (products.write_calibrated)
        keep_extensions(path, hdul)
        return read
    # Astropy warns about damaged files before failing; the failure becomes our error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits().verify.VerifyWarning)
        return _read_hdus(open_fits(path), path)


def _read_hdus(hdul, path):
    """The arrays and metadata of the RED file ``path`` opened as ``hdul``, read and checked
    in one pass over its HDUs: (flux, variance, wavelength as read, FIBRES coordinates,
    metadata, FLUXCAL columns or None)."""
    # cards_named: a damaged card of another HDU's header (WAVELA's BUNIT) met reading it
    with hdul, cards_named(hdul, path):
        primary = hdul[0]
        flux = hdu_data(primary, path, "PRIMARY")
        if flux.ndim != 2:
            raise ExposureError(path, "HDU PRIMARY",
                                f"expected a 2-D (fiber, pixel) image, got shape {flux.shape}")
        nfib, nspec = flux.shape
        check_width(path, nspec)
        var_hdu = find_hdu(hdul, path, ("VARIANCE",))
        variance = hdu_data(var_hdu, path, "VARIANCE")
        if variance.shape != flux.shape:
            raise ExposureError(path, "HDU VARIANCE",
                                f"shape {variance.shape} differs from the primary's {flux.shape}")
        header = primary.header
        wave, source, medium, raw = raw_wavelength(hdul, path, nfib, nspec)
        fib_hdu = find_hdu(hdul, path, FIBRES_EXTNAMES)
        fibres = fibres_coords(fib_hdu, nfib, path)
        meta = {
            "expid": exposure_id(header, path),
            **exposure_keywords(header, path),
            "bunit": data_unit(header, path),
            "lsf": line_spread(header, path),
            "fibres_extname": fib_hdu.name,
            "wavelength_source": source,
            "medium_in": medium,
            "wavela": raw,
            "fits_header": header.tostring(sep="\n"),
            "variance_header": var_hdu.header.tostring(sep="\n"),
        }
        cal = None
        cal_hdu = find_hdu(hdul, path, ("FLUXCAL",), required=False)
        if cal_hdu is not None:
            cal = hdu_data(cal_hdu, path, "FLUXCAL")
            cal = {name: np.asarray(cal[name]) for name in cal.columns.names}
            for name in ("FCALFAC", "FCALFVAR"):
                hdu = find_hdu(hdul, path, (name,), required=False)
                if hdu is not None:
                    cal[name] = np.asarray(hdu_data(hdu, path, name), dtype=np.float64)
            meta["fluxcal"] = {k: header.get(k) for k in
                               ("FCALVER", *(v[0] for v in CALIBRATION_KEYWORDS.values()))}
        return np.asarray(flux), np.asarray(variance), wave, fibres, meta, cal


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
    fiber_wave, wave, history = _air_wavelengths(wave, flux.shape[0], path, meta)
    unsolved = unsolved_pixels(fiber_wave, fibres["fiber_type"].values)
    flux, variance, good = _valid_pixels(flux, variance, fiber_wave, path)
    check_line_spread(meta["lsf"], wave, path)
    ds = _dataset(flux, variance, good, wave, fiber_wave, fibres, meta)
    ds.attrs.update(_exposure_attrs(path, meta, unsolved))
    for text in history:
        add_history(ds, text)
    if cal is not None:
        _attach_calibration(ds, cal, meta["fluxcal"], path)
    if chunks is not None:
        # Only the data: per-fiber metadata stays in memory, read without computing anything.
        ds = ds.assign({name: ds[name].chunk(chunks) for name in ds.data_vars})
    return ds


def _air_wavelengths(wave, nfib, path, meta):
    """Each fiber's wavelengths and the reference grid, in air, from the solution as read.

    Returns (fiber_wave (nfib, nspec), reference (nspec,), history entries): vacuum
    wavelengths are converted to air, and the conversion recorded.
    """
    shared = wave.ndim == 1 or wave.shape[0] == 1
    fiber_wave, wave = fiber_wavelengths(wave, nfib, path, meta["wavelength_source"])
    if meta["medium_in"] != "vac":
        return fiber_wave, wave, []
    wave = vacuum_to_air(wave)
    # One solution for every fiber: converted once (the conversion is pixel by pixel), into
    # the rows fiber_wavelengths made (not a fresh 0.46 MB array for 14 x 4096)
    if shared:
        fiber_wave[...] = wave
    else:
        fiber_wave = vacuum_to_air(fiber_wave)
    return (fiber_wave, wave, ["vacuum wavelengths converted to air (Morton 2000) for the "
                               "calibration; the product keeps the file's own"])


def _valid_pixels(flux, variance, fiber_wave, path):
    """The flux and variance (as read) in float32 with NaN where they are not finite (and the
    variance where it is <= 0), and the good-pixel mask (finite flux, finite variance > 0, a
    wavelength); an exposure without one good pixel is an error.

    In the file's types, not float64: the float32 of a RED file converts exactly (the same
    values, tests and NaN), others through float64 as before (~0.2 ms of two conversions).
    A float32 file's (big-endian) arrays are made native first, then tested and set in
    place: the tests on native values take half the time (0.2 -> 0.1 ms, 14 x 4096)."""
    own = flux.dtype.kind == variance.dtype.kind == "f" and (
        flux.dtype.itemsize == variance.dtype.itemsize == 4)
    if own:
        flux, variance = (np.array(a, dtype=np.float32) for a in (flux, variance))
    usable = (variance > 0) & np.isfinite(variance)
    finite = np.isfinite(flux)
    good = finite & usable & np.isfinite(fiber_wave)
    # A bad pixel's variance (<= 0 in the file) becomes NaN: arithmetic on it (calibration
    # adds a positive term) must not turn it into a plausible value and the pixel into a good one.
    # An infinite count (the contract's "no data" is NaN) would reach the product as an
    # infinite flux: it is no data too.
    if own:
        np.copyto(variance, np.nan, where=~usable)
        np.copyto(flux, np.nan, where=~finite)
    else:
        variance = np.where(usable, variance, np.nan).astype(np.float32, copy=False)
        flux = np.where(finite, flux, np.nan).astype(np.float32, copy=False)
    if not good.any():
        raise ExposureError(path, "HDU PRIMARY/VARIANCE",
                            "no valid pixel (every flux is NaN or every variance <= 0)")
    return flux, variance, good


def _dataset(flux, variance, good, wave, fiber_wave, fibres, meta):
    """The exposure's Dataset (no attrs yet): flux and variance (float32, in the file's unit),
    good, the wavelength coordinates and the FIBRES coordinates."""
    flux, variance = flux.astype(np.float32, copy=False), variance.astype(np.float32, copy=False)
    counts = meta["bunit"].strip().lower() in COUNT_UNITS
    units = "count" if counts else meta["bunit"]
    var_units = "count2" if units == "count" else f"({units})**2"
    return dataset(
        {
            "flux": (("fiber", "wavelength"), flux, {"units": units}),
            "variance": (("fiber", "wavelength"), variance, {"units": var_units}),
            "good": (("fiber", "wavelength"), good,
                     {"description": "finite flux and finite variance > 0"}),
        },
        {
            "fiber": _fiber_coordinate(flux.shape[0]),
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


@functools.lru_cache(maxsize=8)
def _fiber_coordinate(nfib):
    """The ``fiber`` coordinate of ``nfib`` rows (0, 1, ...), made once per size: the
    Datasets share its pandas index (immutable, as a selection shares its source's) instead
    of each building its own from the values (~40 us per exposure). Their variables are
    shallow copies, each with its own attrs."""
    return xr.IndexVariable("fiber", np.arange(nfib), {"description": "row of the primary image"})


def _exposure_attrs(path, meta, unsolved):
    """The exposure's attrs (see :func:`open_exposure`) from the file's metadata."""
    wavela = meta["wavela"]
    return {
        "source": os.fspath(path),
        "expid": meta["expid"],
        "exptime": meta["exptime"],
        "mjd": meta["mjd"],
        "airmass": np.nan if meta["airmass"] is None else meta["airmass"],
        "seeing": np.nan if meta["seeing"] is None else meta["seeing"],
        **meta["lsf"].to_attrs(),
        "wavelength_source": meta["wavelength_source"],
        "wavelength_layout": ("wcs" if wavela is None else
                              "per-fiber" if np.ndim(wavela[0]) == 2
                              and wavela[0].shape[0] > 1 else "shared"),
        "wavela": wavela,
        "unsolved": unsolved,
        "medium_in": meta["medium_in"],
        "fibres_extname": meta["fibres_extname"],
        "fits_header": meta["fits_header"],
        "variance_header": meta["variance_header"],
        "history": [],
    }


def _attach_calibration(ds, cal, keys, path):
    """Add a calibrated file's vector (FLUXCAL), per-pixel factors (FCALFAC, FCALFVAR)
    and calibration keywords to ``ds``, in place."""
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
    text = ds.attrs.get("fits_header", "")
    # A plain header read by fits_bytes: ~0.05 ms instead of astropy's ~0.4 (every exposure)
    header = header_text(text)
    if header is None:
        header = fits().Header.fromstring(text, sep="\n")
    marks = []
    if "cal" in ds:
        marks.append(("HDU FLUXCAL", "FLUXCAL table present"))
    if header.get("FLUXCAL") is True:
        marks.append(("primary header FLUXCAL", "FLUXCAL = T"))
    if is_flux_unit(header.get("BUNIT", "")):
        marks.append(("primary header BUNIT", f"BUNIT = {str(header['BUNIT']).strip()!r} "
                      "(a flux density, not counts)"))
    return marks


def read_exposure_info(path, *, content=None):
    """Read what is needed to plan work on an exposure, without its flux.

    Parameters
    ----------
    path : path-like
        A RED file.
    content : bytearray, optional
        The file's bytes, when the caller has read them
        (:func:`kspec_fluxcal.fits_bytes.read_bytes`; the survey job hashes them): a plain
        file is not read again.

    Returns
    -------
    dict
        ``expid``, ``mjd``, ``exptime``, ``airmass``, ``lsf`` (:class:`LineSpread`),
        ``nfiber``, ``npixel``, ``wave_range`` (first and last wavelength of the median
        solution, Angstrom, air) and ``setup``: the instrument configuration
        (:func:`configuration_key`), shared by the exposures of a spectrograph setting
        whatever their own arc solutions and line spreads.
    """
    path = os.fspath(path)
    # A plain file read from its bytes (~0.5 ms instead of astropy's ~4 for a lake file).
    # Header text beyond ASCII that is kept is noted where the exposure is calibrated.
    hdul = read_plain(path, FIBRES_EXTNAMES, content) or open_fits(path, notes=False)
    with hdul, cards_named(hdul, path):
        return _exposure_info(hdul, path)


def _exposure_info(hdul, path):
    """:func:`read_exposure_info` of the open file ``hdul``."""
    header = hdul[0].header
    if header.get("NAXIS", 0) != 2:
        raise ExposureError(path, "HDU PRIMARY", "expected a 2-D (fiber, pixel) image")
    nfib, nspec = header["NAXIS2"], header["NAXIS1"]
    check_width(path, nspec)
    data_unit(header, path)
    # An ambiguous file (two VARIANCE or FIBRES extensions) is refused when the survey is
    # planned, not later on a worker.
    for names in (("VARIANCE",), FIBRES_EXTNAMES):
        find_hdu(hdul, path, names, required=False)
    wave, source, medium, _ = raw_wavelength(hdul, path, nfib, nspec)
    if source == "WAVELA":
        wave = wave.reshape(-1, nspec)
        # an all-NaN column is reported just below
        wave = median_of_rows(wave) if wave.shape[0] > 1 else wave[0]
    check_wavelength(wave, path, "wavelength solution")
    if medium == "vac":
        wave = vacuum_to_air(wave)
    lsf = line_spread(header, path)
    info = {
        "path": path,
        "expid": exposure_id(header, path),
        **exposure_keywords(header, path),
        "lsf": lsf,
        "nfiber": int(nfib),
        "npixel": int(nspec),
        "wave_range": (float(wave[0]), float(wave[-1])),
    }
    info["setup"] = configuration_key(wave, info["nfiber"])
    return info


def configuration_key(wavelength, nfiber):
    """A short key naming an instrument configuration, e.g. ``n4096-f14-3500-8500``: the
    pixels, the fibers and the wavelength range rounded to
    :data:`~kspec_fluxcal.constants.CONFIGURATION_STEP` (100 A).

    Every exposure of one spectrograph setting has it, although each has its own arc
    solution and line spread (they drift a little from one exposure to the next): the unit
    of the survey model and of the archive fallback. :func:`setup_key` names the exact pixels
    and line spread.
    """
    wave = np.asarray(wavelength, dtype=np.float64)
    lo, hi = CONFIGURATION_STEP * np.round(np.array([wave[0], wave[-1]]) / CONFIGURATION_STEP)
    return f"n{wave.size}-f{int(nfiber)}-{lo:.0f}-{hi:.0f}"


def setup_key(wavelength, lsf):
    """A short key naming an exact setup: wavelength grid (to 1e-3 A) and LSF."""
    wave = np.round(np.asarray(wavelength, dtype=np.float64), 3)
    digest = hashlib.sha1(wave.tobytes() + lsf.key().encode()).hexdigest()[:10]
    return f"n{wave.size}-{digest}"


def exposure_setup(ds):
    """The exact setup key (:func:`setup_key`: pixels and line spread) of an opened
    exposure; its instrument configuration is :func:`configuration_key`'s."""
    return setup_key(ds["wavelength"].values, LineSpread.from_attrs(ds.attrs))



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
    module = fits()
    primary = module.PrimaryHDU(np.asarray(flux, dtype=np.float32),
                                header=module.Header(header) if header is not None else None)
    hdus = [primary, module.ImageHDU(np.asarray(variance, dtype=np.float32), name="VARIANCE")]
    if wavelength is not None:
        wave_hdu = module.ImageHDU(np.asarray(wavelength, dtype=np.float64), name="WAVELA")
        for key, value in (wavelength_header or {"BUNIT": "Angstrom"}).items():
            wave_hdu.header[key] = value
        hdus.append(wave_hdu)
    if isinstance(fibres, module.BinTableHDU):
        table = fibres
        table.name = fibres_extname
    elif hasattr(fibres, "columns") and not isinstance(fibres, dict):
        table = module.table_to_hdu(fibres)
        table.name = fibres_extname
    else:
        cols = [v if isinstance(v, module.Column) else fits_column(k, np.asarray(v))
                for k, v in fibres.items()]
        table = module.BinTableHDU.from_columns(cols, name=fibres_extname)
    hdus.append(table)
    return module.HDUList(hdus)


