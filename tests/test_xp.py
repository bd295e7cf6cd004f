"""Gaia XP spectra (issue 15, items 2-4): the reader, matching to standards, the joint warp
fit, the level check, the simulator's XP spectra, the CLI and the QC page."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.table import Table
from conftest import SELF_MODEL, catalog_row, star_vector_error

from kspec_fluxcal.catalog import match_standards, read_catalog
from kspec_fluxcal.cli import main
from kspec_fluxcal.constants import XP_FLUX_TO_CGS
from kspec_fluxcal.errors import CatalogError, FluxCalWarning, InputError
from kspec_fluxcal.exposure import open_exposure
from kspec_fluxcal.fit.exposure_templates import template_library
from kspec_fluxcal.fit.standards import _XP_ARRAYS, fit_standards
from kspec_fluxcal.grid import open_grid
from kspec_fluxcal.grid.build import build_grid
from kspec_fluxcal.photometric_fit import fit_warp, warp_basis
from kspec_fluxcal.photometry import band_wavelength
from kspec_fluxcal.products import read_standard_stars
from kspec_fluxcal.sim import (
    CATALOG_HEADER,
    GridStars,
    Setup,
    simulate_exposure,
    simulate_survey,
    write_catalog,
    write_xp,
    xp_rows,
)
from kspec_fluxcal.sim.xp_spectra import _xp_systematic
from kspec_fluxcal.wavelength import vacuum_to_air
from kspec_fluxcal.xp import default_sampling, match_xp, read_xp, xp_resolution

SETUP = Setup(name="xptest", pixels=2048, fibers=8)
NXP = 343


# ----------------------------------------------------------------------------- helpers


def _cell(values, brackets="[]"):
    text = ", ".join("nan" if not np.isfinite(v) else repr(float(v)) for v in values)
    return f'"{brackets[0]}{text}{brackets[1]}"'


def _xp_csv(path, rows, *, header="source_id,flux,flux_error", comment=None):
    """A GaiaXPy-layout CSV: ``rows`` of (source_id, flux, flux_error[, extra cells])."""
    lines = ([comment] if comment else []) + [header]
    for row in rows:
        lines.append(",".join(str(c) if not isinstance(c, np.ndarray) else _cell(c)
                              for c in row))
    path.write_text("\n".join(lines) + "\n")
    return path


def _flux(n=NXP, level=2e-17):
    nm = np.linspace(336.0, 1020.0, n)
    return level * (nm / 600.0) ** -2


# ----------------------------------------------------------------------------- reader


def test_reads_gaiaxpy_csv_in_package_units(tmp_path):
    flux, err = _flux(), 0.01 * _flux()
    big = 6917528997577384320  # a real-size Gaia DR3 id: must come back exactly
    path = _xp_csv(tmp_path / "xp.csv", [(big, flux, err), (42, flux * 2, err)],
                   header="source_id,flux,flux_error")
    # GaiaXPy may write tuples: "(v1, v2, ...)".
    text = path.read_text().replace('"[', '"(').replace(']"', ')"')
    path.write_text(text)
    xp = read_xp(path)
    assert xp.sizes == {"xp_star": 2, "xp_wavelength": NXP}
    assert xp["source_id"].dtype == np.int64 and xp["source_id"].values[0] == big
    assert list(xp["row"].values) == [2, 3]
    nm = default_sampling()
    assert nm.size == NXP and nm[0] == 336.0 and nm[-1] == 1020.0
    np.testing.assert_allclose(xp["xp_wavelength"].values, vacuum_to_air(10 * nm))
    assert xp["xp_wavelength"].attrs["medium"] == "air"
    assert "default" in xp.attrs["sampling"] and not xp.attrs["has_position"]
    # W m^-2 nm^-1 -> erg s^-1 cm^-2 A^-1 is x100, per air A (the Jacobian is ~1.0003).
    ratio = xp["flux"].values[0] / flux
    assert np.all(np.abs(ratio / XP_FLUX_TO_CGS - 1) < 5e-4) and np.ptp(ratio) > 0
    np.testing.assert_allclose(xp["flux_error"].values[1] / err, ratio)


def test_ecsv_round_trip_with_metadata_sampling(tmp_path):
    nm = np.linspace(400.0, 900.0, 51)
    flux, err = _flux(51), 0.02 * _flux(51)
    flux[3] = np.nan  # a missing sample
    table = Table({"source_id": np.array([7, 8], dtype=np.int64),
                   "flux": np.stack([flux, 2 * flux]), "flux_error": np.stack([err, err]),
                   "ra": [10.0, 10.1], "dec": [-5.0, -5.0]})
    table.meta["sampling"] = nm.tolist()
    path = tmp_path / "xp.ecsv"
    table.write(path, format="ascii.ecsv")
    xp = read_xp(path)
    assert xp.attrs["sampling"] == "ECSV metadata 'sampling'" and xp.attrs["has_position"]
    np.testing.assert_allclose(xp["sampling_nm"].values, nm)
    assert np.isnan(xp["flux"].values[0, 3]) and np.isnan(xp["flux_error"].values[0, 3])
    np.testing.assert_allclose(xp["flux"].values[1, 4:] / (2 * flux[4:]), 100.0, rtol=5e-4)
    np.testing.assert_allclose(xp["ra"].values, [10.0, 10.1])
    # Arrays written as text cells (the CSV way) in an ECSV table read the same.
    text = Table({"source_id": [7], "flux": [_cell(flux).strip('"')],
                  "flux_error": [_cell(err).strip('"')]}, meta={"sampling": nm.tolist()})
    text.write(tmp_path / "text.ecsv", format="ascii.ecsv")
    again = read_xp(tmp_path / "text.ecsv")
    np.testing.assert_array_equal(again["flux"].values[0], xp["flux"].values[0])


def test_sampling_from_a_column_or_a_comment_line(tmp_path):
    nm = np.linspace(350.0, 950.0, 61)
    flux = _flux(61)
    by_column = _xp_csv(tmp_path / "a.csv", [(1, flux, 0.01 * flux, nm)],
                        header="source_id,flux,flux_error,wavelength")
    np.testing.assert_allclose(read_xp(by_column)["sampling_nm"].values, nm)
    comment = "# sampling: [" + ", ".join(map(str, nm)) + "]"
    by_comment = _xp_csv(tmp_path / "b.csv", [(1, flux, 0.01 * flux)], comment=comment)
    xp = read_xp(by_comment)
    np.testing.assert_allclose(xp["sampling_nm"].values, nm)
    assert list(xp["row"].values) == [3]  # the comment is line 1, the header line 2


@pytest.mark.parametrize("case, match", [
    ("missing", r"xp\.csv: header line: missing required column\(s\) flux_error"),
    ("word", r"xp\.csv: column flux row 3: sample 2 \('abc'\) is not a number"),
    ("scalar", r"xp\.csv: column flux_error row 2: '0\.5' is not an array written as"),
    ("short", r"xp\.csv: column flux row 3: 342 samples, the first row has 343"),
    ("mismatch", r"xp\.csv: column flux_error row 2: 342 samples, flux has 343"),
    ("zero-error", r"xp\.csv: column flux_error row 3: sample 5 is 0: errors must be positive"),
    ("duplicate", r"xp\.csv: column source_id: source_id 11 appears more than once \(rows 2, "
                  r"3\)"),
    ("no-sampling", r"xp\.csv: column flux: 100 samples per spectrum and no sampling"),
    ("angstrom", r"xp\.csv: column wavelength: sampling 3360-10200 is not in nm"),
    ("bad-id", r"xp\.csv: column source_id row 2: value '1\.2e18' is not an integer"),
    ("bad-ra", r"xp\.csv: column ra row 3: value 400\.0 is outside 0\.\.360 deg"),
    ("column-twice", r"xp\.csv: header line: column flux appears 2 times \(columns 2, 4\)"),
])
def test_malformed_tables_name_file_row_and_column(tmp_path, case, match):
    f, e = _flux(), 0.01 * _flux()
    rows = [[11, f, e], [12, f, e]]
    header = "source_id,flux,flux_error"
    if case == "missing":
        header, rows = "source_id,flux", [[11, f], [12, f]]
    elif case == "short":
        rows[1][1] = f[:-1]
    elif case == "mismatch":
        rows[0][2] = e[:-1]
    elif case == "zero-error":
        rows[1][2] = np.where(np.arange(NXP) == 4, 0.0, e)
    elif case == "duplicate":
        rows[1][0] = 11
    elif case == "no-sampling":
        rows = [[11, f[:100], e[:100]]]
    elif case == "angstrom":
        header, rows = header + ",wavelength", [[11, f, e, 10 * default_sampling()]]
    elif case == "bad-id":
        rows[0][0] = "1.2e18"
    elif case == "bad-ra":
        header, rows = header + ",ra,dec", [[11, f, e, 10.0, 0.0], [12, f, e, 400.0, 0.0]]
    elif case == "word":
        rows[1][1] = '"[1.0, abc, 3.0]"'
    elif case == "scalar":
        rows[0][2] = "0.5"
    elif case == "column-twice":  # the last column was read, silently
        header, rows = header + ",flux", [r + [100 * f] for r in rows]
    path = _xp_csv(tmp_path / "xp.csv", rows, header=header)
    with pytest.raises(InputError, match=match):
        read_xp(path)


def test_array_cells_may_span_lines(tmp_path):
    """Quoted cells with line breaks (numpy's str of an array, wrapped at 75 characters, as
    pandas.to_csv writes array cells; valid CSV) were refused: 'row 2: has 2 fields, the
    header has 3 (array cells must be quoted)'. Rows keep the line they start on."""
    f, e = _flux(), 0.01 * _flux()
    wrapped = [np.array2string(a, separator=" ", max_line_width=75) for a in (f, e)]
    assert "\n" in wrapped[0]
    text = "# a comment\nsource_id,flux,flux_error\n"
    text += "".join(f'{i},"{wrapped[0]}","{wrapped[1]}"\n\n' for i in (11, 12))
    path = tmp_path / "xp.csv"
    path.write_text(text)
    got = read_xp(path)
    plain = read_xp(_xp_csv(tmp_path / "plain.csv", [[11, f, e], [12, f, e]]))
    np.testing.assert_allclose(got["flux"].values, plain["flux"].values, rtol=1e-6)
    lines = text.splitlines()
    assert [lines[r - 1].split(",")[0] for r in got["row"].values] == ["11", "12"]


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.csv: no such file"):
        read_xp(tmp_path / "nothere.csv")
    (tmp_path / "xp.csv").mkdir()
    with pytest.raises(InputError, match=r"xp\.csv: not a regular file \(a directory\)"):
        read_xp(tmp_path / "xp.csv")


# ----------------------------------------------------------------------------- catalog, matching


def test_catalog_source_id_column(catalog_file):
    header = [*CATALOG_HEADER, "source_id"]
    rows = [catalog_row(1, 150.0, 2.0, source_id="6917528997577384320"),
            catalog_row(2, 150.01, 2.0, source_id="")]
    cat = read_catalog(catalog_file(rows, header=header))
    assert cat["source_id"].dtype == np.int64
    assert list(cat["source_id"].values) == [6917528997577384320, -1]
    alias = [*CATALOG_HEADER, "gaia_source_id"]
    rows = [catalog_row(1, 150.0, 2.0, gaia_source_id="5"),
            catalog_row(2, 150.01, 2.0, gaia_source_id="5")]
    with pytest.raises(CatalogError, match=r"column gaia_source_id: gaia_source_id 5 appears "
                                           r"more than once \(rows 2, 3\)"):
        read_catalog(catalog_file(rows, name="dup.csv", header=alias))
    plain = read_catalog(catalog_file([catalog_row(1, 150.0, 2.0)], name="plain.csv"))
    assert "source_id" not in plain.coords  # the contract's columns only: nothing invented


def test_match_standards_carries_the_source_id(red_file, catalog_file):
    header = [*CATALOG_HEADER, "source_id"]
    # Fibers 0 and 1 are the standards (OBJIDs 1000, 1001); 1001 is not in the catalog.
    cat = read_catalog(catalog_file([catalog_row(1000, 150.0, 2.0, source_id="77")],
                                    header=header))
    with pytest.warns(FluxCalWarning, match="no catalog entry"):
        matched = match_standards(open_exposure(red_file()), cat)
    assert list(matched["source_id"].values) == [77, -1]


def _matched(source_id=None, ra=(10.0, 20.0), dec=(0.0, 0.0)):
    coords = {"ra": ("star", np.array(ra)), "dec": ("star", np.array(dec))}
    if source_id is not None:
        coords["source_id"] = ("star", np.array(source_id, dtype=np.int64))
    return xr.Dataset(coords=coords)


def _table(ids, ra=None, dec=None, tmp_path=None):
    f, e = _flux(), 0.01 * _flux()
    header = "source_id,flux,flux_error" + (",ra,dec" if ra is not None else "")
    rows = [[i, f, e] + ([ra[k], dec[k]] if ra is not None else []) for k, i in enumerate(ids)]
    return read_xp(_xp_csv(tmp_path / f"xp{len(ids)}{ra is None}.csv", rows, header=header))


def test_match_by_source_id_then_position(tmp_path):
    # Positions 1.5 arcsec from the stars (inside the 2 arcsec radius) and far ones.
    xp = _table([5, 6, 7], ra=[10.0 + 1.5 / 3600, 20.0, 30.0], dec=[0.0, 0.0, 0.0],
                tmp_path=tmp_path)
    index, how = match_xp(_matched([7, 5]), xp)  # by id, whatever the positions say
    assert list(index) == [2, 0] and list(how) == ["source_id", "source_id"]
    index, how = match_xp(_matched([-1, 99]), xp)  # unknown id: position; a known id: never
    assert list(index) == [0, -1] and list(how) == ["position", "none"]
    index, how = match_xp(_matched(None, ra=(10.0 - 1.0 / 3600, 20.0)), xp)  # 2.5 arcsec
    assert list(index) == [-1, 1] and list(how) == ["none", "position"]


def test_a_table_that_cannot_be_matched_is_an_error(tmp_path):
    xp = _table([5, 6], tmp_path=tmp_path)  # no ra, dec
    with pytest.raises(InputError, match=r"cannot be matched to the standards: the catalog "
                                         r"has no source_id .* the XP table has no ra, dec"):
        match_xp(_matched(None), xp)
    index, how = match_xp(_matched([6, 1]), xp)
    assert list(index) == [1, -1]


# ----------------------------------------------------------------------------- solver


def test_fit_warp_with_xp_rows_recovers_a_warp_the_bands_cannot():
    """Ten bands cannot see a degree-6 warp; XP's rows (offset free) pin it down. A star
    without XP rows gets exactly the bands-only answer."""
    rng = np.random.default_rng(3)
    wave_range = (3500.0, 8500.0)
    bands = np.linspace(4000.0, 8000.0, 10)
    xp_wave = np.linspace(3700.0, 8300.0, 200)
    degree = 6
    true = np.array([0.01, -0.02, 0.015, 0.01, -0.01, 0.008])
    band_basis = warp_basis(bands, wave_range, degree)
    xp_basis = warp_basis(xp_wave, wave_range, degree)
    mag_obs = 0.3 + band_basis @ true + rng.normal(0.0, 0.002, bands.size)
    mag_obs = np.stack([mag_obs, mag_obs])
    xp_resid = 0.07 + xp_basis @ true  # XP 7 % off in level: the offset takes it
    xp = {"resid": np.stack([xp_resid, np.full(xp_wave.size, np.nan)]),
          "err": np.full((2, xp_wave.size), 0.002),
          "basis": np.broadcast_to(xp_basis, (2,) + xp_basis.shape),
          "systematic": np.zeros((2, xp_wave.size, 0))}
    args = (mag_obs, np.full(mag_obs.shape, 0.002), np.zeros(mag_obs.shape),
            np.broadcast_to(band_basis, (2,) + band_basis.shape), np.ones(mag_obs.shape, bool))
    joint = fit_warp(*args, warp_sigma=0.03, error_floor=0.01, xp=xp)
    bands_only = fit_warp(*args, warp_sigma=0.03, error_floor=0.01)
    curve_true = warp_basis(np.linspace(*wave_range, 500), wave_range, degree) @ true
    curve = warp_basis(np.linspace(*wave_range, 500), wave_range, degree) @ joint["warp"][0]
    assert np.max(np.abs(curve - curve_true)) < 0.002
    assert abs(joint["xp_offset"][0] - 0.07 + (joint["mu"][0] - 0.3)) < 0.002
    assert abs(joint["mu"][0] - 0.3) < 0.005  # the bands set the level, not XP
    bad = warp_basis(np.linspace(*wave_range, 500), wave_range, degree) @ bands_only["warp"][0]
    assert np.max(np.abs(bad - curve_true)) > 0.01  # the bands alone do not see it
    for key in ("mu", "mu_err", "warp", "warp_err", "rms"):
        np.testing.assert_allclose(joint[key][1], bands_only[key][1], rtol=1e-9, atol=1e-12)
    assert np.isnan(joint["xp_resid"][1]).all() and np.nanstd(joint["xp_resid"][0]) < 1e-3


def test_xp_resolution_degrades_and_keeps_the_margin():
    wave = np.linspace(3500.0, 8500.0, 3000)[None, :]
    flat = np.ones_like(wave)
    line = flat - 0.9 * np.exp(-0.5 * ((wave - 6000.0) / 2.0) ** 2)
    xp_wave = vacuum_to_air(10 * default_sampling())
    out = xp_resolution(np.concatenate([wave, wave]), np.concatenate([flat, line]), xp_wave)
    inside = np.isfinite(out[0])
    fwhm = xp_wave / 50.0
    assert np.array_equal(inside, (xp_wave - 2 * fwhm >= 3500.0) & (xp_wave + 2 * fwhm <= 8500.0))
    np.testing.assert_allclose(out[0][inside], 1.0)
    # A 4.7 A wide line of depth 0.9 becomes a ~4 % dip at R = 50.
    assert 0.9 < np.nanmin(out[1]) < 0.99


# ----------------------------------------------------------------------------- simulated world


@pytest.fixture(scope="module")
def world(small_grid, tmp_path_factory):
    root = tmp_path_factory.mktemp("xp")
    cube = build_grid(small_grid, root / "grid.zarr", progress=False)
    stars = GridStars(small_grid)
    sim = simulate_exposure(21, stars, setup=SETUP, n_standards=3, snr_range=(150, 250),
                            position_only=[False, False, False], xp=True)
    red = root / "red.fits"
    sim.hdulist.writeto(red)
    write_catalog(root / "catalog.csv", sim.catalog)
    write_xp(root / "xp.csv", xp_rows(sim.truth, sim.catalog))
    exposure = open_exposure(red).load()
    catalog = read_catalog(root / "catalog.csv")
    grid = open_grid(cube)
    return {"root": root, "stars": stars, "sim": sim, "red": red, "cube": cube,
            "exposure": exposure, "catalog": catalog,
            "library": template_library(grid, exposure, SELF_MODEL)}


def _fit(world, xp=None, exposure=None, catalog=None, config=SELF_MODEL):
    return fit_standards(world["exposure"] if exposure is None else exposure,
                         world["catalog"] if catalog is None else catalog, world["library"],
                         config, xp=xp).compute()


def _write_xp_variant(world, name, flux, error=None):
    """The exposure's XP table with other fluxes (W m^-2 nm^-1, one row per standard)."""
    rows = xp_rows(world["sim"].truth, world["sim"].catalog)
    for k, row in enumerate(rows):
        row["flux"] = flux[k]
        if error is not None:
            row["flux_error"] = error[k]
    path = world["root"] / name
    write_xp(path, rows)
    return read_xp(path)


@pytest.fixture(scope="module")
def plain(world):
    return _fit(world)


def test_simulated_xp_and_catalog_carry_source_ids(world):
    sim, xp = world["sim"], read_xp(world["root"] / "xp.csv")
    assert "source_id" in world["catalog"].coords
    std = [r for r in sim.catalog if r["_role"] == "standard"]
    assert sorted(int(r["source_id"]) for r in std) == sorted(xp["source_id"].values.tolist())
    assert all(r["source_id"] != str(r["objid"]) for r in std)
    assert xp.attrs["has_position"]
    truth = sim.truth
    assert truth["std_xp_flux"].shape == (3, NXP) == truth["std_xp_systematic"].shape
    # The simulated noise: the documented curve, scaled with G.
    relative = truth["std_xp_flux_error"] / (truth["std_xp_true"] * truth["std_xp_systematic"])
    at_600 = np.argmin(np.abs(truth["xp_wavelength_nm"] - 600.0))
    np.testing.assert_allclose(relative[:, at_600],
                               0.005 * 10 ** (0.2 * (truth["std_gmag"] - 15.0)), rtol=1e-9)


def test_simulated_xp_is_the_truth_at_earth_at_xp_resolution(world):
    """The noiseless XP spectrum is each standard's true flux at Earth (the G scaling of the
    exposure included) seen at R = 50: compared with the truth in the RED file's frame."""
    truth = world["sim"].truth
    fibers = truth["std_fiber"]
    air = vacuum_to_air(10 * truth["xp_wavelength_nm"])
    wave = np.broadcast_to(truth["wavelength"], (fibers.size, truth["wavelength"].size))
    expected = xp_resolution(wave, truth["true_flux"][fibers] * 1e-17, air)
    got = truth["std_xp_true"] * XP_FLUX_TO_CGS * np.gradient(10 * truth["xp_wavelength_nm"]) \
        / np.gradient(air)
    inside = np.isfinite(expected)
    assert inside.sum() > 3 * 150
    np.testing.assert_allclose(got[inside], expected[inside], rtol=3e-3)


def test_xp_streams_leave_the_exposure_unchanged(world):
    """The XP draws have their own stream: the RED file and the truth are those of xp=False."""
    sim = world["sim"]
    plain = simulate_exposure(21, world["stars"], setup=SETUP, n_standards=3,
                              snr_range=(150, 250), position_only=[False, False, False])
    for a, b in zip(sim.hdulist, plain.hdulist, strict=True):
        if a.data is not None and not isinstance(a, fits.BinTableHDU):
            np.testing.assert_array_equal(a.data, b.data)
    for key, value in plain.truth.items():
        np.testing.assert_array_equal(sim.truth[key], value, err_msg=key)
    assert {k for k in sim.truth if k not in plain.truth} == {
        "xp_wavelength_nm", "std_xp_flux", "std_xp_flux_error", "std_xp_systematic",
        "std_xp_true"}


def test_simulated_systematic_has_the_documented_size():
    nm = default_sampling()
    s = _xp_systematic(np.random.default_rng(0), 3000, nm)
    red, blue = (nm >= 400) & (nm <= 1000), nm < 400
    rms_red = np.std(s[:, red] / s[:, red].mean(axis=1, keepdims=True), axis=1)
    rms_blue = np.sqrt(np.mean((s[:, blue] / s[:, red].mean(axis=1, keepdims=True) - 1) ** 2,
                               axis=1))
    assert 0.008 < np.median(rms_red) < 0.012
    assert 0.015 < np.sqrt(np.mean(rms_blue**2)) < 0.035


def test_standards_without_xp_behave_exactly_as_before(world, plain):
    """An XP table that matches none of the standards changes nothing but the XP columns."""
    far = xp_rows(world["sim"].truth, world["sim"].catalog)
    for k, row in enumerate(far):
        row["source_id"], row["ra"] = str(10**15 + k), f"{(float(row['ra']) + 1.0) % 360:.6f}"
    write_xp(world["root"] / "none.csv", far)
    with_table = _fit(world, xp=read_xp(world["root"] / "none.csv"))
    assert not with_table["xp_used"].values.any()
    assert list(with_table["xp_match"].values) == ["none"] * 3
    assert np.isnan(with_table["xp_flux"].values).all()
    xr.testing.assert_identical(with_table.drop_vars([*_XP_ARRAYS, "xp_wavelength"]), plain)


def _tilt(wave):
    """A 3 % smooth tilt, linear in wavelength over 3500-8500 A, flat beyond."""
    return 0.985 + 0.03 * np.clip((np.asarray(wave) - 3500.0) / 5000.0, 0.0, 1.0)


def _wave(wave):
    """A 3 % (peak to peak) smooth wave of 2500 A period: too fine for ten bands."""
    x = np.clip(np.asarray(wave, dtype=float), 3500.0, 8500.0)
    return 1.0 + 0.015 * np.sin(2.0 * np.pi * (x - 3500.0) / 2500.0)


def _distorted(world, name, shape, with_xp=True):
    """Standard 0 with a smooth ``shape`` relative to its template: its counts, its catalog
    photometry (at the bands' effective wavelengths) and its systematic-free XP spectrum all
    carry it. Fitted with the bands alone and (``with_xp``) with XP."""
    sim, root = world["sim"], world["root"]
    truth = sim.truth
    fiber = int(truth["std_fiber"][0])
    hdul = fits.HDUList([h.copy() for h in sim.hdulist])
    wave = truth["fiber_wavelength"][fiber]
    hdul[0].data[fiber] = hdul[0].data[fiber] * shape(wave)
    hdul["VARIANCE"].data[fiber] = hdul["VARIANCE"].data[fiber] * shape(wave) ** 2
    hdul.writeto(root / f"{name}.fits")
    rows = [dict(r) for r in sim.catalog]
    row = next(r for r in rows if r["_fiber"] == fiber)
    columns = {"gaiadr2-G": "Gaia", "gaiadr2-BP": "BP", "gaiadr2-RP": "RP", "panstarrs-g": "g",
               "panstarrs-r": "r", "panstarrs-i": "i", "panstarrs-z": "z", "twomass-J": "J",
               "twomass-H": "H", "twomass-Ks": "K"}
    for band, col in columns.items():
        if row[col] != "99.999":
            row[col] = f"{float(row[col]) - 2.5 * np.log10(shape(band_wavelength(band))):.4f}"
    write_catalog(root / f"{name}.csv", rows)
    air = vacuum_to_air(10 * truth["xp_wavelength_nm"])
    flux = truth["std_xp_true"] * np.where(np.arange(3)[:, None] == 0, shape(air), 1.0)
    xp = _write_xp_variant(world, f"{name}_xp.csv", flux)
    exposure = open_exposure(root / f"{name}.fits").load()
    catalog = read_catalog(root / f"{name}.csv")
    fits_ = {"without": _fit(world, exposure=exposure, catalog=catalog)}
    if with_xp:
        fits_["with"] = _fit(world, xp=xp, exposure=exposure, catalog=catalog)
    return fits_


@pytest.fixture(scope="module")
def tilted(world):
    return _distorted(world, "tilted", _tilt)


def test_a_3_percent_tilt_is_corrected_by_the_xp_warp(world, tilted, plain, report_line):
    truth = world["sim"].truth
    untouched = star_vector_error(plain, truth, 0)[0]
    without = star_vector_error(tilted["without"], truth, 0)[0]
    with_xp = star_vector_error(tilted["with"], truth, 0)[0]
    report_line(f"3 % tilt: star vector shape error {100 * without:.2f}% with the bands' warp "
                f"alone, {100 * with_xp:.2f}% with XP ({100 * untouched:.2f}% without a tilt)")
    assert tilted["with"]["xp_used"].values.all()
    assert with_xp < 0.005
    assert with_xp < without


def test_a_shape_too_fine_for_the_bands_is_corrected_by_xp(world, report_line):
    fitted = _distorted(world, "waved", _wave)
    truth = world["sim"].truth
    without = star_vector_error(fitted["without"], truth, 0)[0]
    with_xp = star_vector_error(fitted["with"], truth, 0)[0]
    report_line(f"3 % wave of 2500 A: star vector shape error {100 * without:.2f}% with the "
                f"bands' warp alone, {100 * with_xp:.2f}% with XP")
    assert without > 0.008
    assert with_xp < 0.5 * without


def test_ebv_recovery_is_no_worse_with_xp(world, tilted, plain):
    truth = world["sim"].truth
    fit_with = _fit(world, xp=read_xp(world["root"] / "xp.csv"))
    assert fit_with["xp_used"].values.all()
    for a, b in ((plain, fit_with), (tilted["without"], tilted["with"])):
        for s in range(3):
            k = list(truth["std_fiber"]).index(int(a["fiber"].values[s]))
            assert abs(b["ebv"].values[s] - truth["std_ebv"][k]) <= \
                abs(a["ebv"].values[s] - truth["std_ebv"][k]) + 1e-9


def test_wrong_units_and_a_10_percent_offset_are_detected(world, plain):
    truth = world["sim"].truth
    flux = truth["std_xp_flux"] * np.array([100.0, 1.10, 1.0])[:, None]
    xp = _write_xp_variant(world, "bad_levels.csv", flux,
                           truth["std_xp_flux_error"] * np.array([100.0, 1.10, 1.0])[:, None])
    with pytest.warns(FluxCalWarning) as caught:
        fitted = _fit(world, xp=xp)
    messages = [str(w.message) for w in caught if "XP" in str(w.message)]
    fibers = fitted["fiber"].values
    assert len(messages) == 2
    assert re.search(rf"fiber {fibers[0]} objid \d+: XP spectrum not used: median XP / model "
                     r"(99|100|101)\.\d*, beyond 5% of 1 \(wrong units\? expected W m\^-2 "
                     r"nm\^-1", messages[0])
    assert re.search(rf"fiber {fibers[1]} objid \d+: XP spectrum not used: median XP / model "
                     r"1\.(09|10|11)\d*, beyond 5% of 1 \(another star", messages[1])
    assert list(fitted["xp_used"].values) == [False, False, True]
    assert "XP spectrum not used" in fitted["flags"].values[0]
    assert "XP spectrum not used" in fitted["flags"].values[1]
    assert list(fitted["status"].values) == list(plain["status"].values)
    # Calibrated without XP: exactly the plain fit for the two stars.
    for name in ("cal", "model_flux", "scale"):
        np.testing.assert_array_equal(fitted[name].values[:2], plain[name].values[:2])
    assert not np.array_equal(fitted["cal"].values[2], plain["cal"].values[2])


def test_a_star_without_photometry_gets_no_xp_note(world):
    """A standard with XP but no catalog photometry (so no model) was noted 'XP spectrum not
    used: no XP sample inside the exposure's range', which was not why."""
    xp = read_xp(world["root"] / "xp.csv")  # with positions: matched by them
    first = world["sim"].truth["std_objid"][0]
    catalog = world["catalog"].isel(star=world["catalog"]["objid"].values != first)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = _fit(world, xp=xp, catalog=catalog)
    row = int(np.flatnonzero(fitted["fiber"].values == world["sim"].truth["std_fiber"][0])[0])
    assert fitted["status"].values[row] != "ok"  # no catalog row: not fitted
    assert not [w for w in caught if "XP spectrum not used" in str(w.message)], [
        str(w.message) for w in caught]
    assert "XP" not in fitted["flags"].values[row]
    assert fitted["xp_used"].values.sum() == 2  # the two others use theirs


def test_a_lazy_exposure_with_xp_gives_the_eager_fit(world):
    """A Dask-backed exposure gives the eager result with XP, attrs included."""
    xp = read_xp(world["root"] / "xp.csv")
    exposure = world["exposure"]
    lazy = exposure.assign({v: exposure[v].chunk({"fiber": 4}) for v in exposure.data_vars})
    out = fit_standards(lazy, world["catalog"], world["library"], SELF_MODEL, xp=xp)
    xr.testing.assert_identical(out, _fit(world, xp=xp))


def test_level_tolerance_is_configurable(world):
    truth = world["sim"].truth
    xp = _write_xp_variant(world, "eight.csv", truth["std_xp_flux"] * 1.08)
    loose = _fit(world, xp=xp, config=SELF_MODEL.replace(level_tolerance=0.1))
    assert loose["xp_used"].values.all()
    np.testing.assert_allclose(loose["xp_ratio"].values, 1.08, atol=0.02)


# ----------------------------------------------------------------------------- CLI, QC, survey


def test_cli_calibrate_with_xp_end_to_end(world, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["calibrate", str(world["red"]), "--catalog", str(world["root"] /
                   "catalog.csv"), "--grid", str(world["cube"]), "--out", str(out), "--qc",
                   "--xp", str(world["root"] / "xp.csv")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    stars = read_standard_stars(out / "red_fluxcal.fits")
    assert stars["xp_used"].values.any()
    assert set(stars["xp_match"].values) == {"source_id"}
    assert stars["xp_flux"].dims == ("star", "xp_wavelength")
    assert stars.sizes["xp_wavelength"] == NXP
    assert np.all(stars["xp_rms"].values[stars["xp_used"].values] < 0.05)
    expid = world["sim"].truth["expid"]
    page = out / "qc" / f"{expid}_xp.png"
    assert page.stat().st_size > 10_000
    summary = (out / "qc" / f"{expid}_summary.txt").read_text()
    assert f"  {expid}_xp.png\n" in summary and "xp.png:" not in summary  # drawn


def test_cli_reports_a_bad_xp_file_in_one_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("source_id,flux\n1,\"[1, 2]\"\n")
    status = main(["calibrate", str(world["red"]), "--catalog", str(world["root"] /
                   "catalog.csv"), "--grid", str(world["cube"]), "--out", str(tmp_path / "o"),
                   "--xp", str(bad)])
    err = capsys.readouterr().err
    assert status == 1
    assert f"{bad}: header line: missing required column(s) flux_error" in err
    assert "Traceback" not in err


def test_qc_page_not_drawn_without_xp(world, tmp_path):
    from kspec_fluxcal.pipeline import calibrate_exposure

    calibrate_exposure(world["red"], world["catalog"], world["library"], tmp_path / "o",
                       config=SELF_MODEL, qc_dir=tmp_path / "qc")
    expid = world["sim"].truth["expid"]
    assert not (tmp_path / "qc" / f"{expid}_xp.png").exists()
    summary = (tmp_path / "qc" / f"{expid}_summary.txt").read_text()
    assert "xp.png: no Gaia XP spectra given (--xp)" in summary


def test_simulated_survey_writes_xp_csv(small_grid, tmp_path):
    out = simulate_survey(tmp_path / "s", exposures=1, nights=1, seed=3, grid=small_grid,
                          setups=[SETUP], n_standards=(2, 2), xp=True)
    info = json.loads((out / "survey.json").read_text())
    assert info["xp"] == "xp.csv" and info["options"]["xp"] is True
    xp = read_xp(out / "xp.csv")
    catalog = read_catalog(out / "catalog.csv")
    assert xp.sizes["xp_star"] == 2
    assert set(xp["source_id"].values) <= set(catalog["source_id"].values)
    truth = dict(np.load(out / info["exposures"][0]["truth"]))
    assert truth["std_xp_systematic"].shape == (2, NXP)


def test_simulated_exposures_without_standards_have_empty_xp(small_grid, tmp_path):
    """XP spectra are drawn per standard: an exposure planned without standards has none
    (simulating it failed on stacking zero spectra)."""
    out = simulate_survey(tmp_path / "s", exposures=4, nights=1, seed=4, grid=small_grid,
                          setups=[SETUP], n_standards=(1, 1), xp=True, no_standards=0.5)
    info = json.loads((out / "survey.json").read_text())
    sizes = [dict(np.load(out / e["truth"]))["std_xp_flux"].shape[0] for e in info["exposures"]]
    assert 0 in sizes and 1 in sizes
    assert read_xp(out / "xp.csv").sizes["xp_star"] == sum(sizes)


@pytest.mark.cluster
def test_survey_with_xp(small_grid, world, tmp_path):
    """``run_survey(xp=...)``: every exposure's standards are fitted with the spectra (sent
    to the workers with the catalog), which enter the input hash."""
    from distributed import Client

    from kspec_fluxcal.survey import local_cluster, run_survey

    sv = simulate_survey(tmp_path / "sv", exposures=2, nights=1, seed=4, grid=small_grid,
                         setups=[SETUP], n_standards=(2, 2), xp=True)
    kwargs = {"catalog": sv / "catalog.csv", "grid": world["cube"], "progress": False}
    with local_cluster(1, 1, "127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        with_xp = run_survey(sv / "lake", out=tmp_path / "xp", client=client,
                             xp=sv / "xp.csv", **kwargs)
        without = run_survey(sv / "lake", out=tmp_path / "plain", client=client, **kwargs)
    assert with_xp.ok and without.ok and len(with_xp.calibrated) == 2
    for path in sorted((tmp_path / "xp").rglob("*_fluxcal.fits")):
        stars = read_standard_stars(path)
        assert stars["xp_used"].values.all() and set(stars["xp_match"].values) == {"source_id"}
    for path in sorted((tmp_path / "plain").rglob("*_fluxcal.fits")):
        assert not read_standard_stars(path)["xp_used"].values.any()
    from kspec_fluxcal.survey import open_archive

    hashes = [set(open_archive(tmp_path / name / "archive.zarr")["input_hash"].values)
              for name in ("xp", "plain")]
    assert not hashes[0] & hashes[1]


def _bowl(wave):
    """A 3 % curvature (the ends of 3500-8500 A 3 % above its middle), flat beyond: a
    shape that no reddening mimics."""
    x = np.clip(np.asarray(wave, dtype=float), 3500.0, 8500.0)
    return 0.99 + 0.03 * ((x - 6000.0) / 2500.0) ** 2


def test_bands_warp_corrects_a_tilt_and_a_curvature(world, tilted, plain, report_line):
    """Issue 15 without XP: ten bands that carry a star's 3 % tilt against its template give
    a vector within 0.5 % (the warp, or E(B-V) where the tilt looks like reddening); a 3 %
    curvature, which no reddening mimics, is corrected by the warp alone; E(B-V) is
    recovered as well with the warp as without it."""
    truth, root = world["sim"].truth, world["root"]
    no_warp = SELF_MODEL.replace(warp_degree=0)
    bowl = _distorted(world, "bowl", _bowl, with_xp=False)["without"]
    bowl_no_warp = _fit(world, exposure=open_exposure(root / "bowl.fits").load(),
                        catalog=read_catalog(root / "bowl.csv"), config=no_warp)
    tilt = star_vector_error(tilted["without"], truth, 0)[0]
    warped, unwarped = (star_vector_error(f, truth, 0)[0] for f in (bowl, bowl_no_warp))
    report_line(f"bands only: star vector shape error {100 * tilt:.2f}% for a 3 % tilt; "
                f"{100 * warped:.2f}% for a 3 % curvature with the warp, {100 * unwarped:.2f}% "
                "without it")
    assert tilt < 0.005
    assert warped < 0.005
    assert unwarped > 1.5 * warped
    plain_no_warp = _fit(world, config=no_warp)
    for s in range(3):
        k = list(truth["std_fiber"]).index(int(plain["fiber"].values[s]))
        assert abs(plain["ebv"].values[s] - truth["std_ebv"][k]) <= \
            abs(plain_no_warp["ebv"].values[s] - truth["std_ebv"][k]) + 1e-9
