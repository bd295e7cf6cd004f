"""The calibration archive: every exposure's calibration on one survey-wide wavelength grid,
in a Zarr v3 store written incrementally, for studying the instrument over time.

Layout
------
Dims (exposure, wavelength) for ``cal``, ``cal_variance``, ``cal_mask``, and (exposure, star)
for the standard-star summaries; per-exposure coordinates expid, mjd, night, airmass,
exptime, setup, n_stars_used, fcalrms, fcalsrc, source, input_hash, dispersion.

One grid for the whole survey
    Exposures of different setups are comparable only on a shared grid: ``wavelength`` is
    uniform in ln(lambda) from 3000 to 11000 A with steps of 2e-4 (60 km/s, 1.2 A at 6000 A,
    finer than any K-SPEC pixel), in air. Calibrations are linearly interpolated onto it and
    are NaN (mask False) outside an exposure's range.
Per Angstrom, not per pixel
    A calibration factor per count per pixel depends on the pixel width. The archive stores
    ``cal`` = CAL_FACTOR x pixel width: flux density per (count per Angstrom), the same for
    any setup. The throughput in counts/s/A per unit flux density is ``1 / (cal * exptime)``.

Crash safety
------------
Rows are only ever appended; a re-calibrated exposure gets a new row and the group attribute
``index`` (expid -> current row) moves to it. Data are written first, then ``rows`` and
``index`` in one atomic metadata write (Zarr's local store writes each key through a temporary
file): a job killed at any point leaves the previous committed state, and :func:`open_archive`
shows only committed rows. Arrays grow in blocks of rows (capacity), so readers never depend
on the arrays' lengths agreeing. A new archive is built in a temporary directory and renamed
into place, so a job killed while creating it leaves none rather than an unreadable one.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from pathlib import Path

import numpy as np
import xarray as xr

from .. import __version__
from .._inputs import expect_dataset
from ..constants import CAL_UNIT, FLUX_UNIT

__all__ = ["ARCHIVE_GRID", "archive_grid", "ArchiveWriter", "open_archive", "archive_record",
           "read_rows", "throughput", "MAX_STARS",
           "read_own", "THROUGHPUT_UNIT", "SCHEMA_VERSION"]

#: The survey-wide grid: ln-uniform, 3000-11000 A, step 2e-4.
ARCHIVE_GRID = {"wave_min": 3000.0, "wave_max": 11000.0, "dlnlambda": 2e-4}
#: Standard-star slots per exposure in the archive.
MAX_STARS = 32
_BLOCK = 64  # the row arrays' chunk; capacity grows in whole blocks
#: The arrays' capacity grows by as many rows as it has (at least a block, at most this
#: many): a resize writes every array's metadata (~50 files, ~47 ms of CPU), which a growth
#: of one block made once per commit of 64 rows (0.74 ms per exposure; 512 rows appended,
#: 6 alternations: 2.50 -> 2.22 ms of CPU per row). Pre-allocated rows cost no disk (no
#: chunk is written for them) and readers skip them (the group's ``rows``).
_GROWTH_MAX = 1024
_ROW_CHUNK = 16
_STAR_FIELDS = {
    "star_objid": (np.int64, -1), "star_fiber": (np.int64, -1), "star_teff": (np.float64, np.nan),
    "star_logg": (np.float64, np.nan), "star_feh": (np.float64, np.nan),
    "star_rv": (np.float64, np.nan), "star_ebv": (np.float64, np.nan),
    "star_snr": (np.float64, np.nan), "star_status": (str, ""),
}
_ROW_FIELDS = {
    "expid": (str, ""), "mjd": (np.float64, np.nan), "night": (str, ""),
    "airmass": (np.float64, np.nan), "exptime": (np.float64, np.nan), "setup": (str, ""),
    "n_stars_used": (np.int64, 0), "fcalrms": (np.float64, np.nan), "fcalsrc": (str, ""),
    "source": (str, ""), "input_hash": (str, ""), "dispersion": (np.float64, np.nan),
    "calibrated_at": (str, ""),
    # Schema 2: quality, line spread, telluric columns, provenance.
    "fcalqual": (str, ""), "fcalmerr": (np.float64, np.nan), "fcallsf": (np.float64, np.nan),
    "fcalo2": (np.float64, np.nan), "fcalh2o": (np.float64, np.nan),
    "version": (str, ""), "grid_id": (str, ""), "config_hash": (str, ""),
    # Schema 3: the survey model and the spectrophotometric check.
    "fcalo2_err": (np.float64, np.nan), "fcalh2o_err": (np.float64, np.nan),
    "seeing": (np.float64, np.nan), "model_id": (str, ""), "model_grey": (np.float64, np.nan),
    "sphot_g": (np.float64, np.nan), "sphot_r": (np.float64, np.nan),
    "sphot_i": (np.float64, np.nan), "sphot_scatter": (np.float64, np.nan),
    "sphot_n": (np.int64, 0), "level_variance": (np.float64, np.nan),
}
#: Per-exposure spectra on the archive grid: (dtype, fill). ``cal_smooth`` (schema 2) is the
#: smooth response without the telluric bands' absorption (NaN where not known);
#: ``own_smooth`` and ``own_smooth_variance`` (schema 3) the smooth response of the exposure's
#: own standards and the variance of its shape (its grey level's left out): the survey
#: model's input, kept when the calibration itself is replaced by one with the model.
_SPECTRA = {"cal": ("f4", np.nan), "cal_variance": ("f4", np.nan), "cal_mask": ("bool", False),
            "cal_smooth": ("f4", np.nan), "own_smooth": ("f4", np.nan),
            "own_smooth_variance": ("f4", np.nan)}
#: Version of the archive's layout: 1 had the fields up to ``calibrated_at``; 2 added
#: quality, line spread, telluric columns, provenance and ``cal_smooth``; 3 the exposure's own
#: response (``own_*``), telluric column errors, seeing, the survey model's identity and grey
#: factor, the level's variance, and the spectrophotometric check (``sphot_*``). Older
#: archives are migrated by the
#: writer: the new arrays are added, empty for the old rows (whose ``cal_smooth`` is their own
#: response when FCALSRC is 'standards').
SCHEMA_VERSION = 3


#: Units of the per-exposure coordinates (the others are labels or counts).
_ROW_UNITS = {"mjd": "d", "airmass": "1", "exptime": "s", "fcalrms": "1",
              "dispersion": "Angstrom", "fcalmerr": "1", "fcallsf": "1",
              "fcalo2": "airmass", "fcalh2o": "airmass x reference water column",
              "fcalo2_err": "airmass", "fcalh2o_err": "airmass x reference water column",
              "seeing": "arcsec", "model_grey": "ln(counts/s/A per flux unit)",
              "sphot_g": "mag", "sphot_r": "mag", "sphot_i": "mag", "sphot_scatter": "mag",
              "level_variance": "1"}
#: Units of the per-star fields (those of the stars' Dataset, :func:`fit_standards`).
_STAR_UNITS = {"star_teff": "K", "star_logg": "dex", "star_feh": "dex", "star_rv": "km/s",
               "star_ebv": "mag", "star_snr": "1"}
#: Units of the per-exposure spectra: ``cal`` and the smooth responses, their variances.
_SPECTRA_UNITS = {
    **dict.fromkeys(("cal", "cal_smooth", "own_smooth"), f"{FLUX_UNIT} / (count/Angstrom)"),
    **dict.fromkeys(("cal_variance", "own_smooth_variance"),
                    f"({FLUX_UNIT} / (count/Angstrom))**2")}
#: What ``throughput`` is in: counts per second per Angstrom per unit of flux density.
THROUGHPUT_UNIT = f"count/(s Angstrom) / ({FLUX_UNIT})"
_HOW_TO_READ = (
    "open with kspec_fluxcal.survey.open_archive(path): the arrays' rows past the group "
    "attribute 'rows' are pre-allocated (empty), and rows not in 'index' (expid -> row) are "
    "superseded by a later calibration of the same exposure; xarray.open_zarr shows them all")


def throughput(ds):
    """Throughput of archived calibrations: ``1 / (cal * exptime)``, with its units.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`open_archive` (or a selection of it).

    Returns
    -------
    xarray.DataArray
        Counts per second per Angstrom per unit of flux density (:data:`THROUGHPUT_UNIT`),
        dims of ``cal``; lazy when ``cal`` is.

    Notes
    -----
    End to end at each exposure's airmass: the atmosphere (and its telluric bands) and the
    standards' fiber apertures are in it; compare exposures at one airmass, or correct
    with the survey model's extinction. Rows of FCALSRC 'model' (``ds.fcalsrc``) are the
    model's prediction for an exposure without usable standards, not a measurement.
    """
    expect_dataset(ds, "ds", "throughput", "kspec_fluxcal.survey.open_archive",
                   ("cal", "exptime"))
    out = 1.0 / (ds["cal"] * ds["exptime"])
    # Not cal's attrs (arithmetic keeps them): their units are the inverse of these.
    out.attrs = {"units": THROUGHPUT_UNIT,
                 "long_name": "throughput (counts/s/A per unit flux density)"}
    return out.rename("throughput")


def archive_grid():
    """The survey-wide archive wavelength grid (Angstrom, air)."""
    return _grid().copy()


@functools.cache
def _grid():
    """:func:`archive_grid`, made once (read-only): every record puts its spectra on it."""
    g = ARCHIVE_GRID
    n = int(np.floor(np.log(g["wave_max"] / g["wave_min"]) / g["dlnlambda"])) + 1
    grid = g["wave_min"] * np.exp(g["dlnlambda"] * np.arange(n))
    grid.flags.writeable = False
    return grid


def night_of(mjd, utc_offset=9.0):
    """The observing night of an MJD: the local date of the evening (YYYYMMDD).

    The local clock is UT + ``utc_offset`` hours; a night runs from local noon to local noon,
    so it is named by the date of local time minus 12 hours.
    """
    t = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=float(mjd) + utc_offset / 24.0 - 0.5)
    return t.strftime("%Y%m%d")


def archive_record(calibrated, stars, calibration, *, source="", input_hash="", utc_offset=9.0,
                   provenance=None, own=None):
    """One archive row (plain numpy) from a calibrated exposure and its standards.

    Parameters
    ----------
    calibrated : xarray.Dataset
        From :func:`kspec_fluxcal.apply_calibration` (cal, cal_variance, cal_mask, attrs).
    stars : xarray.Dataset or None
        From :func:`kspec_fluxcal.fit_standards` (None for an archive-based calibration).
    calibration : xarray.Dataset or None
        From :func:`kspec_fluxcal.combine_vectors` (which stars were used; its smooth response
        is the exposure's own when FCALSRC is 'standards').
    source, input_hash : str
        The RED file and the hash of everything the calibration depended on.
    utc_offset : float
        Site clock, hours from UT, to name nights (see :func:`night_of`).
    provenance : dict, optional
        ``grid_id`` (the template grid's build) and ``config_hash``, so that two runs of a
        survey can be compared row by row; the package version is always recorded.
    own : dict, optional
        What a recalibration keeps of the exposure's own standards (:func:`read_rows`):
        ``own_smooth``, ``own_smooth_variance`` (archive grid) and ``star`` (the per-star
        fields); default: taken from ``calibration`` and ``stars``.
    """
    wave = calibrated.variables["wavelength"].values
    grid = _grid()
    width = np.gradient(wave)
    # The grid's points in the exposure's range (a slice: the grid increases); only they are
    # interpolated (a third of the grid is outside a 3500-8500 A exposure).
    start = np.searchsorted(grid, wave[0], side="left")
    inside = slice(start, np.searchsorted(grid, wave[-1], side="right")
                   if wave[0] <= wave[-1] else start)

    def on_grid(values):  # per pixel -> per Angstrom on the archive grid, NaN outside
        out = np.full(grid.size, np.nan, np.float32)
        out[inside] = np.interp(grid[inside], wave, values)
        return out

    # Variables: a DataArray of the calibrated exposure would carry its coordinates.
    values = {name: var.values for name, var in calibrated.variables.items()
              if name in ("cal", "cal_variance", "cal_mask", "cal_smooth")}
    mask = np.zeros(grid.size, bool)
    mask[inside] = np.interp(grid[inside], wave, values["cal_mask"].astype(float)) > 0.999
    record = _Record(cal=on_grid(values["cal"] * width),
                     cal_variance=on_grid(values["cal_variance"] * width**2),
                     cal_mask=mask, cal_smooth=np.full(grid.size, np.nan, np.float32))
    if "cal_smooth" in calibrated:
        record["cal_smooth"] = on_grid(values["cal_smooth"] * width)
    record.inside, record.made = (inside.start, inside.stop), set(_SPECTRA)
    attrs = calibrated.attrs
    record["row"] = _row_fields(attrs, width, utc_offset, source, input_hash, provenance)
    if calibration is not None:  # the grey level's fractional variance
        record["row"]["level_variance"] = float(calibration.attrs.get("level_variance", np.nan))
    if own is not None:
        record.update(own_smooth=own["own_smooth"], own_smooth_variance=own[
            "own_smooth_variance"], star=own["star"])
        record.made -= {"own_smooth", "own_smooth_variance"}
        return record
    record["star"] = _star_fields(stars, calibration)
    record["own_smooth"] = np.full(grid.size, np.nan, np.float32)
    record["own_smooth_variance"] = np.full(grid.size, np.nan, np.float32)
    if calibration is not None and record["row"]["fcalsrc"] == "standards" and \
            "cal_smooth" in calibration:
        smooth = calibration.variables["cal_smooth"].values
        shape = calibration.variables["cal_smooth_variance"].values  # the level apart
        # The calibrated exposure's smooth response is the calibration's (apply_calibration
        # keeps its arrays on the same grid): one array, interpolated and sent once.
        record["own_smooth"] = record["cal_smooth"] if smooth is values.get("cal_smooth") \
            else on_grid(smooth * width)
        record["own_smooth_variance"] = on_grid(shape * width**2)
    return record


class _Record(dict):
    """An archive row (:func:`archive_record`) that travels lean: pickled (a survey task's
    result, sent to the client), a spectrum that is its fill value outside the exposure's
    range is sent inside it only (a third of the archive grid lies outside a 3500-8500 A
    exposure), ``own_smooth`` by name when it is ``cal_smooth`` (a calibration by the
    exposure's own standards), the mask as bits: ~75 kB instead of ~140 kB, sent by the
    worker and received by the client (twice when gathered through the scheduler).
    Unpickled (:func:`_received`), it is the same row, bit for bit.

    ``inside``: the exposure's range on the archive grid (start, stop); ``made``: the
    spectra known to be their fill value outside it (made by :func:`archive_record`).
    """

    __slots__ = ("inside", "made")

    def __reduce__(self):
        return _received, (self.inside, [(name, *_lean(self, name, value))
                                         for name, value in self.items()])


#: A spectrum sent by the name of another when the two are the same, bit for bit.
_SAME_AS = {"own_smooth": "cal_smooth"}


@functools.cache
def _filled(name):
    """The archive grid's worth of spectrum ``name``'s fill value (read-only)."""
    dtype, fill = _SPECTRA[name]
    out = np.full(_grid().size, fill, dtype)
    out.flags.writeable = False
    return out


def _lean(record, name, value):
    """(kind, data) of ``record``'s item ``name`` as :class:`_Record` pickles it."""
    filled = _filled(name) if name in _SPECTRA else None
    if filled is None or not isinstance(value, np.ndarray) or value.shape != filled.shape \
            or value.dtype != filled.dtype:
        return "value", value
    other = record.get(_SAME_AS.get(name))
    if other is value or isinstance(other, np.ndarray) and other.shape == value.shape \
            and other.dtype == value.dtype and other.tobytes() == value.tobytes():
        return "same", _SAME_AS[name]
    start, stop = record.inside
    if name not in record.made and (value[:start].tobytes() != filled[:start].tobytes()
                                    or value[stop:].tobytes() != filled[stop:].tobytes()):
        return "value", value
    inside = value[start:stop]
    return ("bits", np.packbits(inside)) if value.dtype == bool else ("inside", inside)


def _received(inside, items):
    """A :class:`_Record` from what its pickle holds (see :meth:`_Record.__reduce__`)."""
    (start, stop), record = inside, _Record()
    record.inside, record.made = inside, set()
    for name, kind, data in items:
        if kind in ("value", "same"):  # "same": one array, as in the worker's record
            record[name] = data if kind == "value" else record[data]
        else:
            record[name] = value = _filled(name).copy()
            value[start:stop] = np.unpackbits(data, count=stop - start).view(bool) \
                if kind == "bits" else data
            record.made.add(name)
    return record


def _row_fields(attrs, width, utc_offset, source, input_hash, provenance):
    """The per-exposure fields of an archive row from a calibrated exposure's attrs and its
    pixels' widths (A)."""
    floats = ("fcalmerr", "fcallsf", "fcalo2", "fcalh2o", "fcalo2_err", "fcalh2o_err",
              "seeing", "model_grey", "sphot_g", "sphot_r", "sphot_i", "sphot_scatter",
              "level_variance")
    return {
        "expid": str(attrs.get("expid", "")), "mjd": float(attrs.get("mjd", np.nan)),
        "night": night_of(attrs.get("mjd", 0.0), utc_offset),
        "airmass": float(attrs.get("airmass", np.nan)),
        "exptime": float(attrs.get("exptime", np.nan)), "setup": str(attrs.get("setup", "")),
        "n_stars_used": int(attrs.get("fcalnstr", 0)),
        "fcalrms": float(attrs.get("fcalrms", np.nan)),
        "fcalsrc": str(attrs.get("fcalsrc", "standards")), "source": str(source),
        "input_hash": str(input_hash), "dispersion": float(np.median(width)),
        "calibrated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "fcalqual": str(attrs.get("fcalqual") or ""), "version": __version__,
        **{k: float(np.nan if attrs.get(k) is None else attrs[k]) for k in floats},
        "model_id": str(attrs.get("model_id", "")), "sphot_n": int(attrs.get("sphot_n", 0)),
        **{k: str((provenance or {}).get(k, "")) for k in ("grid_id", "config_hash")},
    }


def _star_fields(stars, calibration):
    """The per-star fields of an archive row (:data:`MAX_STARS` slots)."""
    star = {name: np.full(MAX_STARS, fill, dtype=object if dtype is str else dtype)
            for name, (dtype, fill) in _STAR_FIELDS.items()}
    if stars is not None and stars.sizes.get("star", 0):
        n = min(stars.sizes["star"], MAX_STARS)
        status = (calibration.variables["star_status"].values if calibration is not None
                  else stars.variables["status"].values)
        for name, src in (("star_objid", "objid"), ("star_fiber", "fiber"), ("star_teff", "teff"),
                          ("star_logg", "logg"), ("star_feh", "feh"), ("star_rv", "rv"),
                          ("star_ebv", "ebv"), ("star_snr", "snr")):
            star[name][:n] = stars.variables[src].values[:n]
        star["star_status"][:n] = [str(s) for s in status[:n]]
    return star


def read_rows(path, rows, names):
    """Arrays of the archive at ``rows`` (store rows, e.g. from ``index``), read directly from
    the Zarr store: what a task on a worker needs of a few exposures.

    Parameters
    ----------
    path : path-like
        The archive.
    rows : sequence of int
        Store rows (committed rows are never rewritten: safe to read while a writer appends).
    names : sequence of str
        Arrays to read (per-exposure fields, spectra or star fields).

    Returns
    -------
    dict of str to numpy.ndarray
        Each with the rows first, in the order given; text as ``str``.
    """
    import zarr

    group = zarr.open_group(path, mode="r")
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows)
    back = np.argsort(order)
    out = {}
    for name in names:
        array = group[name]
        sel = (rows[order],) + (slice(None),) * (array.ndim - 1)
        data = np.asarray(array.get_orthogonal_selection(sel))[back]
        if data.dtype.kind in "TO":
            data = np.array(data.tolist(), dtype=str).reshape(data.shape)
        out[name] = data
    return out


def read_own(path, rows):
    """The exposures' own-standards data at store ``rows``: the ``own`` argument of
    :func:`archive_record` for each (rows written before schema 3 with FCALSRC 'standards'
    give their ``cal_smooth``, without a shape variance).

    Returns
    -------
    list of dict
        ``own_smooth``, ``own_smooth_variance`` (float32, archive grid) and ``star`` (the
        per-star fields), one per row; ``band_ratio`` (the telluric bands' transmission,
        cal_smooth / cal) for rows without fitted telluric columns.
    """
    data = read_rows(path, rows, ["own_smooth", "own_smooth_variance", "cal_smooth", "cal",
                                  "fcalsrc", "fcalo2", "fcalh2o", *_STAR_FIELDS])
    out = []
    for k in range(len(rows)):  # a handful of rows per task
        smooth = data["own_smooth"][k]
        if not np.isfinite(smooth).any() and data["fcalsrc"][k] == "standards":
            smooth = data["cal_smooth"][k]
        entry = {"own_smooth": smooth.astype(np.float32),
                 "own_smooth_variance": data["own_smooth_variance"][k].astype(np.float32),
                 "star": {name: data[name][k].astype(object if dtype is str else dtype)
                          for name, (dtype, _) in _STAR_FIELDS.items()}}
        if not np.isfinite([data["fcalo2"][k], data["fcalh2o"][k]]).any():
            # No telluric fit: the bands' absorption is the calibration's own.
            with np.errstate(invalid="ignore", divide="ignore"):
                entry["band_ratio"] = data["cal_smooth"][k] / data["cal"][k]
        out.append(entry)
    return out


_WHAT_IS_EXPECTED = "expected the archive.zarr a survey job writes in its --out directory"


def _open_group(path, mode):
    """The archive's Zarr group, committed row count and index (expid -> row)."""
    import zarr

    from ..errors import InputError

    try:
        group = zarr.open_group(path, mode=mode)
    except Exception:  # zarr's errors name its store classes, not what the user gave
        raise InputError(path, None, "not a calibration archive: not a Zarr store (no "
                         f"zarr.json); {_WHAT_IS_EXPECTED}") from None
    try:
        return group, int(group.attrs["rows"]), dict(group.attrs["index"])
    except (KeyError, TypeError, ValueError):
        raise InputError(path, None, "not a calibration archive: a Zarr store without the "
                         f"archive's attributes (rows, index); {_WHAT_IS_EXPECTED}") from None


class ArchiveWriter:
    """Appends calibrations to the archive; used by one process (the survey's client).

    Parameters
    ----------
    path : path-like
        The Zarr store; created when absent.
    """

    def __init__(self, path):
        import zarr

        self.path = Path(path)
        self._zarr = zarr
        if not self.path.exists():
            self._create()
        self.group, self.rows, self.index = _open_group(self.path, "r+")
        self._migrate()
        # The row arrays, opened once: each look-up reads the array's metadata from the store
        # (~0.5 ms), and this writer is the only one that changes them.
        self._row_arrays = self._repair()
        self.hashes = {}
        if self.index:
            hashes = self.group["input_hash"][: self.rows]
            self.hashes = {e: str(hashes[r]) for e, r in self.index.items()}

    def _create(self):
        # Built in a temporary directory and renamed: a job killed while creating the arrays
        # leaves no half-made archive that later runs could not open.
        from .._atomic import atomic_directory

        with atomic_directory(self.path) as tmp:
            self._populate(self._zarr.open_group(tmp, mode="w"))

    def _populate(self, group):
        grid = archive_grid()
        units = {**_SPECTRA_UNITS, **_ROW_UNITS, **_STAR_UNITS}
        attributes = {
            "wavelength": {"units": "Angstrom", "medium": "air",
                           "definition": json.dumps(ARCHIVE_GRID)},
            "cal": {"description": "CAL_FACTOR x pixel width: flux density per count per "
                                   "Angstrom; throughput = 1 / (cal * exptime)"},
            "cal_mask": {"description": "True = measured (not bridged, inside range)"}}
        specs = [("wavelength", ("wavelength",), (grid.size,), (grid.size,), "f8", np.nan)]
        specs += [(name, ("exposure", "wavelength"), (0, grid.size), (_ROW_CHUNK, grid.size),
                   dtype, fill) for name, (dtype, fill) in _SPECTRA.items()]
        specs += [(name, ("exposure",), (0,), (_BLOCK,), str if dtype is str else dtype, fill)
                  for name, (dtype, fill) in _ROW_FIELDS.items()]
        specs += [(name, ("exposure", "star"), (0, MAX_STARS), (_BLOCK, MAX_STARS),
                   str if dtype is str else dtype, fill)
                  for name, (dtype, fill) in _STAR_FIELDS.items()]
        # Every array created at once, with its attributes (one metadata write each).
        async_group = _together([self._zarr.api.asynchronous.open_group(group.store_path,
                                                                        mode="r+")])[0]
        _together(async_group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
            dimension_names=list(dims),
            attributes={**attributes.get(name, {}), **({"units": units[name]}
                                                       if name in units else {})})
            for name, dims, shape, chunks, dtype, fill in specs)
        group["wavelength"][:] = grid
        group.attrs.update({"rows": 0, "index": {}, "title": "kspec-fluxcal calibration archive",
                            "schema_version": SCHEMA_VERSION,
                            "how_to_read": _HOW_TO_READ,
                            "kspec_fluxcal_version": __version__, "cal_factor_units": CAL_UNIT,
                            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})

    def _migrate(self):
        """Bring an archive of an older schema to this one (arrays added, empty for the old
        rows); refuse one from a newer package."""
        from ..errors import InputError

        version = int(self.group.attrs.get("schema_version", 1))
        if version > SCHEMA_VERSION:
            raise InputError(self.path, None, f"written by a newer kspec-fluxcal (archive schema "
                             f"{version}, this one knows {SCHEMA_VERSION}): update the package")
        if version == SCHEMA_VERSION:
            return
        capacity = max(a.shape[0] for a in self._arrays())
        for name, (dtype, fill) in _ROW_FIELDS.items():
            if name not in self.group:
                self.group.create_array(name, shape=(capacity,), chunks=(_BLOCK,),
                                        dtype=str if dtype is str else dtype, fill_value=fill,
                                        dimension_names=["exposure"])
        size = self.group["wavelength"].shape[0]
        for name, (dtype, fill) in _SPECTRA.items():
            if name not in self.group:
                self.group.create_array(name, shape=(capacity, size), chunks=(_ROW_CHUNK, size),
                                        dtype=dtype, fill_value=fill,
                                        dimension_names=["exposure", "wavelength"])
        self.group.attrs["schema_version"] = SCHEMA_VERSION

    def _arrays(self):
        return [a for _, a in self.group.arrays() if a.metadata.dimension_names
                and a.metadata.dimension_names[0] == "exposure"]

    def _repair(self):
        """Bring every row array to the same capacity (a killed resize may have left some);
        returns them by name."""
        arrays = self._arrays()
        capacity = max(a.shape[0] for a in arrays)
        for a in arrays:
            if a.shape[0] != capacity:
                a.resize((capacity,) + a.shape[1:])
        return {a.basename: a for a in arrays}

    def is_current(self, expid, input_hash):
        """True when ``expid`` is archived with the same inputs."""
        return bool(input_hash) and self.hashes.get(expid) == input_hash

    def _check_no_other_writer(self):
        """Refuse to write over rows committed by another writer since this one opened the
        archive (the survey's lock prevents it; this catches writers that bypass it)."""
        from ..errors import InputError

        stored = int(self._zarr.open_group(self.path, mode="r").attrs["rows"])
        if stored != self.rows:
            raise InputError(self.path, None, f"another writer committed {stored - self.rows} "
                             "row(s) since this one opened it; one writer at a time (is another "
                             "survey job writing to this archive?)")

    def batch_size(self, most):
        """How many records to append next: ``most``, or fewer when fewer bring the rows to
        a chunk boundary of the row arrays (:data:`_BLOCK` rows), so that the next append
        starts on one. An append that starts inside a chunk reads, decodes and
        encodes again the chunks it shares with the previous one (64 rows: ~0.20 instead of
        ~0.14 s of CPU; after a resume, or a commit made by time, every one would)."""
        to_boundary = -self.rows % _BLOCK or _BLOCK
        return to_boundary if to_boundary <= most else most

    def append(self, records):
        """Write records (from :func:`archive_record`) as new rows, then commit them."""
        if not records:
            return
        self._check_no_other_writer()
        start, n = self.rows, len(records)
        need = start + n
        arrays = self._row_arrays
        capacity = arrays["cal"].shape[0]
        if need > capacity:
            new = _capacity(need, capacity)
            _together(a.async_array.resize((new,) + a.shape[1:]) for a in arrays.values())
        rows = slice(start, need)
        values = {name: np.stack([r[name] for r in records]) for name in _SPECTRA}
        for name, (dtype, _) in _ROW_FIELDS.items():
            values[name] = np.array([r["row"][name] for r in records],
                                    dtype=object if dtype is str else dtype)
        for name, (dtype, _) in _STAR_FIELDS.items():
            values[name] = np.stack([r["star"][name] for r in records]).astype(
                object if dtype is str else dtype)
        _together(arrays[name].async_array.setitem(rows, v) for name, v in values.items())
        index = dict(self.index)
        for k, r in enumerate(records):
            index[r["row"]["expid"]] = start + k
        # The commit: one atomic write of the group metadata, once every array's data are
        # written. The writer's own state follows only once it is done, so an interrupted
        # append can simply be repeated.
        self.group.attrs.update({"rows": need, "index": index})
        self.rows, self.index = need, index
        self.hashes.update({r["row"]["expid"]: r["row"]["input_hash"] for r in records})


def _capacity(need, capacity):
    """The row arrays' capacity for ``need`` rows, from ``capacity``: whole blocks
    (:data:`_BLOCK`), grown by as many rows as the capacity has (at most
    :data:`_GROWTH_MAX`), so that a growing archive is resized ever more rarely."""
    step = min(max(capacity, _BLOCK), _GROWTH_MAX)
    return max(-(-need // _BLOCK), -(-(capacity + step) // _BLOCK)) * _BLOCK


def _together(operations):
    """Run Zarr's asynchronous ``operations`` (coroutines) at once, in one call to Zarr's
    event loop, and wait for every one of them; their results, or the first error raised.

    One array written or resized at a time, each a round trip to Zarr's loop and its own
    chunk tasks, an archive commit (~50 arrays) cost ~0.27 s of CPU; together, ~0.1 s
    (benchmarks/HISTORY.md). Every operation has finished when this returns, failed or not:
    nothing still writes when the caller commits, or repeats a failed append.
    """
    import asyncio

    # Zarr's bridge to its own event loop, on which its synchronous arrays' coroutines run:
    # not in Zarr's documented API (zarr-python issue 3859 asks for a public one), present
    # in every 3.x release so far; test_archive's appends fail at once if it goes.
    from zarr.core.sync import sync

    operations = list(operations)  # made here, awaited on Zarr's loop

    async def run():
        return await asyncio.gather(*operations, return_exceptions=True)

    results = sync(run())
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def open_archive(path):
    """Open the calibration archive as a lazy Dataset of its current, committed rows.

    Parameters
    ----------
    path : path-like
        ``archive.zarr`` written by the survey job.

    Returns
    -------
    xarray.Dataset
        Dims (exposure, wavelength, star), Dask-backed, sorted by MJD; the exposure index
        is ``expid``.
    """
    import dask.array as da

    from ..errors import InputError

    path = Path(path)
    if not path.exists():
        raise InputError(path, None, "no such archive")
    group, rows, index = _open_group(path, "r")
    order = np.array(sorted(index.values()), dtype=int)
    variables, coords = {}, {}
    for name, array in group.arrays():
        dims = tuple(array.metadata.dimension_names or ())
        if dims and dims[0] == "exposure":
            data = da.from_zarr(array)[:rows]
            data = data[order] if order.size else data[:0]
            if array.dtype.kind in "TO" or name in _ROW_FIELDS or name in _STAR_FIELDS:
                data = np.asarray(data.compute())
                if data.dtype.kind in "TO":
                    data = np.array(data.tolist(), dtype=str).reshape(data.shape)
                coords[name] = (dims, data, dict(array.attrs))
            else:
                variables[name] = (dims, data, dict(array.attrs))
        elif name == "wavelength":
            coords[name] = (dims, array[:], dict(array.attrs))
    ds = xr.Dataset(variables, coords=coords, attrs=dict(group.attrs))
    # Bookkeeping of the store (rows: committed ones, superseded included), not true of ds;
    # the FITS CAL_FACTOR's unit is per count per pixel, not ds.cal's (its own units say).
    for name in ("index", "how_to_read", "rows", "cal_factor_units"):
        ds.attrs.pop(name, None)
    for name, units in {**_SPECTRA_UNITS, **_ROW_UNITS, **_STAR_UNITS}.items():  # archives
        if name in ds.variables:                          # written before these units were stored
            ds[name].attrs.setdefault("units", units)
    if ds.sizes.get("exposure", 0):
        ds = ds.sortby("mjd")
    return ds.set_xindex("expid")

