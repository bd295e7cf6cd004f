"""One exposure end to end: fit, combine, apply, write, read back, compare with the truth."""

import gzip
import stat

import numpy as np
import pytest
from astropy.io import fits

from kspec_fluxcal.calibration import running_median
from kspec_fluxcal.config import Config
from kspec_fluxcal.errors import CalibrationError
from kspec_fluxcal.exposure import open_exposure
from kspec_fluxcal.grid import open_grid
from kspec_fluxcal.grid.build import build_grid
from kspec_fluxcal.masks import region_mask
from kspec_fluxcal.pipeline import calibrate_exposure, output_name
from kspec_fluxcal.products import read_standard_stars
from kspec_fluxcal.sim import (
    GridStars,
    Setup,
    compare_with_truth,
    simulate_exposure,
    write_catalog,
    write_synthetic_grid,
)

SETUP = Setup(name="pipe", pixels=1340, fibers=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    bosz = write_synthetic_grid(root / "bosz", small=True, workers=2)
    return {"stars": GridStars(bosz),
            "grid": open_grid(build_grid(bosz, root / "grid.zarr", progress=False))}


def _simulate(world, tmp_path, seed, n_standards, **kwargs):
    sim = simulate_exposure(seed, world["stars"], setup=SETUP, n_standards=n_standards,
                            snr_range=(50, 120), **kwargs)
    red = tmp_path / f"KS_{seed:04d}.fits"
    sim.hdulist.writeto(red)
    write_catalog(tmp_path / f"cat{seed}.csv", [r for r in sim.catalog])
    np.savez(tmp_path / f"truth{seed}.npz", **sim.truth)
    return red, tmp_path / f"cat{seed}.csv", tmp_path / f"truth{seed}.npz", sim


def test_calibrated_spectra_match_the_truth(world, tmp_path):
    red, cat, truth, _ = _simulate(world, tmp_path, 21, 3)
    before = red.read_bytes()
    result = calibrate_exposure(red, cat, world["grid"], out=tmp_path / "out")
    assert red.read_bytes() == before  # the input is never modified
    assert result.path == tmp_path / "out" / output_name(red)
    metrics = compare_with_truth(result.path, truth)
    assert metrics["n_standards"] == 3
    assert metrics["cal_shape"] < 0.01
    assert metrics["level_cal"] == pytest.approx(0.0, abs=0.02)
    # Every fiber with a bright truth: < 2 % shape, < 3 % level (its own aperture loss aside).
    t = dict(np.load(truth))
    ds = open_exposure(result.path)
    wave = ds["wavelength"].values
    use = (wave > 4000) & (wave < 8400) & region_mask(wave, "telluric_default")
    aperture = t["aperture"] / np.mean(t["aperture"][t["std_fiber"]])
    for fiber in np.flatnonzero(t["fiber_kind"].astype(str) == "star"):
        ratio = running_median(ds["flux"].values[fiber] / t["true_flux"][fiber], wave)[use]
        assert np.std(ratio / np.median(ratio)) < 0.02
        assert np.median(ratio) / aperture[fiber] == pytest.approx(1.0, abs=0.03)
    assert "3 standard(s) used, 0 rejected" in result.summary()


def test_output_file_follows_the_contract_and_round_trips(world, tmp_path):
    red, cat, _, _ = _simulate(world, tmp_path, 22, 2)
    result = calibrate_exposure(red, cat, world["grid"], out=tmp_path / "out")
    with fits.open(result.path) as hdul:
        names = [h.name for h in hdul]
        header = hdul[0].header
        assert names[:5] == ["PRIMARY", "VARIANCE", "WAVELA", "FIBRES", "FLUXCAL"]
        assert header["FLUXCAL"] is True and header["FCALNSTR"] == 2
        assert header["BUNIT"] == "1e-17 erg/(s cm2 Angstrom)"
        assert 0 <= header["FCALRMS"] < 0.05 and header["FCALVER"]
        assert any("combined 2 of 2 standard(s)" in str(h) for h in header["HISTORY"])
        history = "".join(str(h) for h in header["HISTORY"])  # cards wrap at 72
        assert f"configuration (package defaults), hash {Config().digest()}: every option " \
               "at its default" in history
        assert hdul["FLUXCAL"].columns.names == ["WAVELENGTH", "CAL_FACTOR", "CAL_VARIANCE",
                                                  "MASK"]
    back = open_exposure(result.path)
    np.testing.assert_allclose(back["flux"].values, result.calibrated["flux"].values, rtol=1e-6)
    np.testing.assert_array_equal(back["fiber_type"].values, result.calibrated["fiber_type"].values)
    stars = read_standard_stars(result.path)
    assert list(stars["status"].values) == list(result.stars["status"].values)
    np.testing.assert_allclose(stars["teff"].values, result.stars["teff"].values)


def test_single_star_passes_through_with_a_flag(world, tmp_path):
    red, cat, truth, _ = _simulate(world, tmp_path, 23, 1)
    result = calibrate_exposure(red, cat, world["grid"], out=tmp_path / "out")
    assert result.calibration.attrs["single_star"] == 1
    assert any("one usable standard star" in w for w in result.warnings)
    assert fits.getheader(result.path)["FCALRMS"] == -1.0
    assert compare_with_truth(result.path, truth)["cal_shape"] < 0.015


def test_zero_usable_stars_is_an_error_that_names_why(world, tmp_path):
    red, cat, _, sim = _simulate(world, tmp_path, 24, 2)
    rows = [r for r in sim.catalog if r["_role"] != "standard"]
    write_catalog(tmp_path / "empty.csv", rows)
    with pytest.raises(CalibrationError, match=r"no usable standard star \(fiber \d+ .*no catalog "
                       r"match; fiber \d+ .*no catalog match\)"):
        calibrate_exposure(red, tmp_path / "empty.csv", world["grid"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_in_place_and_overwrite(world, tmp_path):
    red, cat, _, _ = _simulate(world, tmp_path, 25, 2)
    out = tmp_path / "out"
    calibrate_exposure(red, cat, world["grid"], out=out)
    with pytest.raises(Exception, match="overwrite"):
        calibrate_exposure(red, cat, world["grid"], out=out)
    calibrate_exposure(red, cat, world["grid"], out=out, overwrite=True)
    calibrate_exposure(red, cat, world["grid"], in_place=True)
    assert fits.getheader(red)["FLUXCAL"] is True


def test_in_place_keeps_the_files_permissions_and_compression(world, tmp_path):
    """A RED file calibrated in place was left world-readable (0644 whatever it had), and a
    ``.fits.gz`` one got plain FITS under its compressed name."""
    red, cat, _, _ = _simulate(world, tmp_path, 27, 2)
    packed = red.with_name(red.name + ".gz")
    packed.write_bytes(gzip.compress(red.read_bytes()))
    for path in (red, packed):
        path.chmod(0o600)
        calibrate_exposure(path, cat, world["grid"], in_place=True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    for path in (red, packed):
        ds = open_exposure(path)
        assert ds.attrs["fluxcal"] is True
    np.testing.assert_array_equal(open_exposure(packed)["flux"].values,
                                  open_exposure(red)["flux"].values)


@pytest.mark.parametrize("layout", [("wavela2d", "nm", "vac"), ("wcs", "Angstroms", "air")])
def test_product_keeps_the_input_layout(world, tmp_path, layout):
    """Per-fiber WAVELA (in nm, vacuum) or a linear WCS: the product has the input's shape,
    its WAVELA/WCS and AIRORVAC as they were, and calibrated/input per pixel is exactly the
    factor of the FCALFAC extension (no pixel resampled)."""
    fmt, unit, medium = layout
    red, cat, _, _ = _simulate(world, tmp_path, 23, 2, wavelength_format=fmt,
                               wavelength_unit=unit, medium=medium)
    result = calibrate_exposure(red, cat, world["grid"], out=tmp_path / "out")
    with fits.open(red) as raw, fits.open(result.path) as out:
        counts = raw[0].data.astype(np.float64)
        assert out[0].data.shape == counts.shape == out["VARIANCE"].data.shape
        factor = out["FCALFAC"].data
        assert factor.shape == counts.shape and out["FCALFVAR"].data.shape == counts.shape
        np.testing.assert_array_equal(out[0].data, (counts * factor).astype(np.float32))
        if fmt == "wcs":
            assert "WAVELA" not in out
            for key in ("CRVAL1", "CDELT1", "CRPIX1", "CUNIT1", "CTYPE1"):
                assert out[0].header[key] == raw[0].header[key]
        else:
            np.testing.assert_array_equal(out["WAVELA"].data, raw["WAVELA"].data)
            assert out["WAVELA"].header["BUNIT"] == raw["WAVELA"].header["BUNIT"] == "nm"
            assert out[0].header["AIRORVAC"] == raw[0].header["AIRORVAC"] == "vac"
            # Fibers' solutions differ: their factors are the calibration at their own pixels.
            assert not np.allclose(factor[0], factor[1], rtol=1e-6, equal_nan=True)
        assert len(out["FLUXCAL"].data) == counts.shape[1]
        assert out["FLUXCAL"].header["AIRORVAC"] == medium
