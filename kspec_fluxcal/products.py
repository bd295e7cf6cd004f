"""Calibrated products (formats contract section 4): writing a calibrated exposure as a FITS
file (the input's layout, in flux density, with its calibration tables and the per-star
FCALSTAR table), and reading that table back.

A product opens like a RED file, with its calibration: :func:`kspec_fluxcal.open_exposure`.
"""

from __future__ import annotations

import functools
import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__
from ._astropy import fits, verify_error
from ._atomic import atomic_file
from ._page_cache import release_earlier, written
from .constants import CAL_UNIT, CALIBRATION_KEYWORDS, FLUX_UNIT
from .errors import ExposureError
from .exposure import _computed, open_exposure
from .fits_cards import edited_cards
from .fits_file import (
    card_image,
    check_header_cards,
    column_format,
    extension_bytes,
    extension_header,
    extensions_raw,
    find_hdu,
    hdu_data,
    image_bytes,
    image_data_bytes,
    image_header,
    open_fits,
    primary_bytes,
    table_bytes,
    table_hdu,
)
from .wavelength import air_to_vacuum

__all__ = ["write_calibrated", "star_table", "read_standard_stars"]


def _fibres_table(ds):
    """The input's fibre table (FITS bytes), from the coordinates read from it."""
    cols = [(coord.attrs["fits_column"], *column_format(np.asarray(coord.values)),
             coord.attrs.get("units")) for coord in ds.coords.values()
            if coord.dims == ("fiber",) and "fits_column" in coord.attrs]
    return table_bytes(cols, ds.attrs.get("fibres_extname", "FIBRES"))


#: The extensions a product adds; an input's own (an exposure opened from a product) are
#: not carried over.
_OWN_EXTENSIONS = ("FLUXCAL", "FCALFAC", "FCALFVAR", "FCALSTAR")
#: Checksums of the input's data, which the product's data no longer match.
_CHECKSUMS = ("CHECKSUM", "DATASUM")
#: The input primary header's keywords of its data, which the product's writer makes.
_PRIMARY_STRUCTURE = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND")


def _input_header(text, structural):
    """A header of the input (text as read) without its ``structural`` keywords and its
    checksums."""
    module = fits()
    header = module.Header.fromstring(text, sep="\n") if text else module.Header()
    for key in (*structural, *_CHECKSUMS):
        header.remove(key, ignore_missing=True, remove_all=True)
    return header


#: The input VARIANCE header's keywords of its data, which the product's writer makes.
_IMAGE_STRUCTURE = ("XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT",
                    "EXTNAME", "BSCALE", "BZERO", "BLANK")
#: The product's VARIANCE unit: the flux density's squared.
_VARIANCE_UNIT = f"({FLUX_UNIT})**2"


def _variance_hdu(text, variance):
    """The VARIANCE extension of the image ``variance``: the input's header ``text``
    (keywords of its noise model...) with the flux density's unit squared."""
    header = _input_header(text, _IMAGE_STRUCTURE)
    hdu = fits().ImageHDU(variance, header=header, name="VARIANCE")
    hdu.header["BUNIT"] = _VARIANCE_UNIT
    return hdu


def _variance_bytes(ds):
    """The VARIANCE extension (FITS bytes: its header and data, written one after the other):
    astropy's header (:func:`_variance_header`), then the float32 variance."""
    variance = ds.variables["variance"].values.astype(">f4")  # one copy: FITS's byte order
    header = _variance_header(ds.attrs.get("variance_header"), variance.shape)
    return header, image_data_bytes(variance)


@functools.lru_cache(maxsize=16)
def _variance_header(text, shape):
    """The VARIANCE header as astropy writes it (verified) for the input's header ``text``
    and a float32 image of ``shape``: it does not depend on the pixel values, and is the
    same for every exposure of a setup, so it is made once (1.7 ms of a write's ~9 by
    astropy). Made from the cards (:func:`~kspec_fluxcal.fits_cards.edited_cards`) where
    they are plain, without importing astropy (~0.2 s of a command's start-up); by
    astropy's ImageHDU where they are not."""
    cards = edited_cards(text, (*_IMAGE_STRUCTURE, *_CHECKSUMS),
                         [("BUNIT", _VARIANCE_UNIT, None)], (), extname="VARIANCE")
    if cards is None:
        return extension_header(_variance_hdu(text, np.zeros(shape, np.float32)))
    return image_header(np.float32, shape, cards)


def _input_layout(ds, variance):
    """The product's extensions before its own, in FITS bytes: the input file's, in its
    order, verbatim (FIBRES, WAVELA, a SKY image, kspecdr's tables...) but for VARIANCE,
    which is ``variance`` (its FITS bytes). Without a readable input file (an exposure made
    in memory), the layout is made from the Dataset: VARIANCE, WAVELA (unless the solution
    is a WCS) and the FIBRES columns read."""
    source = ds.attrs.get("source")
    # VARIANCE is made anew: its place only, not its data.
    carried = (extensions_raw(source, skip=("VARIANCE",)) if source and os.path.isfile(source)
               else None)
    if not carried or "VARIANCE" not in (name for name, _ in carried):
        wave = _wavelength_hdu(ds)
        return [variance, *([extension_bytes(wave)] if wave else []), _fibres_table(ds)]
    return [variance if name == "VARIANCE" else raw
            for name, raw in carried if name not in _OWN_EXTENSIONS]


def _wavelength_hdu(ds):
    """The WAVELA extension of a product: the input's, as it was (values, unit, medium);
    None when the input had only a linear WCS (kept in the primary header)."""
    layout = ds.attrs.get("wavelength_layout")
    if layout == "wcs":
        return None
    raw = ds.attrs.get("wavela")
    if raw is not None:
        data, text = raw
        hdu = fits().ImageHDU(np.asarray(data), name="WAVELA")
        for card in fits().Header.fromstring(text, sep="\n").cards:
            if card.keyword not in hdu.header and card.keyword not in (
                    "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT"):
                hdu.header.append(card)
        return hdu
    # Built in memory: each fiber's wavelengths (air), 1-D when they are all the same.
    fiber_wave = ds["fiber_wavelength"].values if "fiber_wavelength" in ds.coords else None
    same = fiber_wave is None or np.array_equal(
        fiber_wave, np.broadcast_to(ds["wavelength"].values, fiber_wave.shape))
    hdu = fits().ImageHDU(ds["wavelength"].values if same else fiber_wave, name="WAVELA")
    hdu.header["BUNIT"] = "Angstrom"
    hdu.header["AIRORVAC"] = "air"
    return hdu


def _calibration_table(ds):
    """The contract's FLUXCAL table (FITS bytes): the vector on the reference grid, in the
    input's medium."""
    wave = ds.variables["wavelength"].values
    medium = ds.attrs.get("medium_in", "air")
    if medium == "vac":
        wave = air_to_vacuum(wave)
    return table_bytes([
        ("WAVELENGTH", "D", wave, "Angstrom"),
        ("CAL_FACTOR", "D", ds.variables["cal"].values, CAL_UNIT),
        ("CAL_VARIANCE", "D", ds.variables["cal_variance"].values, f"({CAL_UNIT})**2"),
        ("MASK", "I", ds.variables["cal_mask"].values.astype(np.int16), None),
    ], "FLUXCAL", [
        card_image("AIRORVAC", medium, "medium of WAVELENGTH (the input's)"),
        card_image("COMMENT", "The vector on the reference grid (the median of the fibers' "
                   "wavelength solutions); each fiber's own factor is in FCALFAC."),
        card_image("COMMENT", "MASK: 1 = reliable, 0 = interpolated over a gap or unconstrained"),
    ])


def _factor_hdus(ds):
    """FCALFAC and FCALFVAR (FITS bytes): the factor applied to every pixel of every fiber,
    its variance."""
    factor = image_bytes(
        np.asarray(ds.variables["cal_factor"].values, dtype=np.float64), "FCALFAC",
        [card_image("BUNIT", CAL_UNIT),
         card_image("COMMENT", "Calibrated flux = counts x FCALFAC, pixel by pixel, each fiber "
                    "on its own wavelengths (HDU WAVELA or the primary WCS).")])
    variance = image_bytes(
        np.asarray(ds.variables["cal_factor_variance"].values, dtype=np.float64), "FCALFVAR",
        [card_image("BUNIT", f"({CAL_UNIT})**2"), card_image("COMMENT", "Variance of FCALFAC.")])
    return [factor, variance]


def _write_fits(path, primary, extensions, compress=False):
    """Write a new FITS file of HDUs in FITS bytes (each bytes, or a tuple of bytes written
    one after the other): the ``primary``, then ``extensions``; gzip-compressed with
    ``compress`` (a product named ``.gz``, e.g. a RED file ``.fits.gz`` calibrated in place).

    The HDUs carrying the input's header keywords (primary, VARIANCE) are as astropy writes
    them: it verifies them (an invalid card is refused) and applies its rules to copied
    keywords (BSCALE, BLANK, repeated HISTORY...); the primary's cards are edited and
    verified as astropy does (:func:`_primary_bytes`), VARIANCE's header
    is astropy's rendering, made once for each input VARIANCE header
    (:func:`_variance_header`), its data the float32 pixels. The extensions made of our own
    values only are rendered directly, as astropy writes them
    (:func:`~kspec_fluxcal.fits_file.table_bytes`): making, verifying and writing them in
    astropy took ~30 of the ~37 ms of CPU of a product with its FCALSTAR table (Column
    objects, header updates, configuration look-ups); the input's other extensions are
    copied verbatim.
    """
    parts = [part for hdu in (primary, *extensions)
             for part in (hdu if isinstance(hdu, tuple) else (hdu,))]
    if compress:
        with gzip.open(path, "wb", compresslevel=6) as fh:
            for part in parts:
                fh.write(part)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _write_all(fd, parts)
    finally:
        os.close(fd)


def _write_all(fd, buffers):
    """Write the bytes ``buffers`` to the file descriptor ``fd``, in order: in one system
    call for a product's ~2 MB (a write for each HDU was ~0.2 ms more CPU), again for what
    a call leaves (a signal, a full disk's error on the next)."""
    parts = [memoryview(b) for b in buffers]
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts.pop(0))
        if written:
            parts[0] = parts[0][written:]


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
    stars : xarray.Dataset or bytes, optional
        Per-star results of :func:`kspec_fluxcal.fit_standards`, written as the extra binary
        table FCALSTAR (one row per standard star) for quality control; or such a table
        already made (kept from an earlier product of the same exposure) as its FITS bytes
        (:func:`kspec_fluxcal.fits_file.extension_raw`), written verbatim.

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
    ds = _computed(ds)
    try:
        primary = _primary_bytes(ds)
        extensions = [*_input_layout(ds, _variance_bytes(ds)), _calibration_table(ds)]
        if "cal_factor" in ds:
            extensions += _factor_hdus(ds)
        if stars is not None:
            extensions.append(stars if isinstance(stars, bytes)
                              else table_bytes(*_star_columns(stars)))
        release_earlier()  # the earlier products' pages, for this one's (see _page_cache)
        with atomic_file(path, overwrite=overwrite) as tmp:
            _write_fits(tmp, primary, extensions, compress=Path(path).suffix.lower() == ".gz")
        written(path)
    except verify_error():
        _name_damaged_card(ds.attrs.get("source"))
        raise
    return Path(path)


def _name_damaged_card(source):
    """Refuse a header card of the input file ``source`` that FITS does not allow, naming its
    HDU and card (:func:`~kspec_fluxcal.fits_file.check_header_cards`): astropy reads such a
    card and refuses to write it into the product. The readers do not check every card of
    every file (2.5 ms for a header of 236 cards, on every exposure) for what is this rare."""
    if source and os.path.isfile(source):
        with open_fits(source, notes=False) as hdul:
            for k, hdu in enumerate(hdul):
                check_header_cards(hdu, source, hdu.name or str(k))


def _primary_bytes(ds):
    """The product's primary HDU (FITS bytes): the calibrated flux (float32) with the input's
    primary header (its WCS and AIRORVAC as they were), data keywords and checksums removed,
    and the product's cards (:func:`_product_cards`), as astropy's Header edits it: made
    from the cards (:func:`~kspec_fluxcal.fits_cards.edited_cards`), by that Header when
    they are not plain."""
    flux = ds.variables["flux"].values.astype(">f4")  # one copy: FITS's byte order
    text = ds.attrs.get("fits_header")
    updates, commentary = _product_cards(ds)
    header = edited_cards(text, (*_PRIMARY_STRUCTURE, *_CHECKSUMS), updates, commentary)
    if header is None:
        header = _input_header(text, _PRIMARY_STRUCTURE)
        for key, value, comment in updates:
            header[key] = value if comment is None else (value, comment)
        for key, value in commentary:
            header[key] = value
    return primary_bytes(flux, header)


def _product_cards(ds):
    """What the product's primary header adds to the input's, for
    :func:`~kspec_fluxcal.fits_cards.edited_cards`: the flux unit, the calibration keywords
    (:data:`~kspec_fluxcal.constants.CALIBRATION_KEYWORDS`) as (keyword, value, comment or
    None to keep the input's), the history of the calibrated Dataset ``ds`` and a note as
    (HISTORY or COMMENT, text)."""
    attrs = ds.attrs
    updates = [("BUNIT", FLUX_UNIT, None)]
    if attrs.get("expid"):
        updates.append(("EXPID", str(attrs["expid"]), None))
    updates += [("FLUXCAL", True, "flux calibrated by kspec-fluxcal"),
                ("FCALVER", __version__, "kspec-fluxcal version")]
    defaults = {"fcalnstr": 0, "fcalrms": np.nan, "fcalsrc": "standards"}
    for attr, (key, kind, comment) in CALIBRATION_KEYWORDS.items():
        value = attrs.get(attr, defaults.get(attr))
        if value is None:
            continue
        value = kind(value)
        if kind is float and not np.isfinite(value):
            value = -1.0
        updates.append((key, value, comment))
    commentary = [("HISTORY", text) for text in attrs.get("history", [])]
    commentary.append(("COMMENT", "Calibrated on each fiber's own pixels; factors in HDU "
                       "FCALFAC, variance FCALFVAR; per-star fits in FCALSTAR (kspec-fluxcal "
                       "README)"))
    return updates, commentary


def star_table(stars):
    """Per-star results as the FCALSTAR binary table (one row per standard star).

    Scalar per-star variables become columns; (star, wavelength) variables become vector
    columns; (star, band) variables become vector columns with the band names in the header;
    (star, xp_wavelength) variables (Gaia XP spectra) become vector columns ``XP_*`` with their
    wavelengths in the vector column XP_WAVELENGTH (the same on every row) and NXPWAVE in the
    header.
    """
    return table_hdu(*_star_columns(stars))


def _star_columns(stars):
    """The columns, name and further header cards of the FCALSTAR table (:func:`star_table`;
    see :func:`~kspec_fluxcal.fits_file.table_bytes`)."""
    stars = _computed(stars)
    cols = []
    if "xp_wavelength" in stars.dims:
        xp_wave = np.asarray(stars.variables["xp_wavelength"].values, dtype=np.float64)
        cols.append(("XP_WAVELENGTH", f"{xp_wave.size}D",
                     np.broadcast_to(xp_wave, (stars.sizes["star"], xp_wave.size)), "Angstrom"))
    # Variables, not DataArrays: building a DataArray per column costs more than the file.
    for name, var in stars.variables.items():
        if name in ("star", "wavelength", "band", "xp_wavelength") or "star" not in var.dims:
            continue
        if var.dims[0] != "star":
            var = var.transpose("star", ...)
        values = np.asarray(var.values)
        if values.ndim == 1:
            cols.append((name.upper(), *column_format(values), var.attrs.get("units")))
        elif values.ndim == 2 and values.dtype.kind in "fiub":
            fmt = "L" if values.dtype.kind == "b" else "D"
            cols.append((name.upper(), f"{values.shape[1]}{fmt}",
                         values if fmt == "L" else np.asarray(values, dtype=np.float64),
                         var.attrs.get("units")))
    cards = []
    if "band" in stars.dims:
        bands = stars.variables["band"].values
        cards.append(card_image("BANDS", ",".join(str(b) for b in bands)))
    cards.append(card_image("NWAVE", stars.sizes.get("wavelength", 0)))
    if "xp_wavelength" in stars.dims:
        cards.append(card_image("NXPWAVE", stars.sizes["xp_wavelength"]))
    return cols, "FCALSTAR", cards


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
        warnings.simplefilter("ignore", fits().verify.VerifyWarning)
        with open_fits(path) as hdul:
            hdu = find_hdu(hdul, path, ("FCALSTAR",), required=False)
            if hdu is None:
                return None
            data = hdu_data(hdu, path, "FCALSTAR")
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
    try:
        ds = xr.Dataset(variables, coords=coords)
    except ValueError as err:  # e.g. a table rewritten without its NWAVE and BANDS keywords
        raise ExposureError(path, "HDU FCALSTAR", f"columns of inconsistent widths, NWAVE = "
                            f"{nwave or 'missing'}, BANDS = {','.join(bands) or 'missing'} "
                            f"({err})") from None
    if "wavelength" in ds.dims:  # the reference grid (air) the vectors are on
        ds = ds.assign_coords(wavelength=open_exposure(path)["wavelength"].values)
    if bands:
        ds = ds.assign_coords(band=bands)
    return ds
