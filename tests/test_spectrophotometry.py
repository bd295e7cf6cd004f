"""The spectrophotometric check (issue 13 item 5): synthetic g, r, i of calibrated program
stars against their catalog photometry."""

import numpy as np
import pytest
import xarray as xr
from conftest import catalog_row

from kspec_fluxcal.catalog import read_catalog
from kspec_fluxcal.constants import FLUX_UNIT_SCALE
from kspec_fluxcal.photometry import ab_to_flam
from kspec_fluxcal.spectrophotometry import check_exposure, spectrophotometric_check


@pytest.fixture
def exposure_and_catalog(catalog_file):
    """Six fibers: four program stars (flat in f_nu at AB 16.0-16.6), a galaxy without a
    catalog entry, a standard; the catalog has the stars' g = r = i."""
    wave = np.linspace(3600.0, 9000.0, 2000)
    mags = np.array([16.0, 16.2, 16.4, 16.6])
    flux = np.vstack([ab_to_flam(m, wave) / FLUX_UNIT_SCALE for m in mags]
                     + [np.full(wave.size, 5.0), ab_to_flam(15.0, wave) / FLUX_UNIT_SCALE])
    flux[1, 900] = np.nan  # a cosmic ray in a band: bridged, not a lost magnitude
    objid = np.array([11, 12, 13, 14, 99, 15])
    ds = xr.Dataset(
        {"flux": (("fiber", "wavelength"), flux),
         "variance": (("fiber", "wavelength"), np.full(flux.shape, 1e-2))},
        coords={"wavelength": wave, "fiber": np.arange(6),
                "fiber_type": ("fiber", np.array(["P", "P", "P", "P", "P", "C"])),
                "objid": ("fiber", objid), "ra": ("fiber", 150.0 + 0.01 * np.arange(6)),
                "dec": ("fiber", np.full(6, 2.0))},
        attrs={"history": []})
    rows = [catalog_row(int(o), 150.0 + 0.01 * k, 2.0, g=m, r=m, i=m)
            for k, (o, m) in enumerate(zip(objid[:4], mags, strict=True))]
    rows.append(catalog_row(15, 150.05, 2.0))
    return ds, read_catalog(catalog_file(rows))


def test_offsets_are_zero_for_a_right_calibration(exposure_and_catalog):
    ds, catalog = exposure_and_catalog
    check = spectrophotometric_check(ds, catalog)
    assert check["sphot_n"] == 4  # the galaxy and the standard are not checked
    for band in "gri":
        assert abs(check[f"sphot_{band}"]) < 0.003
    assert check["sphot_scatter"] < 0.003
    assert sorted(s["objid"] for s in check["stars"]) == [11, 12, 13, 14]


def test_an_injected_two_percent_error_is_recovered(exposure_and_catalog):
    ds, catalog = exposure_and_catalog
    before = spectrophotometric_check(ds, catalog)
    ds["flux"] = ds["flux"] * 1.02
    after = check_exposure(ds, catalog)
    for band in "gri":
        shift = after[f"sphot_{band}"] - before[f"sphot_{band}"]
        assert shift == pytest.approx(-2.5 * np.log10(1.02), abs=1e-6)
    assert ds.attrs["sphot_n"] == 4 and ds.attrs["sphot_g"] == after["sphot_g"]
    assert "spectrophotometric check: 4 program star(s)" in ds.attrs["history"][-1]


def test_scatter_is_the_stars_rms_not_biased_low_for_a_few(exposure_and_catalog):
    """FCALSPS of stars whose fluxes are off by known amounts is their rms about the mean
    (the sample standard deviation), not a median absolute deviation (which for three
    stars is the smaller of two deviations)."""
    ds, catalog = exposure_and_catalog
    errors = np.array([0.03, -0.01, 0.0, 0.05])  # mag, the same in g, r, i
    ds["flux"] = ds["flux"] * xr.DataArray(
        np.append(10 ** (-0.4 * errors), [1.0, 1.0]), dims="fiber")
    check = spectrophotometric_check(ds, catalog)
    assert check["sphot_scatter"] == pytest.approx(np.std(errors, ddof=1), rel=0.02)


def test_nothing_to_check_leaves_the_keywords_out(exposure_and_catalog, catalog_file):
    ds, _ = exposure_and_catalog
    other = read_catalog(catalog_file([catalog_row(777, 10.0, -5.0)], name="other.csv"))
    check = check_exposure(ds, other)
    assert check["sphot_n"] == 0 and ds.attrs["sphot_g"] is None
    assert not any("spectrophotometric" in h for h in ds.attrs["history"])


def test_program_stars_need_a_median_snr_of_5_and_a_dead_fiber_is_left_out(
        exposure_and_catalog):
    """A fiber's S/N is the median over its pixels with data (np.nanmedian's): alternate
    pixels at S/N 2 and 8 have 5, enough; one S/N-8 pixel fewer leaves the median at 2; an
    all-NaN fiber has none (and no warning)."""
    ds, catalog = exposure_and_catalog
    flux = ds["flux"].values.copy()
    snr = np.where(np.arange(flux.shape[1]) % 2, 8.0, 2.0)  # exact: powers of two
    variance = ds["variance"].values.copy()
    variance[[0, 2]] = (flux[[0, 2]] / snr) ** 2
    flux[2, 1] = np.nan  # an S/N-8 pixel without data
    flux[3] = np.nan
    ds["flux"], ds["variance"] = (("fiber", "wavelength"), flux), (("fiber", "wavelength"),
                                                                   variance)
    check = spectrophotometric_check(ds, catalog)
    assert sorted(s["fiber"] for s in check["stars"]) == [0, 1]


def test_median_threshold_decided_by_counts_as_by_the_median():
    """The S/N cut counts the pixels below it instead of sorting each fiber's: its decision
    must be np.nanmedian's, for odd and even counts, ties at the threshold, the threshold
    between the middle values, infinities, NaN and rows without values."""
    from kspec_fluxcal.spectrophotometry import _median_reaches

    rng = np.random.default_rng(5)
    rows = [rng.choice([4.0, 5.0, 6.0, np.nan, np.inf, -np.inf], size=n) for n in
            (1, 2, 3, 4, 5, 6, 7, 8) for _ in range(60)]
    rows += [np.array([4.0, 6.0]), np.array([4.0, 5.9]), np.array([3.0, 7.0, np.nan]),
             np.array([4.9, 5.1]), np.full(3, np.nan), np.array([np.inf, -np.inf])]
    width = max(r.size for r in rows)
    values = np.array([np.pad(r, (0, width - r.size), constant_values=np.nan) for r in rows])
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        expected = np.nanmedian(values, axis=1) >= 5.0
    np.testing.assert_array_equal(_median_reaches(values, 5.0), expected)
    assert _median_reaches(values, 5.0).sum() not in (0, len(rows))


def test_a_lazy_exposure_is_checked_as_its_values(exposure_and_catalog):
    """The program fibers of a NumPy exposure are read directly, a Dask one's selected (only
    they are computed): both checks are the same."""
    ds, catalog = exposure_and_catalog
    lazy = spectrophotometric_check(ds.chunk({"fiber": 2}), catalog)
    assert lazy == spectrophotometric_check(ds, catalog) and lazy["sphot_n"] == 4


def test_band_medians_are_each_bands_with_or_without_a_missing_magnitude(
        exposure_and_catalog, catalog_file):
    """Each band's median is that of its stars' offsets, the same whether every star has
    every band (one median for all bands) or a star lacks one (its other bands counted)."""
    ds, _ = exposure_and_catalog
    errors = np.array([0.03, -0.01, 0.0, 0.05])
    ds["flux"] = ds["flux"] * xr.DataArray(
        np.append(10 ** (-0.4 * errors), [1.0, 1.0]), dims="fiber")
    mags = [16.0, 16.2, 16.4, 16.6]
    for missing in (False, True):
        rows = [catalog_row(11 + k, 150.0 + 0.01 * k, 2.0, g=m, r=m + 0.1 * k,
                            i="" if missing and k == 1 else m) for k, m in enumerate(mags)]
        check = spectrophotometric_check(ds, read_catalog(catalog_file(rows)))
        offsets = {b: np.array([s[b] for s in check["stars"]]) for b in "gri"}
        assert np.isnan(offsets["i"][1]) == missing and check["sphot_n"] == 4
        for band, values in offsets.items():
            assert check[f"sphot_{band}"] == float(np.median(values[np.isfinite(values)]))
        assert check["sphot_r"] < check["sphot_g"] - 0.1  # the bands differ: not mixed up
