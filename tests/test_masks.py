import numpy as np
import pytest
import xarray as xr

from kspec_fluxcal.errors import ConfigError
from kspec_fluxcal.masks import load_regions, mask_coverage_fraction, region_mask


def test_default_telluric_regions():
    regions = load_regions("telluric_default")
    assert regions == ((6860, 6960), (7150, 7340), (7590, 7700), (8100, 8360), (8920, 9200))


def test_region_mask_on_dataarray():
    wave = xr.DataArray(np.arange(6000.0, 8000.0, 1.0), dims="wavelength")
    wave = wave.assign_coords(wavelength=wave)
    good = region_mask(wave, "telluric_default")
    assert good.dims == ("wavelength",)
    assert not good.sel(wavelength=7600.0) and good.sel(wavelength=7500.0)
    padded = region_mask(wave, [(7000, 7010)], pad=5.0)
    assert not padded.sel(wavelength=6996.0) and padded.sel(wavelength=6994.0)


def test_line_cores_include_balmer_and_cat():
    wave = np.array([6562.8, 4861.3, 8542.1, 6000.0])
    assert list(region_mask(wave, "stellar_lines")) == [False, False, False, True]


def test_coverage_fraction_flags_unit_errors():
    optical = np.linspace(3500, 9500, 6001)
    assert 0.05 < mask_coverage_fraction(optical, "telluric_default") < 0.2
    assert mask_coverage_fraction(optical / 10, "telluric_default") == 0.0


def test_mask_file(tmp_path):
    path = tmp_path / "m.dat"
    path.write_text("# comment\n5000 5010 a line\n\n4000 4001\n")
    assert load_regions(path) == ((4000, 4001), (5000, 5010))
    path.write_text("5000\n")
    with pytest.raises(ConfigError, match=r"m.dat: line 1: expected 'lo hi"):
        load_regions(path)
    with pytest.raises(ConfigError, match="no such mask file"):
        load_regions(tmp_path / "absent.dat")


def test_region_mask_pad_per_pixel_is_every_region_against_every_pixel():
    """Issue 14: a pad per pixel (line cores widened by the line spread) gives the mask of
    comparing each pixel with every widened region, to the last rounding: overlapping,
    nested and repeated regions, pixels on the widened edges, negative and NaN pads."""
    rng = np.random.default_rng(7)
    lo = rng.uniform(4000.0, 6000.0, 25)
    regions = np.column_stack([lo, lo + rng.uniform(0.1, 300.0, lo.size)])
    regions = np.concatenate([regions, regions[:3], [[4500.0, 4500.5], [4400.0, 5900.0]]])
    n = len(regions)
    wave = np.sort(rng.uniform(3900.0, 6400.0, (3, 2000)), axis=1)
    pad = rng.uniform(-2.0, 8.0, wave.shape)
    # pixels exactly on the widened edges (as rounded; pads there keep the regions whole)
    pad[:2, :n] = rng.uniform(0.0, 8.0, (2, n))
    wave[0, :n] = regions[:, 0] - pad[0, :n]
    wave[1, :n] = regions[:, 1] + pad[1, :n]
    pad[2, 5], wave[2, 9] = np.nan, np.nan
    want = ~((wave[..., None] >= regions[:, 0] - pad[..., None])
             & (wave[..., None] <= regions[:, 1] + pad[..., None])).any(axis=-1)
    got = region_mask(wave, regions, pad=pad)
    assert got.shape == wave.shape and 0.1 < got.mean() < 0.9
    np.testing.assert_array_equal(got, want)
    assert not got[:2, :n].any() and got[2, 9]
    # pixels within an ulp of the widened starts of separate regions, where the search for
    # w + p is rounded otherwise than lo - p <= w (both ways, ~100 times)
    lo = 4000.37 + 100.0 * np.arange(10)
    apart = np.column_stack([lo, lo + 50.0])
    p = 10.0 ** rng.uniform(-6.0, 1.3, (lo.size, 40000))
    start = lo[:, None] - p
    w = np.concatenate([np.nextafter(start, -np.inf), start])
    p = np.concatenate([p, p])
    want = ~((w[..., None] >= apart[:, 0] - p[..., None])
             & (w[..., None] <= apart[:, 1] + p[..., None])).any(axis=-1)
    np.testing.assert_array_equal(region_mask(w, apart, pad=p), want)
    # one row's pads for every row, and no region at all
    np.testing.assert_array_equal(
        region_mask(wave, regions, pad=pad[0]),
        region_mask(wave, regions, pad=np.broadcast_to(pad[0], wave.shape).copy()))
    assert region_mask(wave, [], pad=pad).all()


def test_region_mask_of_increasing_rows_is_every_region_against_every_pixel():
    """Issue 14: rows of increasing wavelengths (the slices between each region's ends) and
    any other wavelengths (a search per pixel) give the mask of comparing each pixel with
    every region: overlapping, nested, empty (hi < lo) and repeated regions, pixels on the
    ends, repeated wavelengths, infinite ends; NaN pixels and a region starting at NaN
    contain nothing, and a region ending at NaN stops the rows' path."""
    from kspec_fluxcal.masks import _increasing

    rng = np.random.default_rng(11)
    lo = rng.choice(np.arange(4000.0, 6000.0, 25.0), 20)
    regions = np.column_stack([lo, lo + rng.choice([-25.0, 0.0, 25.0, 100.0], lo.size)])
    regions = np.concatenate([regions, regions[:3], [[-np.inf, 3950.0], [5990.0, np.inf]]])
    wave = np.sort(rng.choice(np.arange(3900.0, 6100.0, 5.0), (3, 500)), axis=1)

    def every(w, r):
        with np.errstate(invalid="ignore"):
            return ~((w[..., None] >= r[:, 0]) & (w[..., None] <= r[:, 1])).any(axis=-1)

    assert _increasing(wave, regions[:, 1]) and _increasing(wave[0], regions[:, 1])
    for w in (wave, wave[1], wave[:, ::-1]):  # (reversed rows: a search per pixel)
        got = region_mask(w, regions)
        assert got.shape == w.shape and 0.1 < got.mean() < 0.9
        np.testing.assert_array_equal(got, every(w, regions))
    nan_start = np.concatenate([regions, [[np.nan, 5000.0]]])
    np.testing.assert_array_equal(region_mask(wave, nan_start), every(wave, regions))
    assert not _increasing(wave, np.array([5000.0, np.nan]))
    gap = wave.copy()
    gap[1, 7] = np.nan
    assert not _increasing(gap, regions[:, 1])
    np.testing.assert_array_equal(region_mask(gap, regions), every(gap, regions))
    # a scalar wavelength (no rows: the search per pixel)
    assert region_mask(3990.0, [[4000.0, 4100.0]]) and not region_mask(4000.0, [[4000.0, 4100.0]])
