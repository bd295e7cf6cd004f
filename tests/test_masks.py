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
