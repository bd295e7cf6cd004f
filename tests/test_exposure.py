import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from conftest import time_limit

from kspec_fluxcal.constants import FLUX_UNIT
from kspec_fluxcal.errors import ExposureError, FluxCalWarning, OutputExistsError
from kspec_fluxcal.exposure import open_exposure, read_exposure_info
from kspec_fluxcal.fits_file import (
    card_image,
    column_format,
    extension_bytes,
    extension_header,
    extension_raw,
    find_hdu,
    image_bytes,
    open_fits,
    primary_bytes,
    table_bytes,
    table_columns,
    table_hdu,
)
from kspec_fluxcal.products import read_standard_stars, star_table, write_calibrated
from kspec_fluxcal.wavelength import air_to_vacuum, vacuum_to_air


def test_open_exposure_layout(red_file):
    ds = open_exposure(red_file())
    assert ds["flux"].dims == ("fiber", "wavelength")
    assert ds.sizes == {"fiber": 6, "wavelength": 200}
    assert ds["wavelength"].attrs["units"] == "Angstrom"
    assert ds["wavelength"].attrs["medium"] == "air"
    assert list(ds["fiber_type"].values) == ["C", "C", "P", "P", "S", "S"]
    assert ds["objid"].dtype == np.int64 and ds["objid"].values[0] == 1000
    assert ds.attrs["exptime"] == 900.0 and ds.attrs["mjd"] == 61000.25
    assert ds.attrs["expid"] == "E0001" and ds.attrs["airmass"] == 1.2
    assert ds.attrs["lsf_fwhm_coeffs"] == [8.0]
    assert ds["good"].all()


def test_fiber_coordinate_is_the_rows_and_each_exposures_own(red_file):
    path = red_file()
    first, second = open_exposure(path), open_exposure(path)
    want = xr.Variable("fiber", np.arange(6), {"description": "row of the primary image"})
    xr.testing.assert_identical(first["fiber"].variable.to_base_variable(), want)
    assert first["fiber"].dtype == np.int64 and list(first.xindexes) == ["fiber", "wavelength"]
    first["fiber"].attrs["description"] = "changed"  # the shared index, not the attrs
    assert second["fiber"].attrs == {"description": "row of the primary image"}
    assert open_exposure(path)["fiber"].attrs == {"description": "row of the primary image"}
    assert first.sel(fiber=[5, 2])["fiber_type"].values.tolist() == ["S", "P"]


def test_fwhm_polynomial_takes_precedence(red_file):
    ds = open_exposure(red_file(header={"FWHMPC0": 5.0, "FWHMPC1": 4.0}))
    assert ds.attrs["lsf_fwhm_coeffs"] == [5.0, 4.0]
    assert ds.attrs["lsf_source"] == "FWHMPC"


def test_linear_wcs_when_wavela_missing(red_file):
    ds = open_exposure(red_file(wavelength=None))
    np.testing.assert_allclose(ds["wavelength"].values, np.linspace(4000, 8000, 200), rtol=1e-12)
    assert ds["wavelength"].attrs["source"] == "primary header WCS"


def test_cdelt1_and_cd1_1_must_agree(red_file):
    """Both dispersions given: equal ones are one solution; different ones were read as
    CDELT1 without a word, where astropy's WCS (the FITS standard) takes CD1_1."""
    step = 4000.0 / 199
    same = open_exposure(red_file(wavelength=None, header={"CD1_1": step}, name="same.fits"))
    np.testing.assert_allclose(same["wavelength"].values, np.linspace(4000, 8000, 200))
    with pytest.raises(ExposureError, match="primary header: CDELT1 = .* and CD1_1 = .* "
                       "disagree"):
        open_exposure(red_file(wavelength=None, header={"CD1_1": 1.1 * step}))


def test_nm_and_vacuum_converted(red_file):
    wave_vac = np.linspace(4000.0, 8000.0, 200)
    ds = open_exposure(red_file(wavelength=wave_vac / 10.0,
                                wavelength_header={"BUNIT": "nm", "AIRORVAC": "vac"}))
    np.testing.assert_allclose(ds["wavelength"].values, vacuum_to_air(wave_vac))
    # Air is ~1.1 A bluer than vacuum at 4000 A.
    assert 1.0 < wave_vac[0] - ds["wavelength"].values[0] < 1.3
    assert any("vacuum" in h for h in ds.attrs["history"])


def test_air_vacuum_roundtrip():
    wave = np.linspace(2000.0, 25000.0, 1000)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(wave)), wave, atol=1e-8)
    # Standard value: H-alpha 6564.61 A in vacuum is 6562.80 A in air.
    assert vacuum_to_air(6564.61) == pytest.approx(6562.80, abs=0.01)


def test_radians_converted(red_file):
    ra = np.radians(np.full(6, 150.0))
    col = fits.Column("RA", "D", unit="radians", array=ra)
    ds = open_exposure(red_file(fibres={"RA": col}))
    np.testing.assert_allclose(ds["ra"].values, 150.0)


@pytest.mark.parametrize("unit", ["rad", "RADIANS", "deg", "degrees", None])
@pytest.mark.parametrize("bunit", ["counts", "Counts", "count", "ADU"])
def test_units_of_the_contract_read(red_file, unit, bunit):
    """RA and DEC in degrees (TUNIT 'deg' or none) or radians ('rad', 'radians'), any case;
    the primary image in counts (also 'count', 'ADU')."""
    rad = unit is not None and unit.lower().startswith("rad")
    cols = {key: fits.Column(key, "D", unit=unit, array=np.radians(values) if rad else values)
            for key, values in (("RA", np.full(6, 150.0)), ("DEC", np.full(6, -2.0)))}
    ds = open_exposure(red_file(fibres=cols, header={"BUNIT": bunit}))
    np.testing.assert_allclose(ds["ra"].values, 150.0)
    np.testing.assert_allclose(ds["dec"].values, -2.0)
    assert ds["flux"].attrs["units"] == "count"


def test_extra_fibres_columns_survive(red_file):
    ds = open_exposure(red_file(fibres={"PIVOT": np.arange(6) + 1}))
    np.testing.assert_array_equal(ds["fibres_pivot"].values, np.arange(6) + 1)


def test_per_fiber_wavelengths_keep_every_fiber_on_its_own_pixels(red_file):
    """No pixel is resampled: each fiber's counts stay as extracted, with its own wavelengths;
    the reference grid (for the calibration vector) is the median of the rows."""
    npix = 400
    base = np.linspace(4000.0, 8000.0, npix)
    step = base[1] - base[0]
    shifts = np.array([0.0, 0.3, -0.2, 0.45, 0.0, -0.4]) * step  # median 0
    wave = base[None, :] + shifts[:, None]
    flux = np.random.default_rng(1).uniform(50, 150, (6, npix))
    ds = open_exposure(red_file(npix=npix, wavelength=wave, flux=flux))
    assert ds.attrs["wavelength_layout"] == "per-fiber"
    np.testing.assert_array_equal(ds["flux"].values, flux.astype(np.float32))
    np.testing.assert_allclose(ds["fiber_wavelength"].values, wave)
    np.testing.assert_allclose(ds["wavelength"].values, np.median(wave, axis=0))
    assert not ds.attrs["history"] and ds.attrs["unsolved"] == {}
    shared = open_exposure(red_file(npix=npix, wavelength=base, flux=flux, name="shared.fits"))
    assert shared.attrs["wavelength_layout"] == "shared"
    np.testing.assert_array_equal(shared["fiber_wavelength"].values,
                                  np.broadcast_to(base, (6, npix)))


@pytest.mark.parametrize("nfib", [5, 6])
def test_reference_grid_is_the_nanmedian_of_the_rows(red_file, nfib):
    """The reference grid of per-fiber solutions, read and planned, is np.nanmedian's of the
    rows to the last bit, with every wavelength finite or some NaN (odd and even fibers),
    rows in one order at every pixel (taken from the middle rows) or crossing."""
    rng = np.random.default_rng(nfib)
    wave = np.linspace(4000.0, 8000.0, 300) + rng.uniform(-0.5, 0.5, (nfib, 1)) \
        + rng.normal(0.0, 1e-3, (nfib, 300))  # every pixel's median of its own values
    holed = wave.copy()
    holed[1, 20:30] = holed[3, 25:40] = np.nan
    crossing = wave + rng.normal(0.0, 1.0, wave.shape)
    for k, solution in enumerate((wave, holed, crossing)):
        path = red_file(nfib, 300, wavelength=solution, name=f"w{nfib}{k}.fits")
        expected = np.nanmedian(solution, axis=0)
        assert open_exposure(path)["wavelength"].values.tobytes() == expected.tobytes()
        assert read_exposure_info(path)["wave_range"] == (expected[0], expected[-1])


def test_nan_wavelengths_make_bad_pixels_not_a_bad_fiber(red_file):
    """A few NaN WAVELA pixels of a science fiber: those pixels have no data, the rest of the
    fiber stays good, and the exposure says which fiber lacks how many."""
    wave = np.tile(np.linspace(4000.0, 8000.0, 200), (6, 1))
    wave[2, 10:13] = np.nan
    ds = open_exposure(red_file(wavelength=wave))
    assert ds.attrs["unsolved"] == {2: 3}
    assert not ds["good"].values[2, 10:13].any()
    assert ds["good"].values[2, :10].all() and ds["good"].values[2, 13:].all()
    np.testing.assert_allclose(ds["wavelength"].values, np.linspace(4000.0, 8000.0, 200))


def test_dead_fiber_is_not_an_error(red_file):
    flux = np.ones((6, 200))
    flux[2] = np.nan
    ds = open_exposure(red_file(flux=flux))
    assert not ds["good"].values[2].any()
    assert ds["good"].values[0].all()


def test_infinite_counts_or_variances_are_no_data(red_file):
    """The contract's "no data" is NaN; an infinite count or variance went through to the
    product as an infinite flux and variance."""
    flux = np.ones((6, 200))
    flux[1, 5] = np.inf
    flux[3, 7] = -np.inf
    variance = np.full((6, 200), 0.01)
    variance[4, 9] = np.inf
    ds = open_exposure(red_file(flux=flux, variance=variance))
    bad = np.zeros((6, 200), dtype=bool)
    bad[1, 5] = bad[3, 7] = bad[4, 9] = True
    np.testing.assert_array_equal(ds["good"].values, ~bad)
    assert np.isnan(ds["flux"].values[1, 5]) and np.isnan(ds["flux"].values[3, 7])
    assert np.isnan(ds["variance"].values[4, 9])
    assert np.isfinite(ds["flux"].values[~bad]).all()


def test_chunks_give_dask(red_file):
    ds = open_exposure(red_file(), chunks={"fiber": 2})
    assert ds["flux"].chunks == ((2, 2, 2), (200,))


def test_read_exposure_info(red_file):
    a = read_exposure_info(red_file())
    b = read_exposure_info(red_file(wavelength=None))
    assert a["expid"] == "E0001" and a["nfiber"] == 6 and a["npixel"] == 200
    assert a["setup"] == b["setup"] == "n200-f6-4000-8000"  # WAVELA or the WCS


def test_configuration_outlives_arc_and_line_spread_drifts(red_file):
    """The survey groups exposures by instrument configuration (the survey model, the archive
    fallback): an exposure with its own arc solution (a few A off, another dispersion) and
    its own line spread is still of the same one; other pixels, fibers or another grating
    angle are not."""
    wave = np.linspace(4000.0, 8000.0, 200)
    same = read_exposure_info(red_file())["setup"]
    for kwargs in ({"wavelength": wave * 1.0004 - 2.5}, {"header": {"SPECFWHM": 6.0}},
                   {"wavelength": wave + 3.0, "header": {"SPECFWHM": 8.4}}):
        assert read_exposure_info(red_file(**kwargs))["setup"] == same, kwargs
    for kwargs in ({"npix": 201}, {"nfib": 7}, {"wavelength": wave + 400.0}):
        assert read_exposure_info(red_file(**kwargs))["setup"] != same, kwargs


# ----------------------------------------------------------------------------- bad input


def _rewrite(path, edit):
    with fits.open(path) as hdul:
        hdus = fits.HDUList([h.copy() for h in hdul])
    edit(hdus)
    os.remove(path)
    hdus.writeto(path)
    return path


@pytest.mark.parametrize(
    "make_kwargs, edit, match",
    [
        ({}, lambda h: h.pop(1), r"HDU VARIANCE: missing"),
        ({}, lambda h: h.pop(3), r"HDU FIBRES: missing"),
        ({}, lambda h: setattr(h[1], "name", "VARIANCES"), r"HDU VARIANCE: missing"),
        ({}, lambda h: setattr(h[1], "data", np.ones((6, 199), np.float32)),
         r"HDU VARIANCE: shape"),
        ({}, lambda h: setattr(h[2], "data", np.linspace(4000, 8000, 150)), r"HDU WAVELA: shape"),
        ({"drop": ("EXPTIME",)}, None, r"primary header: missing EXPTIME \(or EXPOSED\)"),
        ({"drop": ("MJD-OBS",)}, None, r"missing MJD-OBS \(or UTMJD\)"),
        ({"drop": ("SPECFWHM",)}, None, r"neither SPECFWHM nor FWHMPC0"),
        ({"header": {"EXPTIME": "long"}}, None, r"EXPTIME: value 'long' is not a float"),
        ({"wavelength": np.linspace(8000, 4000, 200)}, None,
         r"HDU WAVELA: wavelengths do not increase"),
        ({"wavelength": np.linspace(400, 800, 200)}, None, r"look like nm"),
        ({"wavelength_header": {"BUNIT": "um"}}, None, r"unexpected wavelength unit 'um'"),
        ({"wavelength_header": {"AIRORVAC": "water"}}, None, r"AIRORVAC: value 'water'"),
        ({"fibres": {"TYPE": np.array(["C", "C", "P", "X", "S", "S"])}}, None,
         r"column TYPE row 3: unknown fiber type 'X'"),
        ({"flux": np.full((6, 200), np.nan)}, None, r"no valid pixel"),
        ({"variance": np.full((6, 200), -1.0)}, None, r"no valid pixel"),
        ({"header": {"SPECFWHM": -3.0}}, None, r"FWHM is not positive"),
        # Issue 16: these passed silently, or crashed as internal errors.
        ({"npix": 1, "wavelength": np.array([5000.0])}, None,
         r"HDU PRIMARY: image is 1 pixel wide; a spectrum needs at least 16"),
        ({"header": {"EXPTIME": 1e30}}, None,
         r"primary header EXPTIME: value 1e\+30 s is outside the plausible range \(0, 100000\]"),
        ({"header": {"AIRMASS": 0.5}}, None,
         r"primary header AIRMASS: value 0\.5 is outside the plausible range \[1, 10\]"),
        ({"header": {"AIRMASS": 12.0}}, None, r"AIRMASS: value 12\.0 is outside"),
        # A placeholder date put the exposure on another night of the survey model.
        ({"header": {"MJD-OBS": 1.0}}, None,
         r"primary header MJD-OBS: value 1\.0 d is outside the plausible range \[40000, 100000\]"),
        ({"header": {"AIRORVAC": "xyz"},
          "wavelength_header": {"BUNIT": "Angstrom", "AIRORVAC": "air"}}, None,
         r"primary header AIRORVAC: value 'xyz' is neither 'air' nor 'vac'"),
        ({"header": {"AIRORVAC": "vac"},
          "wavelength_header": {"BUNIT": "Angstrom", "AIRORVAC": "air"}}, None,
         r"primary header AIRORVAC: 'vac' contradicts the WAVELA header's AIRORVAC 'air'"),
        ({}, lambda h: h.insert(2, fits.ImageHDU(np.ones((6, 200), np.float32),
                                                 name="VARIANCE")),
         r"HDU VARIANCE: 2 extensions have this name \(HDUs 1 and 2\); expected one"),
        ({}, lambda h: h.append(fits.BinTableHDU(h["FIBRES"].data, name="FIBRES_IFU")),
         r"HDU FIBRES: 2 extensions have this name \(HDUs 3 and 4: FIBRES, FIBRES_IFU\)"),
        # The contract's values only (its formats review): FITS's defaults are not kspecdr's.
        ({"wavelength": None, "drop": ("CRPIX1",)}, None,
         r"primary header CRPIX1: missing \(a linear wavelength solution gives"),
        ({"wavelength": None, "drop": ("CUNIT1",)}, None, r"primary header CUNIT1: missing"),
        ({"wavelength": None, "header": {"CTYPE1": "WAVE"}}, None,
         r"primary header CTYPE1: 'WAVE' is not a linear wavelength axis"),
        ({"wavelength_header": {"AIRORVAC": "vacuum"}}, None,
         r"WAVELA header AIRORVAC: value 'vacuum' is neither 'air' nor 'vac'"),
        ({"wavelength_header": {"BUNIT": "A"}}, None, r"unexpected wavelength unit 'A'"),
        ({}, lambda h: h.__setitem__(2, fits.BinTableHDU.from_columns(
            [fits.Column("WAVE", "D", array=np.linspace(4000, 8000, 200))], name="WAVELA")),
         r"HDU WAVELA: is a table \(BinTableHDU\); expected an image"),
        ({"fibres": {"OBJID": np.array([1.0, 2.0, 1.2e17, 4.0, 5.0, 6.0])}}, None,
         r"column OBJID row 2: value 1\.2e\+17 is beyond 2\*\*53"),
        # Formats audit: outside the contract, and read as something they are not.
        ({"header": {"BUNIT": "counts/s"}}, None, r"primary header BUNIT: 'counts/s' is "
         r"neither 'counts' \(a RED file\) nor a flux density \(a calibrated product\)"),
        ({"header": {"BUNIT": "electrons"}}, None, r"primary header BUNIT: 'electrons' is"),
        ({"fibres": {"RA": fits.Column("RA", "D", unit="h", array=np.full(6, 10.0))}}, None,
         r"HDU FIBRES column RA: unit \(TUNIT\) 'h' is neither degrees"),
        ({"fibres": {"DEC": fits.Column("DEC", "D", unit="arcsec", array=np.full(6, 2.0))}},
         None, r"HDU FIBRES column DEC: unit \(TUNIT\) 'arcsec' is neither degrees"),
        ({"wavelength": None, "header": {"CUNIT1": ""}}, None,
         r"primary header CUNIT1: blank \(a linear wavelength solution's unit is"),
        ({}, lambda h: h.__setitem__(3, fits.TableHDU.from_columns(
            [fits.Column("TYPE", "A1", array=np.array(list("CCPPSS")))], name="FIBRES")),
         r"HDU FIBRES: is an ASCII table \(TableHDU\); expected a binary table"),
    ],
)
def test_bad_red_files(red_file, make_kwargs, edit, match):
    path = red_file(**make_kwargs)
    if edit is not None:
        _rewrite(path, edit)
    with pytest.raises(ExposureError, match=match) as info:
        open_exposure(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.write_bytes(p.read_bytes().replace(b"EXPTIME =                900.0",
                                                    b"EXPTIME =                1E+30")),
     r"EXPTIME: value 1e\+30 s is outside the plausible range"),
    (lambda p: _rewrite(p, lambda h: h.insert(2, h[1].copy())), r"HDU VARIANCE: 2 extensions"),
    (lambda p: _rewrite(p, lambda h: [setattr(h[0], "data", h[0].data[:, :1].copy()),
                                      setattr(h[1], "data", h[1].data[:, :1].copy()),
                                      setattr(h[2], "data", h[2].data[:1].copy())]),
     r"image is 1 pixel wide"),
    (lambda p: _rewrite(p, lambda h: h[0].header.set("BUNIT", "counts/s")),
     r"primary header BUNIT: 'counts/s' is neither 'counts'"),
], ids=["exptime", "two-variance", "one-pixel", "bunit"])
def test_exposure_info_checks_like_open(red_file, edit, match):
    """The survey plans from headers (read_exposure_info): the same checks as open_exposure,
    so that a bad file is refused at planning, not found by a worker."""
    path = red_file()
    edit(path)
    with pytest.raises(ExposureError, match=match):
        read_exposure_info(path)


def test_expid_default_is_the_name_without_its_extension(red_file, tmp_path):
    """Contract: EXPID defaults to the file name without extension; names with dots are
    distinct exposures (``KS20261101.0001`` and ``.0002`` were both ``KS20261101``)."""
    path = red_file(drop=("EXPID",))
    names = ["KS20261101.0001.fits", "KS20261101.0002.fits.gz", "plain.fits"]
    for name, expected in zip(names, ["KS20261101.0001", "KS20261101.0002", "plain"],
                              strict=True):
        with fits.open(path) as hdul:
            hdul.writeto(tmp_path / name)
        assert open_exposure(tmp_path / name).attrs["expid"] == expected
        assert read_exposure_info(tmp_path / name)["expid"] == expected


@pytest.mark.parametrize("seeing", [0.0, -1.0, 99.0])
def test_an_implausible_seeing_is_not_measured(red_file, seeing):
    """SEEING is outside the contract (the survey model's only): 0 or -1 is "unknown" in
    many headers, a reason to drop the value with a warning, not to refuse the exposure."""
    with pytest.warns(FluxCalWarning, match="SEEING: value .* taken as not measured"):
        ds = open_exposure(red_file(header={"SEEING": seeing}))
    assert np.isnan(ds.attrs["seeing"])
    assert open_exposure(red_file(header={"SEEING": 1.3})).attrs["seeing"] == 1.3


@pytest.mark.parametrize("reader", [open_exposure, read_exposure_info])
def test_fifo_is_refused_not_waited_on(tmp_path, reader):
    """Issue 16: a FIFO named .fits hung `calibrate` and `info` (astropy waits for a writer)."""
    fifo = tmp_path / "pipe.fits"
    os.mkfifo(fifo)
    with time_limit(10), pytest.raises(ExposureError, match=r"pipe\.fits: not a regular file "
                                                             r"\(a FIFO\)"):
        reader(fifo)


def test_fibres_rows_mismatch(red_file):
    path = red_file(fibres={k: v[:5] for k, v in __import__("conftest").fibres_columns(6).items()})
    with pytest.raises(ExposureError, match=r"HDU FIBRES: has 5 rows but the primary has 6"):
        open_exposure(path)


def test_no_wavelength_at_all(red_file):
    path = _rewrite(red_file(), lambda h: h.pop(2))
    with pytest.raises(ExposureError, match=r"HDU WAVELA: missing, and the primary header has no"):
        open_exposure(path)


def test_unreadable_and_truncated(tmp_path, red_file):
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not a FITS file at all" * 100)
    # Issue 16: astropy's advice ("try with ignore_missing_simple=True") is not for our users.
    with pytest.raises(ExposureError, match=r"garbage\.fits: not a FITS file \(it does not "
                                            r"start with SIMPLE = T\)$"):
        open_exposure(garbage)
    path = red_file()
    data = path.read_bytes()
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ExposureError, match=r"truncated\.fits"):
        open_exposure(truncated)
    with pytest.raises(ExposureError, match="no such file"):
        open_exposure(tmp_path / "absent.fits")


# ----------------------------------------------------------------------------- writing


def _calibrated(ds):
    out = ds.copy()
    cal = np.linspace(1.0, 2.0, ds.sizes["wavelength"])
    out["flux"] = (ds["flux"] * cal).astype(np.float32).assign_attrs(units=FLUX_UNIT)
    out["variance"] = (ds["variance"] * cal**2).astype(np.float32)
    out["cal"] = ("wavelength", cal)
    out["cal_variance"] = ("wavelength", np.full(cal.size, 1e-4))
    out["cal_mask"] = ("wavelength", np.arange(cal.size) % 7 != 0)
    out.attrs.update(fcalnstr=2, fcalrms=0.012)
    return out


def test_write_calibrated_roundtrip(red_file, tmp_path):
    ds = open_exposure(red_file(fibres={"PIVOT": np.arange(6) + 1}, wavelength=None))
    cal = _calibrated(ds)
    out = write_calibrated(cal, tmp_path / "out" / "x_fluxcal.fits")
    back = open_exposure(out)
    np.testing.assert_allclose(back["flux"].values, cal["flux"].values)
    np.testing.assert_allclose(back["variance"].values, cal["variance"].values)
    np.testing.assert_allclose(back["wavelength"].values, ds["wavelength"].values)
    np.testing.assert_array_equal(back["cal_mask"].values, cal["cal_mask"].values)
    np.testing.assert_allclose(back["cal"].values, cal["cal"].values)
    for name in ("fiber_type", "fiber_name", "objid", "ra", "dec", "fibres_pivot"):
        np.testing.assert_array_equal(back[name].values, ds[name].values)
    assert back["flux"].attrs["units"] == FLUX_UNIT
    assert back.attrs["fcalnstr"] == 2 and back.attrs["fcalrms"] == pytest.approx(0.012)
    header = fits.getheader(out)
    assert header["FLUXCAL"] is True and header["BUNIT"] == FLUX_UNIT
    assert header["FCALVER"] and header["EXPTIME"] == 900.0
    table = fits.getdata(out, "FLUXCAL")
    assert table.columns.names == ["WAVELENGTH", "CAL_FACTOR", "CAL_VARIANCE", "MASK"]
    assert len(table) == ds.sizes["wavelength"]


def _rich_red_file(path, compress=False):
    """``path`` rewritten as kspecdr/2dfdr write more than the contract needs: FIBRES with
    header keywords, a vector column, RA/DEC in radians and a padded name; VARIANCE with
    its noise model; a SKY image and a REDUCTION_ARGS table after FIBRES; checksums."""
    with fits.open(path) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    fib = hdul["FIBRES"]
    cols = [c for c in fib.columns if c.name not in ("RA", "DEC", "NAME")]
    n = len(fib.data)
    cols += [fits.Column("NAME", "20A", array=["  padded"] * n),
             fits.Column("RA", "D", unit="radians", array=np.radians(np.full(n, 150.0))),
             fits.Column("DEC", "D", unit="radians", array=np.radians(np.full(n, 2.0))),
             fits.Column("SPAXPOS", "2E", array=np.ones((n, 2)))]
    fibres = fits.BinTableHDU.from_columns(cols, name="FIBRES")
    fibres.header["CENRA"] = (2.6, "field centre, radians")
    hdul["VARIANCE"].header["NOISEMOD"] = "poisson+read"
    sky = fits.ImageHDU(np.arange(hdul[0].data.shape[1], dtype=np.float32), name="SKY")
    args = fits.BinTableHDU.from_columns([fits.Column("ARG", "10A", array=["a", "b"])],
                                         name="REDUCTION_ARGS")
    rich = fits.HDUList([hdul[0], hdul["VARIANCE"], hdul["WAVELA"], fibres, sky, args])
    out = path.with_suffix(".fits.gz" if compress else ".rich.fits")
    rich.writeto(out, checksum=True)
    return out


def test_products_pages_are_released_once_in_place(red_file, tmp_path, monkeypatch):
    """Each product is given to the page-cache release (kspec_fluxcal._page_cache) once it is
    in place under its name; the earlier products' pages are released before it is written."""
    from kspec_fluxcal import products

    calls = []
    monkeypatch.setattr(products, "release_earlier", lambda: calls.append("release"))
    monkeypatch.setattr(products, "written",
                        lambda path: calls.append((Path(path).name, Path(path).is_file())))
    cal = _calibrated(open_exposure(red_file(wavelength=None)))
    write_calibrated(cal, tmp_path / "a_fluxcal.fits")
    write_calibrated(cal, tmp_path / "b_fluxcal.fits.gz")
    assert calls == ["release", ("a_fluxcal.fits", True), "release", ("b_fluxcal.fits.gz", True)]


@pytest.mark.parametrize("compress", [False, True])
def test_products_keep_the_inputs_layout(red_file, tmp_path, compress):
    """Same layout as the input (contract section 4): every input extension, in its order,
    FIBRES and the others byte for byte, VARIANCE with its own keywords; checksums that
    described the counts are not carried into the product."""
    source = _rich_red_file(red_file(), compress)
    out = write_calibrated(_calibrated(open_exposure(source)),
                           tmp_path / ("p.fits.gz" if compress else "p.fits"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum that fails is a warning in astropy
        with fits.open(out, checksum=True) as prod:
            _ = [h.data for h in prod]  # read: the data sums are verified
    with fits.open(source) as inp, fits.open(out) as prod:
        names = [h.name for h in prod]
        assert names[:6] == [h.name for h in inp]
        assert names[6:] == ["FLUXCAL"]
        for name in ("WAVELA", "FIBRES", "SKY", "REDUCTION_ARGS"):
            assert prod[name].header.tostring() == inp[name].header.tostring()
            assert prod[name].data.tobytes() == inp[name].data.tobytes()
        assert prod["FIBRES"].columns["RA"].unit == "radians"
        assert prod["VARIANCE"].header["NOISEMOD"] == "poisson+read"
        assert prod["VARIANCE"].header["BUNIT"] == f"({FLUX_UNIT})**2"
        for key in ("CHECKSUM", "DATASUM"):
            assert key not in prod[0].header and key not in prod["VARIANCE"].header
        assert prod[0].header["EXTEND"] is True
    back = open_exposure(out)
    np.testing.assert_allclose(back["ra"].values, 150.0)


def test_variance_extension_is_astropys_for_each_input_header(red_file, tmp_path):
    """The product's VARIANCE is the extension astropy makes of the input's VARIANCE header
    and the calibrated variance, byte for byte, though its header is rendered once per
    input header: exposures of one shape whose VARIANCE headers differ keep their own."""
    plain = red_file(variance=np.full((6, 200), 100.0))
    noted = red_file(variance=np.full((6, 200), 50.0))
    with fits.open(noted, mode="update") as hdul:
        hdul["VARIANCE"].header["NOISEMOD"] = ("poisson+read", "noise model")
    for k, source in enumerate((plain, noted, plain, noted)):
        cal = _calibrated(open_exposure(source))
        out = write_calibrated(cal, tmp_path / f"p{k}.fits")
        with fits.open(source) as inp:
            header = inp["VARIANCE"].header.copy()
        del header["EXTNAME"]  # astropy puts the name last
        hdu = fits.ImageHDU(cal["variance"].values.astype(np.float32), header=header,
                            name="VARIANCE")
        hdu.header["BUNIT"] = f"({FLUX_UNIT})**2"
        assert extension_raw(out, "VARIANCE") == extension_bytes(hdu)
        assert ("NOISEMOD" in fits.getheader(out, "VARIANCE")) == (source == noted)


def test_write_calibrated_refuses_overwrite_and_leaves_no_temp(red_file, tmp_path):
    cal = _calibrated(open_exposure(red_file()))
    path = tmp_path / "x.fits"
    write_calibrated(cal, path)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_calibrated(cal, path)
    assert path.read_bytes() == before
    broken = cal.copy()
    broken["cal_variance"] = ("wavelength", np.array(["x"] * cal.sizes["wavelength"]))
    with pytest.raises((TypeError, ValueError)):  # a string column cannot be written as "D"
        write_calibrated(broken, path, overwrite=True)
    assert path.read_bytes() == before  # the failed write did not touch the old file
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".kspec")) == []
    write_calibrated(cal, path, overwrite=True)


def test_product_written_whole_when_writes_are_partial(red_file, tmp_path, monkeypatch):
    """The HDUs go out in one system call; what a call leaves unwritten (a signal) is
    written by the next: the product is the same file."""
    import kspec_fluxcal.products as products

    cal = _calibrated(open_exposure(red_file()))
    whole = write_calibrated(cal, tmp_path / "whole.fits").read_bytes()
    writev = os.writev
    monkeypatch.setattr(products.os, "writev", lambda fd, parts: writev(fd, [
        bytes(b"".join(parts)[:4000])]))  # 4000 bytes a call: across HDUs and records
    assert write_calibrated(cal, tmp_path / "parts.fits").read_bytes() == whole


def test_write_calibrated_needs_calibration(red_file, tmp_path):
    with pytest.raises(ValueError, match="calibrate it first"):
        write_calibrated(open_exposure(red_file()), tmp_path / "x.fits")


def test_lazy_exposure_written(red_file, tmp_path):
    ds = open_exposure(red_file(), chunks={"fiber": 3})
    cal = _calibrated(ds)
    assert isinstance(cal["flux"].data, type(ds["flux"].data))
    back = open_exposure(write_calibrated(cal, tmp_path / "lazy.fits"))
    xr.testing.assert_allclose(back["flux"], cal["flux"].compute(), rtol=1e-6)


def test_extensions_in_bytes_are_what_astropy_writes():
    """Products render their own extensions as FITS bytes (astropy's Column objects and
    header updates were most of a product's write): the bytes must be those astropy writes
    for the same table or image, blank-ended strings, empty vectors and no rows included."""
    rng = np.random.default_rng(1)
    text = np.array(["ab  ", " c", "", "   ", " ", "x\ty "])
    columns = [
        ("S", *column_format(text), None),
        ("T", "1A", np.array(list(" a b c")), ""),
        ("F", "D", rng.normal(size=6), "mag"),
        ("K", *column_format(np.arange(6) - 3), None),
        ("I", "I", np.arange(6, dtype=np.int16), "1"),
        ("L", "L", rng.random(6) > 0.5, None),
        ("V", "3D", rng.normal(size=(6, 3)), "(1e-17 erg/(s cm2 Angstrom) / count)**2"),
        ("M", "2L", rng.random((6, 2)) > 0.5, None),
        ("W", "1D", rng.normal(size=(6, 1)), None),
        ("Z", "0D", np.zeros((6, 0)), None),
    ]
    cards = [card_image("NWAVE", 3), card_image("AIRORVAC", "vac", "medium"),
             card_image("COMMENT", "x" * 150), card_image("HISTORY", "h")]
    no_rows = [(n, f, v[:0], u) for n, f, v, u in columns]
    for cols, name in ((columns, "fibres_ifu"), (no_rows, "EMPTY"), ([], "NONE")):
        assert table_bytes(cols, name, cards) == extension_bytes(table_hdu(cols, name, cards))
    for data in (rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=7)):
        hdu = fits.ImageHDU(data, name="img")
        hdu.header["BUNIT"] = "adu"
        hdu.header["COMMENT"] = "y" * 100
        assert image_bytes(data, "img", [card_image("BUNIT", "adu"),
                                         card_image("COMMENT", "y" * 100)]) == extension_bytes(hdu)
    assert card_image("X", -0.0) != card_image("X", 0.0)  # floats are not cached as equal


def test_raw_header_walk_finds_end_and_the_size_keywords():
    """The walk over a file's raw headers (extension_raw) finds the END card only where a
    card is END and blanks, and reads the keywords that give the data's size and name,
    wherever else their names appear."""
    from kspec_fluxcal.fits_file import _has_end, _raw_keys

    def record(*cards):
        text = "".join(c.ljust(80) for c in cards)
        return text.ljust(2880).encode("ascii")

    assert _has_end(record("SIMPLE  =                    T", "END"))
    assert not _has_end(record("COMMENT END", "HISTORY the END", "ENDX", "X" * 77 + "END"))
    assert _has_end(record("COMMENT END", "X" * 77 + "END", "END"))
    assert not _has_end(record("END      x"))
    header = record("XTENSION= 'IMAGE   '", "BITPIX  =                  -32 / NAXIS = 9",
                    "NAXIS   =                    2", "NAXIS1  =                 4096",
                    "NAXIS2  =                   14", "COMMENT NAXIS3  =                    7",
                    "OBJECT  = 'NAXIS4  = 5'", "PCOUNT  =                    0",
                    "GCOUNT  =                    1", "EXTNAME = 'VARIANCE'  / name",
                    "NAXIS2  =                   99", "END")
    assert _raw_keys(header) == {"BITPIX": "-32", "NAXIS": "2", "NAXIS1": "4096",
                                 "NAXIS2": "14", "PCOUNT": "0", "GCOUNT": "1",
                                 "EXTNAME": "VARIANCE"}


def _header_text(*cards):
    """A header as the readers keep it (``fits.Header.tostring(sep="\\n")``)."""
    return fits.Header.fromstring("\n".join(c.ljust(80) for c in cards),
                                  sep="\n").tostring(sep="\n")


@pytest.mark.parametrize("text", [
    None,  # an exposure made in memory
    _header_text("XTENSION= 'IMAGE   '", "BITPIX  =                  -32", "NAXIS   =    2",
                 "NAXIS1  =                 4096", "NAXIS2  =                   14",
                 "PCOUNT  =                    0", "GCOUNT  =                    1",
                 "EXTNAME = 'VARIANCE'           / extension name", "BUNIT   = 'counts**2'"),
    _header_text("EXTNAME = 'VARIANCE'", "NOISE   =                  3.5 / model",
                 "HISTORY noise model", "CHECKSUM= 'abc'", "COMMENT at the end"),
    _header_text("COMMENT only commentary", "HISTORY h"),
    _header_text("BUNIT   = 'adu**2  '           / unit", "GAIN    =  1.5D0",
                 "HISTORY x"),
    _header_text("BSCALE  =                  1.0", "BUNIT   = 'adu'"),  # removed, as astropy
    _header_text("HIERARCH ESO DET GAIN = 1.5", "BUNIT   = 'adu'"),  # not plain: astropy's
])
def test_variance_header_is_what_astropy_writes(text, monkeypatch):
    """A product's VARIANCE header, made from the input's cards where they are plain (without
    importing astropy), is astropy's ImageHDU with the input's header, name VARIANCE and the
    flux density's unit squared, written: EXTNAME and a new BUNIT after the last keyword."""
    from kspec_fluxcal import products

    shape = (14, 4096)
    expected = extension_header(products._variance_hdu(text, np.zeros(shape, np.float32)))
    if "HIERARCH" not in (text or ""):  # made without astropy's HDU
        monkeypatch.setattr(products, "_variance_hdu", None)
    assert products._variance_header.__wrapped__(text, shape) == expected


def _table_file(path, columns, compress=False, cards=()):
    """A FITS file whose first extension is the binary table of ``columns`` (astropy's),
    with the header ``cards`` (keyword, value) added."""
    hdu = fits.BinTableHDU.from_columns(columns, name="FIBRES")
    for key, value in cards:
        hdu.header[key] = value
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    if compress:
        import gzip

        raw = path.read_bytes()
        path = path.with_suffix(".fits.gz")
        path.write_bytes(gzip.compress(raw))
    return path


def test_table_columns_are_what_astropy_reads(tmp_path):
    """A plain FIBRES table is read from its bytes, without astropy's Column objects: the
    values (dtype, bytes), units and rows must be astropy's; other tables (scaled, null,
    vector or undefined logical columns, compressed files) are astropy's to read."""
    rng = np.random.default_rng(4)
    text = np.array(["ab  ", " c", "", "x y", "longer txt", "z"])
    plain = [
        fits.Column("NAME", "10A", array=text),
        fits.Column("TYPE", "1A", array=np.array(list("PSCPSU"))),
        fits.Column("RA", "D", unit="deg", array=rng.uniform(0, 360, 6)),
        fits.Column("MAG", "E", unit="mag", array=rng.normal(size=6).astype(np.float32)),
        fits.Column("OBJID", "K", array=np.arange(6) - 1),
        fits.Column("SPEC", "J", array=np.arange(6, dtype=np.int32)),
        fits.Column("SLOT", "I", array=np.arange(6, dtype=np.int16)),
        fits.Column("FLAG", "B", array=np.arange(6, dtype=np.uint8)),
        fits.Column("USED", "L", array=rng.random(6) > 0.5),
    ]
    latin = fits.Column("NOTE", "6A", array=np.array([b"\xe9toile", b"a", b"", b"b", b"c",
                                                      b"d"]))
    others = {
        "unsigned": fits.Column("PIX", "I", bzero=32768, array=np.arange(6, dtype=np.uint16)),
        "vector": fits.Column("V", "3D", array=rng.normal(size=(6, 3))),
    }
    cases = {"plain": (plain, True, ()), "latin-1": ([*plain[:2], latin], True, ()),
             "compressed": (plain, False, ()),
             "scaled": (plain[:5], False, [("TSCAL5", 2.0)]),
             "null": (plain[:5], False, [("TNULL5", -1)]),
             **{k: ([*plain[:3], c], False, ()) for k, c in others.items()}}
    for name, (columns, fast, cards) in cases.items():
        path = _table_file(tmp_path / f"{name}.fits", columns, compress=name == "compressed",
                           cards=cards)
        with open_fits(path) as hdul:
            hdu = find_hdu(hdul, path, ("FIBRES",))
            nrows, read = table_columns(hdu, path, "FIBRES")
            # astropy's record array (a lazy property) is made only for the others
            assert ("data" in vars(hdu)) != fast, name
            data = hdu.data
            assert nrows == len(data) == 6
            assert list(read) == hdu.columns.names, name
            for col in hdu.columns:
                values, unit = read[col.name]
                expected = np.asarray(data[col.name])
                assert values.dtype == expected.dtype and values.shape == expected.shape
                assert values.tobytes() == expected.tobytes(), (name, col.name)
                assert unit == col.unit, (name, col.name)
    path = tmp_path / "nul.fits"
    _table_file(path, plain)
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b"T" if raw.rindex(b"T") > raw.rindex(b"F") else b"F")
    raw[at] = 0  # an undefined logical: astropy's reading, which warns
    path.write_bytes(bytes(raw))
    with open_fits(path) as hdul, pytest.warns(UserWarning, match="NULL"):
        assert not table_columns(find_hdu(hdul, path, ("FIBRES",)), path, "FIBRES")[1][
            "USED"][0].all()


def _astropy_primary_reference(data, header):
    """What astropy writes for ``PrimaryHDU(data, header)`` with EXTEND = T, verified."""
    import io

    hdu = fits.PrimaryHDU(data, header=header.copy())
    hdu.header.set("EXTEND", True, "FITS dataset may contain extensions",
                   after=f"NAXIS{hdu.header['NAXIS']}")
    buffer = io.BytesIO()
    fits.HDUList([hdu]).writeto(buffer, output_verify="exception")
    return buffer.getvalue()


def test_primary_bytes_are_what_astropy_writes():
    """A product's primary HDU is rendered from its header's cards (verified and rendered by
    astropy) without astropy's HDU objects: the bytes must be those astropy writes for the
    same header, copied cards (as read from a file: odd spacing, long strings, HIERARCH,
    record-valued, blank and commentary cards) and keywords astropy acts on included; a
    card astropy refuses is refused."""
    rng = np.random.default_rng(3)
    read = "\n".join(card.ljust(80) for card in (
        "EXPTIME =                1.0E3 / odd but valid spacing",
        "OBSERVER= 'A. Name'",
        "HIERARCH ESO DET CHIP TEMP = 170.5 / a hierarch card",
        "DP1     = 'AXIS.1: 1'",
        "",
        "COMMENT   indented commentary",
        "HISTORY reduced",
        "LONGSTR = 'a long string value that goes on and on beyond one card of eighty &'",
        "CONTINUE  'characters, continued'",
        "NIGHT   = '20261101'           / local date",
    ))
    header = fits.Header.fromstring(read, sep="\n")
    header["BUNIT"] = FLUX_UNIT
    header["FLUXCAL"] = (True, "flux calibrated")
    header["FCALRMS"] = (0.1234567890123, "rms")
    header.add_history("x" * 130)
    header["COMMENT"] = "a comment"
    for data in (rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(2, 4))):
        assert primary_bytes(data, header) == _astropy_primary_reference(data, header)
        for extra in (("BSCALE", 2.0), ("BZERO", 1.0), ("NAXIS3", 4), ("EXTNAME", "SCI"),
                      ("XTENSION", "IMAGE"), ("EXTEND", False)):
            odd = header.copy()
            odd[extra[0]] = extra[1]
            assert _written(primary_bytes, data, odd) == _written(
                _astropy_primary_reference, data, odd), extra
    bad = fits.Header.fromstring("badkey  = 1".ljust(80) + "\n" + "X       = 'no end".ljust(80),
                                 sep="\n")
    for card in bad.cards:
        damaged = header.copy()
        damaged.append(card)
        with pytest.raises(fits.VerifyError):
            _astropy_primary_reference(np.zeros((2, 2), np.float32), damaged)
        with pytest.raises(fits.VerifyError):
            primary_bytes(np.zeros((2, 2), np.float32), damaged)


def _written(write, data, header):
    """``write(data, header)``'s bytes, or 'refused' when it raises astropy's VerifyError."""
    try:
        return write(data, header)
    except fits.VerifyError:
        return "refused"


def test_star_table_written_as_astropy_writes_it_and_read_back(red_file, tmp_path):
    """FCALSTAR from the per-star Dataset (rendered as bytes) is astropy's table byte for
    byte (:func:`star_table`), and reads back as it was."""
    cal = _calibrated(open_exposure(red_file()))
    rng = np.random.default_rng(2)
    nstar, nwave = 3, cal.sizes["wavelength"]
    stars = xr.Dataset({
        "cal": (("star", "wavelength"), rng.normal(size=(nstar, nwave)), {"units": "x"}),
        "cal_mask": (("star", "wavelength"), rng.random((nstar, nwave)) > 0.3),
        "mag_obs": (("star", "band"), rng.normal(size=(nstar, 2)), {"units": "mag"}),
        "teff": ("star", [5800.0, 6100.5, np.nan], {"units": "K"}),
        "n_bands": ("star", np.array([2, 1, 0])),
        "used": ("star", [True, False, True]),
        "status": ("star", np.array(["ok", "", "no match  "], dtype=object)),
    }, coords={"wavelength": cal["wavelength"].values, "band": ["g", "r"]})
    out = write_calibrated(cal, tmp_path / "ds.fits", stars=stars)
    reference = write_calibrated(cal, tmp_path / "hdu.fits",
                                 stars=extension_bytes(star_table(stars)))
    assert out.read_bytes() == reference.read_bytes()
    back = read_standard_stars(out)
    for name in ("cal", "cal_mask", "mag_obs", "teff", "n_bands", "used"):
        np.testing.assert_array_equal(back[name].values, stars[name].values)
    assert list(back["status"].values) == ["ok", "", "no match"]
    assert list(back["band"].values) == ["g", "r"] and back["cal"].attrs["units"] == "x"
    with fits.open(out) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "VARIANCE", "WAVELA", "FIBRES", "FLUXCAL",
                                         "FCALSTAR"]
        assert hdul[0].header["EXTEND"] is True
        hdul.verify("exception")
    # Carried through a rewrite as its own bytes (what a recalibration does): the same file.
    raw = extension_raw(out, "FCALSTAR")
    again = write_calibrated(cal, tmp_path / "raw.fits", stars=raw)
    assert again.read_bytes() == out.read_bytes()
    assert extension_raw(out, "FLUXCAL")[:80].startswith(b"XTENSION= 'BINTABLE'")
    assert extension_raw(write_calibrated(cal, tmp_path / "none.fits"), "FCALSTAR") is None
    (tmp_path / "short.fits").write_bytes(out.read_bytes()[:5000])
    assert extension_raw(tmp_path / "short.fits", "FCALSTAR") is None
