"""The standard-star catalog (ATLAS Refcat2 CSV, formats contract section 2) as xarray, and
the matching of standard-star fibers to it."""

from __future__ import annotations

import csv
import os
import re
import warnings
import weakref

import numpy as np
import xarray as xr

from ._atomic import check_regular_file
from ._datasets import dataset
from ._inputs import expect_dataset, refuse_repeated_columns
from .constants import (
    BANDS,
    CATALOG_COLUMNS,
    MAG_ERR_SENTINEL,
    MAG_SENTINEL,
    POSITION_MATCH_ARCSEC,
    STANDARD_TYPE,
    VEGA_TO_AB,
)
from .errors import CatalogError, FluxCalWarning

__all__ = ["read_catalog", "match_standards", "catalog_lookup"]

_REQUIRED = ("objid", "RA", "Dec")
_OPTIONAL = {"Teff": "teff_catalog", "AGaia": "a_gaia", "Ag": "a_g", "plx": "parallax",
             "dplx": "parallax_err"}
_OPTIONAL_UNITS = {"Teff": "K", "AGaia": "mag", "Ag": "mag", "plx": "mas", "dplx": "mas"}
#: Optional Gaia source id column (beyond the contract; extra columns are allowed), to match
#: Gaia XP spectra (:mod:`kspec_fluxcal.xp`); the first present is read.
_SOURCE_ID_COLUMNS = ("source_id", "gaia_source_id")
# An objid is an integer; '123.0' is accepted (a spreadsheet's rewrite), '1.04e16' is not (its
# last digits are lost, and with them the match).
_INTEGER = re.compile(r"^[+-]?\d+(\.0*)?$")
#: A column of plain integers, one per line (``_INTEGER`` row by row only when this fails).
_INTEGERS = re.compile(r"(?:[+-]?\d+\n)*[+-]?\d+")
# Valid positions, deg: (lowest, highest) of RA and Dec. NaN means 'no position'.
_POSITION_RANGE = {"RA": (0.0, 360.0), "Dec": (-90.0, 90.0)}


def _parse_floats(text, fail):
    """``text`` (an object array of numbers written as strings) as float64.

    At the first string that is not a number, ``fail(index, string)`` is called: it raises
    the caller's error, naming the row or sample (here and in :mod:`kspec_fluxcal.xp`).
    """
    try:
        return text.astype(np.float64)
    except ValueError:
        for i, t in enumerate(text):
            try:
                float(t)
            except ValueError:
                fail(i, t)
        raise


def _numeric(values, path, column, rows, error=CatalogError):
    """Convert a column of strings to float64 ('' -> NaN), naming the first bad row."""
    arr = np.asarray(values, dtype=object)
    try:  # a column of numbers only, the usual case: one conversion, no stripped copy
        return arr.astype(np.float64)
    except (ValueError, TypeError):
        pass
    arr = np.where(np.char.strip(arr.astype(str)) == "", "nan", arr)

    def not_a_number(i, v):
        raise error(path, f"column {column} row {rows[i]}",
                    f"value {v!r} is not a number") from None

    return _parse_floats(arr, not_a_number)


def _objids(values, path, rows, column="objid", error=CatalogError, missing=None):
    """Parse a column of integer ids exactly (int64), naming the first bad row.

    ``missing``: the value of an empty cell (None: an empty cell is an error). Also used for
    Gaia source ids (here and in :mod:`kspec_fluxcal.xp`, with its own ``error``).
    """
    text = [str(v).strip() for v in values]
    # One match over the whole column (a value with a line break in it would pass as two);
    # row by row only to name the first bad value.
    joined = "\n".join(text)
    if joined.count("\n") != len(text) - 1 or not _INTEGERS.fullmatch(joined):
        for i, t in enumerate(text):
            where = f"column {column} row {rows[i]}"
            if not t and missing is None:
                raise error(path, where, f"{column} is empty")
            if t and not _INTEGER.match(t):
                raise error(path, where, f"value {t!r} is not an integer {column} (a value "
                            "written as a float, e.g. 1.04e16, has lost its last digits)")
    try:
        return np.array([int(t.split(".")[0]) if t else missing for t in text], dtype=np.int64)
    except OverflowError:
        raise error(path, f"column {column}", "a value does not fit in 64 bits") from None


def _unique_ids(ids, path, column, rows, error=CatalogError, missing=None):
    """Refuse an id that appears twice (``missing`` values apart), naming its rows."""
    known = ids if missing is None else ids[ids != missing]
    uniq, counts = np.unique(known, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1][0]
        where = ", ".join(str(n) for n in np.asarray(rows)[ids == dup])
        raise error(path, f"column {column}", f"{column} {dup} appears more than once "
                    f"(rows {where})")


def _source_ids(col, path, rows):
    """The optional Gaia source id column (``source_id`` or ``gaia_source_id``): int64, -1
    where empty; None when the catalog has neither column."""
    name = next((c for c in _SOURCE_ID_COLUMNS if c in col), None)
    if name is None:
        return None
    ids = _objids(col[name], path, rows, column=name, missing=-1)
    _unique_ids(ids, path, name, rows, missing=-1)
    return ids


def _position(values, path, column, rows):
    """RA or Dec in degrees, NaN where empty; out-of-range values name their row."""
    lo, hi = _POSITION_RANGE[column]
    deg = _numeric(values, path, column, rows)
    bad = ~np.isnan(deg) & ~((deg >= lo) & (deg <= hi))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CatalogError(path, f"column {column} row {rows[i]}",
                           f"value {float(deg[i])!r} is outside {lo:g}..{hi:g} deg")
    return deg


def _checked_bands(path, bands):
    """``bands`` as a list, refused when empty, repeated or naming a band the catalog does
    not have (one name, a string, is taken as one band, not as its letters)."""
    if bands is None:
        return [b for b in BANDS if b in CATALOG_COLUMNS]
    bands = [bands] if isinstance(bands, str) else list(bands)
    unknown = [b for b in bands if b not in CATALOG_COLUMNS]
    repeated = sorted({b for b in bands if bands.count(b) > 1})
    if not bands or unknown or repeated:
        problem = ("no band asked for" if not bands else
                   f"unknown band(s) {', '.join(map(str, unknown))}" if unknown else
                   f"band(s) asked for twice: {', '.join(repeated)}")
        raise CatalogError(path, "bands", f"{problem}; the catalog has "
                           f"{', '.join(CATALOG_COLUMNS)}")
    return bands


def read_catalog(path, bands=None):
    """Read a standard-star catalog in the ATLAS Refcat2 CSV layout.

    Parameters
    ----------
    path : path-like
        CSV file with a header line (column order free, extra columns ignored).
    bands : sequence of str, optional
        Bands to read, by speclite filter name, each once (default: every band of the
        catalog, the keys of :data:`CATALOG_COLUMNS`, in the order of :data:`BANDS`).

    Returns
    -------
    xarray.Dataset
        Dims (star, band): ``mag`` (AB: the contract's Vega-to-AB offsets applied to Gaia and
        2MASS) and ``mag_err``, NaN where not measured (mag >= 99, error >= 9.9 or empty);
        per-star coordinates ``objid`` (indexed: ``sel(objid=...)`` works), ``ra``, ``dec``
        (deg), ``teff_catalog`` (K, NaN when 0 or empty), ``a_gaia``, ``a_g`` (mag),
        ``parallax`` and ``parallax_err`` (mas, as the catalog gives them: Gaia DR2, zero
        point not corrected; NaN when empty, an error of 0 means unknown); ``source_id``
        (int64, -1 when empty) when the catalog has the optional column ``source_id`` or
        ``gaia_source_id`` (Gaia source ids, to match XP spectra: :mod:`kspec_fluxcal.xp`).

    Raises
    ------
    CatalogError
        Unreadable file, missing required columns, non-numeric values, duplicate objids
        (or source ids); ``bands`` empty, repeated or not of the catalog.
    """
    path = os.fspath(path)
    bands = _checked_bands(path, bands)
    header, rows, line_numbers = _read_csv(path)
    _check_table(path, header, rows, line_numbers,
                 [*_REQUIRED, *(c for b in bands for c in CATALOG_COLUMNS[b])])
    table = np.array(rows, dtype=object)  # every row has the header's length (checked)
    col = {name: table[:, i] for i, name in enumerate(header)}
    objid = _objids(col["objid"], path, line_numbers)
    _unique_ids(objid, path, "objid", line_numbers)
    mags, errs = _photometry(col, bands, path, line_numbers)
    coords = {
        "objid": ("star", objid),
        "ra": ("star", _position(col["RA"], path, "RA", line_numbers), {"units": "deg"}),
        "dec": ("star", _position(col["Dec"], path, "Dec", line_numbers), {"units": "deg"}),
        "band": ("band", list(bands)),
        "vega_to_ab": ("band", [VEGA_TO_AB.get(b, 0.0) for b in bands],
                       {"description": "offset added to the catalog magnitude (contract §2)"}),
        **_optional_coords(col, path, line_numbers),
    }
    ds = xr.Dataset(
        {
            "mag": (("star", "band"), mags, {"units": "mag", "system": "AB"}),
            "mag_err": (("star", "band"), errs, {"units": "mag"}),
        },
        coords=coords,
        attrs={"source": path, "format": "ATLAS Refcat2 CSV"},
    )
    return ds.set_xindex("objid")


def _read_csv(path):
    """The header line (stripped names), the non-blank rows of a CSV file and the line
    number of each row, as an editor shows them (blank lines skipped, also before the
    header, are counted)."""
    check_regular_file(path, CatalogError)
    header, rows, numbers = None, [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            last = 0
            for row in reader:
                first, last = last + 1, reader.line_num
                if not any(map(str.strip, row)):
                    continue
                if header is None:
                    header = row
                else:
                    rows.append(row)
                    numbers.append(first)
    except FileNotFoundError:
        raise CatalogError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CatalogError(path, None, f"not a readable CSV file ({err})") from None
    if not header:
        raise CatalogError(path, "header line", "empty file")
    return [h.strip() for h in header], rows, np.asarray(numbers, dtype=np.int64)


def _check_table(path, header, rows, line_numbers, needed):
    """Refuse a catalog without the ``needed`` columns, without stars, or with a row whose
    number of fields differs from the header's."""
    missing = [c for c in needed if c not in header]
    # A database export lower-cases names ('ra', 'dec', 'gaia'): said, not listed as missing.
    named = {h.lower(): h for h in header}
    other_case = {c: named[c.lower()] for c in missing if c.lower() in named}
    if all(c in missing and c not in other_case for c in _REQUIRED):
        # A comment line, semicolons or tabs: the first line is no header; the list of the
        # two dozen columns it lacks would not say so.
        shown = ",".join(header)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CatalogError(path, "header line", f"{shown!r} is not a line of comma-separated "
                           f"column names with {', '.join(_REQUIRED)} (the first non-blank "
                           "line must be the header: no comment lines, commas between "
                           "columns)")
    if missing:
        shown = [repr(h) for h in other_case.values()]
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        hint = ("" if not shown else f" (column names are case-sensitive: the header has "
                f"{', '.join(shown[:3])}{more} in another case)")
        raise CatalogError(path, "header line",
                           f"missing required column(s) {', '.join(missing)}{hint}")
    read = {*needed, *_OPTIONAL, *_SOURCE_ID_COLUMNS}
    refuse_repeated_columns(header, read, CatalogError, path)
    if not rows:
        raise CatalogError(path, None, "no stars (only a header line)")
    # A row with more fields than the header is as wrong as a shorter one: an unquoted comma
    # shifts every later value into the wrong column.
    ragged = [i for i, r in enumerate(rows) if len(r) != len(header)]
    if ragged:
        raise CatalogError(path, f"row {line_numbers[ragged[0]]}",
                           f"has {len(rows[ragged[0]])} fields, the header has {len(header)}")


def _photometry(col, bands, path, rows):
    """AB magnitudes and their errors, (star, band): the contract's Vega-to-AB offsets
    applied, NaN where not measured (sentinels, empty cells)."""
    mags, errs = [], []
    for band in bands:
        mcol, ecol = CATALOG_COLUMNS[band]
        m = _numeric(col[mcol], path, mcol, rows)
        e = _numeric(col[ecol], path, ecol, rows)
        missing_value = (~np.isfinite(m) | ~np.isfinite(e) | (m >= MAG_SENTINEL)
                         | (e >= MAG_ERR_SENTINEL))
        negative = ~missing_value & (e < 0)
        if negative.any():  # 0 is a rounded small error (the fit's error floor applies)
            row = int(np.flatnonzero(negative)[0])
            raise CatalogError(path, f"column {ecol} row {rows[row]}",
                               f"error {float(e[row])!r} mag is negative (9.9 or more, or empty: "
                               "not measured)")
        mags.append(np.where(missing_value, np.nan, m + VEGA_TO_AB.get(band, 0.0)))
        errs.append(np.where(missing_value, np.nan, e))
    return np.stack(mags, axis=1), np.stack(errs, axis=1)


def _optional_coords(col, path, rows):
    """Per-star coordinates of the optional columns (NaN when absent), and ``source_id``
    when the catalog has one."""
    coords = {}
    for column, name in _OPTIONAL.items():
        values = (_numeric(col[column], path, column, rows) if column in col
                  else np.full(len(rows), np.nan))
        if column in ("Teff", "dplx"):  # 0 = unknown (a parallax of 0 or less is a value)
            values = np.where(values > 0, values, np.nan)
        coords[name] = ("star", values, {"units": _OPTIONAL_UNITS[column]})
    source_id = _source_ids(col, path, rows)
    if source_id is not None:
        coords["source_id"] = ("star", source_id, {"description": "Gaia source id, -1 = none"})
    return coords


class _CatalogIndex:
    """Look-ups in a catalog by objid and by position, built once per catalog (a job's
    exposures all match against the same one: sorting a large catalog and building its
    tree of positions for every file cost more than the match)."""

    def __init__(self, catalog):
        self.objid = catalog["objid"].values
        self._order = np.argsort(self.objid, kind="stable")
        self._sorted = self.objid[self._order]
        ra, dec = catalog["ra"].values, catalog["dec"].values
        # Catalog stars without a position can still be matched by objid, never by position.
        self._placed = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
        self._positions = (ra[self._placed], dec[self._placed])
        self._units = self._tree = None

    def by_objid(self, objid):
        """Catalog rows of ``objid`` (-1 where absent); catalog objids are unique."""
        found = np.full(np.shape(objid), -1)
        if self._sorted.size:
            pos = np.clip(np.searchsorted(self._sorted, objid), 0, self._sorted.size - 1)
            hit = self._sorted[pos] == objid
            found[hit] = self._order[pos[hit]]
        return found

    def nearest(self, ra, dec):
        """The nearest placed catalog row of each position and its separation (arcsec);
        row -1 and separation NaN when the catalog has no positions."""
        if not self._placed.size:
            return np.full(np.shape(ra), -1), np.full(np.shape(ra), np.nan)
        query = _unit_vectors(ra, dec)
        if self._units is None:
            self._units = _unit_vectors(*self._positions)
        if self._placed.size * max(query.size // 3, 1) <= _BRUTE_FORCE_PAIRS:
            # A few fibers against a catalog of a survey: no tree (importing scipy.spatial
            # alone costs ~0.1 s of a command's start-up); the largest u.v is the nearest.
            row = np.argmax(query @ self._units.T, axis=-1)
        else:
            if self._tree is None:
                from scipy.spatial import cKDTree

                self._tree = cKDTree(self._units)
            row = self._tree.query(query)[1]
        chord = np.sqrt(np.sum((query - self._units[row]) ** 2, axis=-1))
        angle = 2.0 * np.arcsin(np.minimum(chord / 2.0, 1.0))
        return self._placed[row], np.degrees(angle) * 3600.0


#: Largest (positions x catalog stars) matched by comparing all pairs, without a tree.
_BRUTE_FORCE_PAIRS = 500_000


def _unit_vectors(ra, dec):
    """Cartesian unit vectors (n, 3) of positions in degrees: chord distances between them
    order neighbours as angular separations do."""
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


#: id(catalog) -> (weak reference to it, its _CatalogIndex); an entry goes with its catalog.
_INDEXES = {}


def _catalog_index(catalog):
    """The :class:`_CatalogIndex` of a catalog Dataset, built on its first match."""
    key = id(catalog)
    hit = _INDEXES.get(key)
    if hit is not None and hit[0]() is catalog:
        return hit[1]
    index = _CatalogIndex(catalog)
    _INDEXES[key] = (weakref.ref(catalog, lambda _, key=key: _INDEXES.pop(key, None)), index)
    return index


def match_standards(exposure, catalog, *, radius_arcsec=POSITION_MATCH_ARCSEC):
    """Find the catalog entry of every standard-star fiber (TYPE 'C') of an exposure.

    Matching is by OBJID; fibers with OBJID -1 are matched by position, to the nearest
    catalog star within ``radius_arcsec``. A standard with no catalog entry is kept with
    ``match = 'none'`` (and a warning), so that it can be reported; it is never guessed.

    Parameters
    ----------
    exposure : xarray.Dataset
        From :func:`kspec_fluxcal.open_exposure`.
    catalog : xarray.Dataset
        From :func:`read_catalog`.
    radius_arcsec : float
        Positional matching radius.

    Returns
    -------
    xarray.Dataset
        Dim ``star`` (one per standard fiber) with coordinates ``fiber``, ``fiber_name``,
        ``objid`` (the catalog's, -1 when unmatched), ``match`` ('objid', 'position' or
        'none'), ``separation`` (arcsec), ``teff_catalog``, ``a_gaia``, ``a_g``,
        ``parallax``, ``parallax_err`` (mas), ``source_id`` when the catalog has one (-1
        when unmatched); and the catalog photometry ``mag``, ``mag_err`` (star, band), NaN
        when unmatched.
    """
    expect_dataset(exposure, "exposure", "match_standards", "kspec_fluxcal.open_exposure",
                   ("fiber_type", "objid", "ra", "dec"))
    expect_dataset(catalog, "catalog", "match_standards", "kspec_fluxcal.read_catalog",
                   ("objid", "mag", "band"))
    fibres = exposure.variables  # arrays without a DataArray around each (~25 us apiece)
    std = fibres["fiber_type"].values == STANDARD_TYPE
    fibers, fib_objid, fib_ra, fib_dec = (fibres[n].values[std]
                                          for n in ("fiber", "objid", "ra", "dec"))
    cat_objid = catalog.variables["objid"].values
    index, how, sep = catalog_lookup(catalog, fib_objid, fib_ra, fib_dec, radius_arcsec)
    keep = _one_fiber_per_star(exposure, fibers, index, how, cat_objid)
    fibers, fib_objid, fib_ra, fib_dec = (a[keep] for a in (fibers, fib_objid, fib_ra, fib_dec))
    index, how, sep = index[keep], how[keep], sep[keep]
    fiber_names = fibres["fiber_name"].values[std][keep]
    unmatched = how == "none"
    if unmatched.any():
        names = fiber_names[unmatched]
        labels = ", ".join(f"fiber {f} ({n or 'no name'}, OBJID {o})"
                           for f, n, o in zip(fibers[unmatched], names, fib_objid[unmatched],
                                              strict=True))
        warnings.warn(f"{exposure.attrs.get('expid', '')}: no catalog entry for standard(s) "
                      f"{labels}; skipped", FluxCalWarning, stacklevel=2)
    return _matched_rows(catalog, index, {
        "ra": ("star", fib_ra, {"units": "deg"}), "dec": ("star", fib_dec, {"units": "deg"}),
        "fiber": ("star", fibers), "fiber_name": ("star", fiber_names), "match": ("star", how),
        "separation": ("star", sep, {"units": "arcsec"})}, fib_objid)


#: Per-star coordinates of :func:`match_standards` taken from the catalog, with the value of
#: a standard without a catalog entry; given without attrs (as they always were).
_MATCHED_COORDS = {"teff_catalog": np.nan, "a_gaia": np.nan, "a_g": np.nan}


def _matched_rows(catalog, index, fiber_coords, fib_objid):
    """The catalog's rows ``index`` (-1: none; NaN photometry) as :func:`match_standards`'s
    Dataset, with the fibers' own coordinates ``fiber_coords`` and, unmatched, the OBJID the
    fiber asked for (-1 for positional matching), for reports.

    Built once from its variables (numpy rows): a selection of the catalog, then coordinates
    assigned to it, merged and aligned the whole Dataset at each step (~3 ms an exposure).
    """
    found = index >= 0
    take = np.where(found, index, 0)
    variables = catalog.variables
    # NaN photometry when unmatched (and float variables); otherwise a no-op
    masked = (~found).any() or any(variables[n].dtype.kind != "f" for n in catalog.data_vars)
    cond = xr.Variable("star", found)
    rows = {}
    for name, var in variables.items():
        if name == "star" or "star" not in var.dims:
            rows[name] = var
            continue
        var = xr.Variable(var.dims, np.take(var.values, take, axis=var.dims.index("star")),
                          dict(var.attrs))
        rows[name] = var.where(cond) if masked and name in catalog.data_vars else var
    rows["objid"] = xr.Variable("star", np.where(found, rows["objid"].values, fib_objid))
    for name, missing in _MATCHED_COORDS.items():
        rows[name] = xr.Variable("star", np.where(found, rows[name].values, missing))
    for name in ("parallax", "parallax_err"):
        rows[name] = xr.Variable("star", np.where(found, rows[name].values, np.nan),
                                 {"units": "mas"})
    if "source_id" in catalog.coords:
        rows["source_id"] = xr.Variable("star", np.where(found, rows["source_id"].values,
                                                         -1).astype(np.int64))
    rows.update({name: xr.Variable(*value) for name, value in fiber_coords.items()})
    return dataset({name: rows[name] for name in catalog.data_vars},
                   {name: var for name, var in rows.items()
                    if name not in catalog.data_vars and name != "star"},
                   catalog.attrs, indexes={name: idx for name, idx in catalog.xindexes.items()
                                           if "star" not in catalog.variables[name].dims})


def catalog_lookup(catalog, objid, ra, dec, radius_arcsec=POSITION_MATCH_ARCSEC):
    """Catalog rows of fibers: by OBJID, and by position (nearest within ``radius_arcsec``)
    for fibers whose OBJID is -1.

    Parameters
    ----------
    catalog : xarray.Dataset
        From :func:`read_catalog`.
    objid, ra, dec : numpy.ndarray
        Per fiber: FIBRES OBJID, RA and Dec (deg).
    radius_arcsec : float

    Returns
    -------
    index : numpy.ndarray of int
        Catalog row of each fiber, -1 when none.
    how : numpy.ndarray of str
        'objid', 'position' or 'none'.
    separation : numpy.ndarray
        arcsec (0 for OBJID matches, NaN where not tried).
    """
    lookup = _catalog_index(catalog)
    index = np.full(objid.size, -1)
    how = np.full(objid.size, "none", dtype="<U8")
    sep = np.full(objid.size, np.nan)
    by_id = objid != -1
    index[by_id] = lookup.by_objid(objid[by_id])
    how[by_id & (index >= 0)] = "objid"
    by_pos = ~by_id & np.isfinite(ra) & np.isfinite(dec)
    if by_pos.any():
        nearest, distance = lookup.nearest(ra[by_pos], dec[by_pos])
        close = distance <= radius_arcsec
        pos = np.flatnonzero(by_pos)
        index[pos[close]] = nearest[close]
        how[pos[close]] = "position"
        sep[pos] = distance
    sep[how == "objid"] = 0.0
    return index, how, sep


def _median_snr(exposure, fibers):
    """Median S/N over the good pixels of each of ``fibers`` (rows of the exposure)."""
    one = exposure.isel(fiber=list(fibers))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = (one["flux"] / np.sqrt(one["variance"])).where(one["good"]).values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a dead fiber: all-NaN
        return np.nan_to_num(np.nanmedian(snr, axis=1), nan=-np.inf)


def _one_fiber_per_star(exposure, fibers, index, how, cat_objid):
    """Keep one fiber per catalog star: the highest median S/N, the first on ties.

    Two fibers matched to the same catalog entry (a duplicated FIBRES row, or a position
    given twice) would otherwise be fitted twice and vote twice in the combination. Each
    skipped fiber is named in a warning (a note in the history).
    """
    keep = np.ones(fibers.size, dtype=bool)
    stars, counts = np.unique(index[index >= 0], return_counts=True)
    for star in stars[counts > 1]:
        group = np.flatnonzero(index == star)
        snr = _median_snr(exposure, fibers[group])
        best = group[int(np.argmax(snr))]  # argmax: the first of equal values
        keep[group] = group == best
        ways = set(how[group])
        same = {"objid": "same OBJID", "position": "same position"}.get(
            ways.pop() if len(ways) == 1 else "", "matched by OBJID and by position")
        listed = [str(f) for f in fibers[group]]
        why = ("the highest median S/N" if np.ptp(snr) > 0 else "equal S/N: the first")
        warnings.warn(f"{exposure.attrs.get('expid', '')}: fibers {', '.join(listed[:-1])} and "
                      f"{listed[-1]} are the same catalog star (objid {cat_objid[star]}, {same}): "
                      f"kept fiber {fibers[best]} ({why}, S/N {snr[group == best][0]:.1f}); "
                      "one star, one vote", FluxCalWarning, stacklevel=3)
    return keep

