"""Gaia XP spectra of the standard stars (optional input): reading, matching, comparison.

Gaia DR3 publishes low-resolution BP/RP ("XP") spectra, 336-1020 nm, of every star brighter
than G ~ 17.6, which all K-SPEC standards are. They measure each standard's broad shape
independently of the templates. Where a standard has one, its model's photometric warp
(:func:`kspec_fluxcal.photometric_fit.warp_basis`) is fitted jointly to its bands and to XP /
model at XP's resolution (:func:`kspec_fluxcal.photometric_fit.fit_warp`): the template supplies
the lines, XP the continuum, the photometry the level.

Input format (:func:`read_xp`): the table GaiaXPy's ``calibrate`` writes, CSV or ECSV, one row
per star: ``source_id`` (Gaia DR3, int64), ``flux`` and ``flux_error`` (W m^-2 nm^-1), each
cell an array written ``[v1, v2, ...]`` or ``(v1, v2, ...)``; an empty or NaN sample is
missing. The sampling (nm, vacuum) is a ``wavelength`` or ``sampling`` column, else a
``sampling`` entry of the ECSV metadata or a ``# sampling: [...]`` comment line, else
GaiaXPy's default ``numpy.arange(336, 1021, 2)`` when the arrays have its 343 samples.
Optional ``ra`` and ``dec`` (deg) allow matching by position.

Matching (:func:`match_xp`): by Gaia source id when the catalog has a ``source_id`` (or
``gaia_source_id``) column, else (and for catalog stars without one) by position within the
fiber-matching radius (2 arcsec).

What is compared (:func:`xp_resolution`, :func:`xp_level`): the standard's model at Earth
(template x reddening x photometric scale, before the warp), on the star's own pixels,
seen through a Gaussian line spread of FWHM lambda / :data:`XP_RESOLVING_POWER` (the
instrument's own, 10-50 times narrower, is neglected) and sampled at the XP wavelengths at
least :data:`MARGIN_FWHM` XP FWHM inside the star's range. An XP spectrum whose median ratio
to that model is not within ``[xp] level_tolerance`` of 1 is not used (wrong units, another
star): the star is flagged and calibrated from its photometry alone.

What is not corrected: the published corrections of XP's systematics (Huang et al. 2024,
ApJS 271, 13) are not available offline and none is applied; their residual accuracy (~1 %
redward of 400 nm, < 2 % at 336-400 nm) is the default systematic floor of the fit
(``[xp] systematic_red``, ``systematic_blue``), as a smooth error (``systematic_terms``).
"""

from __future__ import annotations

import csv
import os
import re
from types import SimpleNamespace

import numpy as np
import xarray as xr

from ._atomic import check_regular_file
from ._inputs import refuse_repeated_columns
from .catalog import _numeric, _objids, _parse_floats, _unique_ids
from .constants import (
    FWHM_PER_SIGMA,
    POSITION_MATCH_ARCSEC,
    XP_BLUE_EDGE_NM,
    XP_DEFAULT_SAMPLING_NM,
    XP_FLUX_TO_CGS,
    XP_RESOLVING_POWER,
    XP_SAMPLES_PER_COEFFICIENT,
)
from .errors import InputError
from .wavelength import vacuum_to_air

__all__ = ["read_xp", "match_xp", "standards_xp", "xp_resolution", "xp_level", "xp_rows",
           "systematic_floor", "default_sampling", "MARGIN_FWHM"]

#: XP samples are compared only this many XP FWHM inside a star's pixels: the line spread
#: must see model everywhere (2 FWHM = 4.7 sigma).
MARGIN_FWHM = 2.0
#: A sample is compared only when good model pixels carry this fraction of its line spread.
_MIN_KERNEL_FRACTION = 0.95
#: Magnitudes per unit of natural log.
_MAG_PER_LN = 2.5 / np.log(10.0)
_REQUIRED = ("source_id", "flux", "flux_error")
_ARRAY = re.compile(r"^\s*[\[(](.*)[\])]\s*$", re.S)
_MISSING = ("", "nan", "--", "null", "none")
_SAMPLING_COMMENT = re.compile(r"^#\s*sampling\s*[:=]\s*(.*)$", re.I)


def default_sampling():
    """GaiaXPy's default sampling of calibrated XP spectra, nm in vacuum (343 samples)."""
    lo, hi, step = XP_DEFAULT_SAMPLING_NM
    return np.arange(lo, hi + step / 2, step)


# ----------------------------------------------------------------------------- reading


def read_xp(path):
    """Read a table of sampled Gaia XP spectra (the layout GaiaXPy's ``calibrate`` writes).

    Parameters
    ----------
    path : path-like
        CSV or ECSV (recognised by its ``# %ECSV`` first line) with columns ``source_id``,
        ``flux``, ``flux_error`` (W m^-2 nm^-1; array cells ``[v1, v2, ...]`` or ``(v1, v2,
        ...)``), optionally ``wavelength`` or ``sampling`` (nm, vacuum), ``ra`` and ``dec``
        (deg). See the module docstring for the sampling rules.

    Returns
    -------
    xarray.Dataset
        Dims (xp_star, xp_wavelength): ``flux`` and ``flux_error`` in erg s^-1 cm^-2 A^-1
        per AIR Angstrom (NaN = missing sample); coordinates ``source_id``, ``ra``, ``dec``
        (NaN without positions), ``row`` (line of each star in the file), ``xp_wavelength``
        (Angstrom, air) and ``sampling_nm`` (the file's, vacuum). Attrs: ``source``,
        ``sampling`` (where it came from), ``has_position``.

    Raises
    ------
    InputError
        Unreadable file, missing column, an array cell that does not parse (its row and
        column named), arrays of unequal length, a flux error <= 0, a duplicate source_id, no
        usable sampling.
    """
    path = os.fspath(path)
    check_regular_file(path, InputError)
    table = _read_table(path)
    cols, rows = table.columns, table.rows
    missing = [c for c in _REQUIRED if c not in cols]
    if missing:
        raise InputError(path, "header line", f"missing required column(s) {', '.join(missing)}"
                         " (GaiaXPy's calibrate layout: source_id, flux, flux_error)")
    if not rows.size:
        raise InputError(path, None, "no spectra (only a header)")
    ids = _objids(cols["source_id"], path, rows, column="source_id", error=InputError)
    _unique_ids(ids, path, "source_id", rows, error=InputError)
    flux = _array_column(cols["flux"], path, "flux", rows)
    error = _array_column(cols["flux_error"], path, "flux_error", rows, like=flux)
    sampling, origin = _sampling(table, flux.shape[1], path)
    missing_sample = ~np.isfinite(flux) | ~np.isfinite(error)
    bad = ~missing_sample & (error <= 0)
    if bad.any():
        r, k = np.argwhere(bad)[0]
        raise InputError(path, f"column flux_error row {rows[r]}",
                         f"sample {k + 1} is {error[r, k]:g}: errors must be positive (empty "
                         "or NaN for a missing sample)")
    ra, dec = (_position(cols.get(name), path, name, rows) for name in ("ra", "dec"))
    return _as_dataset(path, ids, rows, ra, dec, np.where(missing_sample, np.nan, flux),
                       np.where(missing_sample, np.nan, error), sampling, origin)


def _as_dataset(path, ids, rows, ra, dec, flux, error, sampling, origin):
    """The Dataset of :func:`read_xp`, in the package's units and medium."""
    vac = sampling * 10.0
    air = vacuum_to_air(vac)
    # Flux density per vacuum Angstrom -> per air Angstrom (the pipeline's frame).
    jacobian = np.gradient(vac) / np.gradient(air) if vac.size > 1 else np.ones(1)
    to_cgs = XP_FLUX_TO_CGS * jacobian
    unit = "erg/(s cm2 Angstrom)"
    return xr.Dataset(
        {"flux": (("xp_star", "xp_wavelength"), flux * to_cgs, {"units": unit}),
         "flux_error": (("xp_star", "xp_wavelength"), error * to_cgs, {"units": unit})},
        coords={"source_id": ("xp_star", ids), "row": ("xp_star", rows),
                "ra": ("xp_star", ra, {"units": "deg"}),
                "dec": ("xp_star", dec, {"units": "deg"}),
                "xp_wavelength": ("xp_wavelength", air, {"units": "Angstrom", "medium": "air"}),
                "sampling_nm": ("xp_wavelength", sampling, {"units": "nm",
                                                            "medium": "vacuum"})},
        attrs={"source": path, "sampling": origin, "flux_unit_in": "W m^-2 nm^-1",
               "has_position": int(bool(np.any(np.isfinite(ra) & np.isfinite(dec))))})


def _read_table(path):
    """Columns (name -> per-row cells), line numbers of the rows and metadata of the file."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, None, f"not a readable text table ({err})") from None
    if first.startswith("# %ECSV"):
        return _read_ecsv(path)
    return _read_csv(path)


def _read_csv(path):
    """A CSV table: ``#`` lines are comments (one may give the sampling), blank lines are
    skipped, each row keeps the number of its first line. A quoted cell may span lines (an
    array written by numpy's ``str``, wrapped at 75 characters, as ``pandas.to_csv`` writes
    array cells)."""
    meta, header, body, lines = {}, None, [], []
    fed = []  # the line number of each line given to the CSV reader

    def data_lines(fh):
        for number, line in enumerate(fh, start=1):
            if line.startswith("#"):
                found = _SAMPLING_COMMENT.match(line.strip())
                if found:
                    meta["sampling"] = (found.group(1), number)
                continue
            fed.append(number)
            yield line

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(data_lines(fh))
            while True:
                first = len(fed)  # the reader takes the lines of one row at a time
                row = next(reader, None)
                if row is None:
                    break
                if not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                else:
                    body.append(row)
                    lines.append(fed[first])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(path, None, f"not a readable CSV file ({err})") from None
    if header is None:
        raise InputError(path, "header line", "empty file")
    read = {*_REQUIRED, "wavelength", "sampling", "ra", "dec"}
    refuse_repeated_columns(header, read, InputError, path)
    ragged = [i for i, r in enumerate(body) if len(r) != len(header)]
    if ragged:
        raise InputError(path, f"row {lines[ragged[0]]}", f"has {len(body[ragged[0]])} fields, "
                         f"the header has {len(header)} (array cells must be quoted)")
    columns = {name: [r[i] for r in body] for i, name in enumerate(header)}
    return SimpleNamespace(columns=columns, rows=np.asarray(lines, dtype=np.int64), meta=meta)


def _read_ecsv(path):
    """An ECSV table (astropy): array columns arrive parsed, string cells are parsed later."""
    from astropy.table import Table

    try:
        table = Table.read(path, format="ascii.ecsv")
        with open(path, encoding="utf-8-sig") as fh:
            header_lines = sum(1 for line in fh if line.startswith("#"))
    except Exception as err:  # astropy raises many kinds for a damaged file
        raise InputError(path, None, f"not a readable ECSV table ({err})") from None
    # Line numbers: the comment block, the column names, then one line per row.
    rows = header_lines + 2 + np.arange(len(table), dtype=np.int64)
    columns = {}
    for name in table.colnames:
        data = np.ma.asarray(table[name])
        if data.ndim > 1 or data.dtype.kind == "O":  # array cells (masked samples: NaN)
            columns[name] = list(data.filled(np.nan) if data.dtype.kind == "f" else data)
        else:  # scalars as the text a CSV would hold ('' where masked)
            columns[name] = ["" if m else str(v) for v, m in
                             zip(data.data, np.ma.getmaskarray(data), strict=True)]
    meta = {}
    if "sampling" in table.meta:
        meta["sampling"] = (table.meta["sampling"], None)
    return SimpleNamespace(columns=columns, rows=rows, meta=meta)


def _parse_cell(cell, path, column, row):
    """One array cell as float64 (NaN = missing sample)."""
    if not isinstance(cell, str):  # ECSV arrays arrive parsed
        values = np.ma.filled(np.ma.asarray(cell, dtype=np.float64), np.nan)
        return np.atleast_1d(values)
    found = _ARRAY.match(cell)
    if found is None:
        shown = cell if len(cell) <= 40 else cell[:37] + "..."
        raise InputError(path, f"column {column} row {row}", f"{shown!r} is not an array "
                         "written as [v1, v2, ...] or (v1, v2, ...)")
    body = found.group(1).strip()
    if not body:
        return np.zeros(0)
    tokens = [t.strip() for t in (body.split(",") if "," in body else body.split())]
    text = np.array(["nan" if t.lower() in _MISSING else t for t in tokens], dtype=object)

    def not_a_number(k, t):
        raise InputError(path, f"column {column} row {row}",
                         f"sample {k + 1} ({t!r}) is not a number") from None

    return _parse_floats(text, not_a_number)


def _array_column(cells, path, column, rows, like=None):
    """An array column as (rows, samples); every row as long as the first (or as ``like``)."""
    arrays = [_parse_cell(c, path, column, r) for c, r in zip(cells, rows, strict=True)]
    for k, a in enumerate(arrays):
        n = arrays[0].size if like is None else like.shape[1]
        if a.size != n:
            what = ("flux has " if like is not None else "the first row has ") + str(n)
            raise InputError(path, f"column {column} row {rows[k]}",
                             f"{a.size} samples, {what} (one sampling per table)")
    if not arrays[0].size:
        raise InputError(path, f"column {column} row {rows[0]}", "empty array")
    return np.stack(arrays)


def _sampling(table, n, path):
    """The sampling (nm, vacuum) and where it came from; see the module docstring."""
    for name in ("wavelength", "sampling"):
        if name in table.columns:
            values = _array_column(table.columns[name], path, name, table.rows)
            if values.shape[1] != n or not np.allclose(values, values[0], equal_nan=True):
                raise InputError(path, f"column {name}", f"must be the same {n} wavelengths on "
                                 "every row (one sampling per table)")
            return _checked_sampling(values[0], path, f"column {name}"), f"column {name}"
    if "sampling" in table.meta:
        cell, line = table.meta["sampling"]
        where = f"line {line} (# sampling:)" if line else "ECSV metadata 'sampling'"
        values = _parse_cell(cell if not isinstance(cell, str) else cell.strip(), path,
                             "sampling", line or "meta")
        if values.size != n:
            raise InputError(path, where, f"{values.size} wavelengths for spectra of {n} "
                             "samples")
        return _checked_sampling(values, path, where), where
    default = default_sampling()
    if n == default.size:
        return default, "GaiaXPy default numpy.arange(336, 1021, 2) nm"
    raise InputError(path, "column flux", f"{n} samples per spectrum and no sampling: give a "
                     "'sampling' (or 'wavelength') column, a '# sampling: [...]' line or ECSV "
                     f"meta, in nm; only GaiaXPy's default ({default.size} samples, 336-1020 "
                     "nm) is assumed")


def _checked_sampling(values, path, where):
    if not (np.all(np.isfinite(values)) and np.all(np.diff(values) > 0)):
        raise InputError(path, where, "the sampling must be finite and increasing")
    if values[0] < 100.0 or values[-1] > 3000.0:
        raise InputError(path, where, f"sampling {values[0]:g}-{values[-1]:g} is not in nm "
                         "(expected 336-1020 nm, vacuum)")
    return np.asarray(values, dtype=np.float64)


def _position(cells, path, column, rows):
    """RA or Dec, deg (NaN when the column is absent or empty); out of range names its row."""
    if cells is None:
        return np.full(rows.size, np.nan)
    deg = _numeric(cells, path, column, rows, error=InputError)
    lo, hi = (0.0, 360.0) if column == "ra" else (-90.0, 90.0)
    bad = np.isfinite(deg) & ~((deg >= lo) & (deg <= hi))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"column {column} row {rows[i]}",
                         f"value {float(deg[i])!r} is outside {lo:g}..{hi:g} deg")
    return deg


# ----------------------------------------------------------------------------- matching


def match_xp(matched, xp, *, radius_arcsec=POSITION_MATCH_ARCSEC):
    """The XP spectrum of every standard star, by Gaia source id or position.

    Parameters
    ----------
    matched : xarray.Dataset
        From :func:`kspec_fluxcal.match_standards` (its ``source_id`` when the catalog has
        one, ``ra`` and ``dec`` of the fibers).
    xp : xarray.Dataset
        From :func:`read_xp`.
    radius_arcsec : float
        Positional matching radius.

    Returns
    -------
    index : numpy.ndarray of int
        Row (``xp_star``) of each standard's spectrum, -1 when none.
    how : numpy.ndarray of str
        'source_id', 'position' or 'none'.

    Raises
    ------
    InputError
        When the table cannot be matched at all: the catalog has no source ids and the XP
        table no positions.
    """
    nstar = matched.sizes["star"]
    index = np.full(nstar, -1, dtype=np.int64)
    how = np.full(nstar, "none", dtype="<U9")
    by_id = "source_id" in matched.coords
    if not by_id and not xp.attrs.get("has_position"):
        raise InputError(xp.attrs.get("source"), None, "cannot be matched to the standards: "
                         "the catalog has no source_id (or gaia_source_id) column and the XP "
                         "table has no ra, dec columns")
    wanted = matched["source_id"].values if by_id else np.full(nstar, -1)
    ids = xp["source_id"].values
    order = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[order], wanted), 0, max(ids.size - 1, 0))
    found = (wanted >= 0) & (ids[order][pos] == wanted) if ids.size else np.zeros(nstar, bool)
    index[found], how[found] = order[pos[found]], "source_id"
    # Without a known id (no column, or an empty cell): by position, never over a known id.
    if xp.attrs.get("has_position"):
        _match_position(matched, xp, wanted < 0, index, how, radius_arcsec)
    return index, how


def _match_position(matched, xp, want, index, how, radius_arcsec):
    """Fill ``index``/``how`` for the stars ``want`` by position (in place)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    ra, dec = matched["ra"].values, matched["dec"].values
    want = want & np.isfinite(ra) & np.isfinite(dec)
    placed = np.flatnonzero(np.isfinite(xp["ra"].values) & np.isfinite(xp["dec"].values))
    if not (want.any() and placed.size):
        return
    stars = SkyCoord(ra[want] * u.deg, dec[want] * u.deg)
    table = SkyCoord(xp["ra"].values[placed] * u.deg, xp["dec"].values[placed] * u.deg)
    nearest, sep, _ = stars.match_to_catalog_sky(table)
    close = sep.to_value(u.arcsec) <= radius_arcsec
    rows = np.flatnonzero(want)[close]
    index[rows], how[rows] = placed[nearest[close]], "position"


def standards_xp(matched, xp):
    """The XP spectra of an exposure's standards, as the fit takes them (None without XP).

    Parameters
    ----------
    matched : xarray.Dataset
        From :func:`kspec_fluxcal.match_standards`.
    xp : xarray.Dataset or path-like or None
        From :func:`read_xp`, or its file.

    Returns
    -------
    types.SimpleNamespace or None
        ``wave`` (nxp; air Angstrom), ``flux`` and ``error`` (nstar, nxp; erg/s/cm^2/A, NaN
        for stars without a spectrum), ``index`` and ``how`` (:func:`match_xp`), ``source``.
    """
    if xp is None:
        return None
    if not isinstance(xp, xr.Dataset):
        xp = read_xp(xp)
    index, how = match_xp(matched, xp)
    has = index >= 0
    take = np.where(has, index, 0)
    flux, error = (np.where(has[:, None], xp[name].values[take], np.nan)
                   if xp.sizes["xp_star"] else np.full((has.size, xp.sizes["xp_wavelength"]),
                                                       np.nan)
                   for name in ("flux", "flux_error"))
    return SimpleNamespace(wave=np.asarray(xp["xp_wavelength"].values, dtype=np.float64),
                           flux=flux, error=error, index=index, how=how,
                           source=str(xp.attrs.get("source", "")))


# ----------------------------------------------------------------------------- comparison


def xp_resolution(star_wave, flux, xp_wave, resolving_power=XP_RESOLVING_POWER,
                  margin=MARGIN_FWHM):
    """Spectra on their own pixels seen at XP's resolution, at the XP wavelengths.

    Parameters
    ----------
    star_wave, flux : numpy.ndarray, shape (nstar, npix)
        Each star's increasing pixels (Angstrom) and flux density (NaN = no value).
    xp_wave : numpy.ndarray, shape (nxp,)
        XP wavelengths, same medium and unit.
    resolving_power : float
        Of the Gaussian line spread, FWHM = lambda / R.
    margin : float
        XP FWHM that a sample must keep from each end of a star's pixels.

    Returns
    -------
    numpy.ndarray, shape (nstar, nxp)
        NaN outside the star's range (less the margin) and where bad pixels carry more than
        5 % of the line spread.
    """
    fwhm = xp_wave / resolving_power
    sigma = fwhm / FWHM_PER_SIGMA
    out = np.full((star_wave.shape[0], xp_wave.size), np.nan)
    for s in range(star_wave.shape[0]):  # a few stars; vectorised over pixels and samples
        wave, f = star_wave[s], flux[s]
        inside = (xp_wave - margin * fwhm >= wave[0]) & (xp_wave + margin * fwhm <= wave[-1])
        if not inside.any():
            continue
        kernel = np.exp(-0.5 * ((wave[None, :] - xp_wave[inside, None])
                                / sigma[inside, None]) ** 2) * np.gradient(wave)[None, :]
        good = np.isfinite(f)
        weight = kernel @ good.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = (kernel @ np.where(good, f, 0.0)) / weight
        out[s, inside] = np.where(weight >= _MIN_KERNEL_FRACTION * kernel.sum(axis=1), value,
                                  np.nan)
    return out


def xp_level(xp_flux, model_xp, tolerance):
    """Median ratio XP / model of each star and whether it is within ``tolerance`` of 1.

    Returns
    -------
    ratio : numpy.ndarray
        NaN for a star without a compared sample.
    ok : numpy.ndarray of bool
    note : list of str
        Why each star's XP is not used ('' when it is, or when it has none).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(np.isfinite(xp_flux) & (model_xp > 0), xp_flux / model_xp, np.nan)
    counted = np.isfinite(r).any(axis=1)
    ratio = np.full(r.shape[0], np.nan)
    if counted.any():
        ratio[counted] = np.nanmedian(r[counted], axis=1)
    ok = counted & (np.abs(ratio - 1.0) <= tolerance)
    has = np.isfinite(xp_flux).any(axis=1)
    note = [("" if ok[s] or not has[s] else
             "XP spectrum not used: no XP sample inside the exposure's range" if not counted[s]
             else _level_note(ratio[s], tolerance)) for s in range(ratio.size)]
    return ratio, ok, note


def _level_note(ratio, tolerance):
    """The reason an XP level is refused, with a hint at the usual mistakes."""
    text = (f"XP spectrum not used: median XP / model {ratio:.3f}, beyond "
            f"{100 * tolerance:g}% of 1")
    hints = {100.0: "wrong units? expected W m^-2 nm^-1 (erg/s/cm2/A given?)",
             0.01: "wrong units? expected W m^-2 nm^-1 (erg/s/cm2/A read as W m^-2 nm^-1?)",
             10.0: "per nm vs per Angstrom?", 0.1: "per nm vs per Angstrom?"}
    for level, hint in hints.items():
        if ratio > 0 and abs(np.log10(ratio / level)) < 0.5:
            return f"{text} ({hint})"
    return f"{text} (another star's spectrum, or a bad one?)"


def systematic_floor(xp_wave, red, blue):
    """XP's fractional systematic floor at ``xp_wave`` (air Angstrom): ``red`` from 400 nm
    on, rising linearly to ``blue`` at 336 nm (continuous, so that the smooth error built on
    it stays smooth)."""
    edge, first = (vacuum_to_air(10.0 * v) for v in (XP_BLUE_EDGE_NM, XP_DEFAULT_SAMPLING_NM[0]))
    return red + (blue - red) * np.clip((edge - xp_wave) / (edge - first), 0.0, 1.0)


def xp_rows(xp_flux, xp_error, model_xp, xp_wave, options):
    """The rows XP adds to the warp's fit (:func:`kspec_fluxcal.photometric_fit.fit_warp`).

    Residuals -2.5 log10(XP / model) per sample. Errors: XP's in magnitudes, inflated by
    sqrt(:data:`~kspec_fluxcal.constants.XP_SAMPLES_PER_COEFFICIENT`) (343 samples of 110
    coefficients: neighbouring samples are correlated), and the systematic floor
    (:func:`systematic_floor`: ``systematic_red`` redward of 400 nm, rising to
    ``systematic_blue`` at 336 nm): added in quadrature
    per sample when ``systematic_terms`` is 0, else a smooth error of that many Legendre
    terms over the XP range whose rms per sample is the floor (nuisance shapes with unit
    normal priors, marginalised by the fit).

    Parameters
    ----------
    xp_flux, xp_error, model_xp : numpy.ndarray, shape (nstar, nxp)
        XP and the model at XP's resolution (:func:`xp_resolution`), same units.
    xp_wave : numpy.ndarray, shape (nxp,)
        Air Angstrom.
    options : mapping
        The configuration's ``[xp]`` section.

    Returns
    -------
    dict
        ``resid`` and ``err`` (nstar, nxp; mag, NaN where no sample) and ``systematic``
        (nstar, nxp, m; mag per unit nuisance).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = xp_flux / model_xp
        noise = _MAG_PER_LN * xp_error / xp_flux * np.sqrt(XP_SAMPLES_PER_COEFFICIENT)
    valid = np.isfinite(ratio) & (ratio > 0) & np.isfinite(noise) & (noise > 0)
    floor = systematic_floor(xp_wave, options["systematic_red"],
                             options["systematic_blue"]) * _MAG_PER_LN
    terms = int(options["systematic_terms"])
    err2 = noise**2 + (floor**2 if terms == 0 else 0.0)
    shapes = np.zeros(xp_wave.shape + (0,))
    if terms:
        lo, hi = (vacuum_to_air(10.0 * v) for v in XP_DEFAULT_SAMPLING_NM[:2])
        t = np.clip(2.0 * (xp_wave - lo) / (hi - lo) - 1.0, -1.0, 1.0)
        legendre = np.stack([np.polynomial.legendre.Legendre.basis(k)(t)
                             for k in range(1, terms + 1)], axis=-1)
        # Mean square of P_k over [-1, 1] is 1 / (2k + 1): the sum's mean is the floor's square.
        norm = np.sqrt(np.sum(1.0 / (2.0 * np.arange(1, terms + 1) + 1.0)))
        shapes = floor[:, None] * legendre / norm
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = np.where(valid, -2.5 * np.log10(np.where(valid, ratio, 1.0)), np.nan)
    return {"resid": resid, "err": np.where(valid, np.sqrt(err2), np.nan),
            "systematic": np.broadcast_to(shapes, xp_flux.shape + shapes.shape[-1:])}
