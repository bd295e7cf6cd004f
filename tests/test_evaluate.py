"""Truth comparison: the science-shape and telluric metrics, on the common grid and on each
fiber's own pixels, with calibrated datasets built by hand from the truth."""

import numpy as np
import pytest
import xarray as xr

from kspec_fluxcal.masks import load_regions
from kspec_fluxcal.sim import GridStars, Setup, compare_with_truth, simulate_exposure, star_summary

SETUP = Setup("eval", pixels=1500, fibers=12)
#: A known calibration error: a 1 % sine of period 1500 A (rms 0.71 % after the 100 A median),
#: and 3 % too much flux inside the telluric bands.
SINE, PERIOD, TELLURIC_EXCESS = 0.01, 1500.0, 0.03


@pytest.fixture(scope="module")
def truths(small_grid):
    stars = GridStars(small_grid)
    return {fmt: simulate_exposure(8, stars, setup=SETUP, n_standards=2, wavelength_format=fmt,
                                   dead_fiber=True).truth for fmt in ("wavela", "wavela2d")}


def _error(wave):
    inside = np.zeros(np.shape(wave), bool)
    for lo, hi in load_regions("telluric_default"):
        inside |= (wave >= lo) & (wave <= hi)
    sine = 1.0 + SINE * np.sin(2 * np.pi * wave / PERIOD)
    return sine * np.where(inside, 1.0 + TELLURIC_EXCESS, 1.0)


def _calibrated(truth, per_fiber):
    """What a calibration with the known error would return (S/N 200 per pixel)."""
    wave = truth["wavelength"]
    if per_fiber:
        own = truth["fiber_wavelength"]
        flux = truth["true_flux_fiber"] * _error(own)
    else:
        flux = truth["true_flux"] * _error(wave)
    aperture = np.mean(truth["aperture"][truth["std_fiber"]])
    coords = {"wavelength": wave, "fiber": np.arange(flux.shape[0])}
    if per_fiber:
        coords["fiber_wavelength"] = (("fiber", "wavelength"), truth["fiber_wavelength"])
    return xr.Dataset(
        {"flux": (("fiber", "wavelength"), flux),
         "variance": (("fiber", "wavelength"), (flux / 200.0) ** 2),
         "cal": ("wavelength", _error(wave) / (truth["response"] * aperture))},
        coords=coords, attrs={"expid": str(truth["expid"]), "fcalnstr": 2})


@pytest.mark.parametrize("per_fiber", [False, True], ids=["common-grid", "per-fiber"])
def test_science_shape_and_telluric_metrics(truths, per_fiber):
    truth = truths["wavela2d" if per_fiber else "wavela"]
    metrics = compare_with_truth(_calibrated(truth, per_fiber), truth)
    assert metrics["per_fiber_wavelength"] is per_fiber
    assert metrics["n_snr10"] == metrics["science_fibers"] >= 5
    assert metrics["shape_snr10"] == pytest.approx(SINE / np.sqrt(2), rel=0.15)
    assert metrics["cal_shape"] == pytest.approx(SINE / np.sqrt(2), rel=0.15)
    assert metrics["telluric_science"] == pytest.approx(TELLURIC_EXCESS, abs=0.005)
    assert abs(metrics["level_cal"]) < 0.005 and abs(metrics["level"]) < 0.1
    assert metrics["stars"] == [] and metrics["star_summary"]["n"] == 0
    assert np.isnan(metrics["shape_snr10_noiseless"])  # no factor applied: not measured


@pytest.mark.parametrize("per_fiber", [False, True], ids=["common-grid", "per-fiber"])
def test_noiseless_metrics_see_the_applied_factor(truths, per_fiber):
    """The factor applied to each fiber, through its true response: the known error exactly,
    whatever the targets' noise."""
    truth = truths["wavela2d" if per_fiber else "wavela"]
    calibrated = _calibrated(truth, per_fiber)
    own = truth["fiber_wavelength"] if per_fiber else truth["wavelength"]
    factor = _error(own) / (truth["response_fiber"] * truth["aperture"][:, None])
    calibrated["cal_factor"] = (("fiber", "wavelength"), np.broadcast_to(factor,
                                                                          calibrated["flux"].shape))
    noisy = calibrated.copy()
    noisy["flux"] = noisy["flux"] * (1 + 0.05 * np.random.default_rng(1).standard_normal(
        noisy["flux"].shape))
    metrics = compare_with_truth(noisy, truth)
    assert metrics["shape_snr10_noiseless"] == pytest.approx(SINE / np.sqrt(2), rel=0.15)
    assert metrics["telluric_science_noiseless"] == pytest.approx(TELLURIC_EXCESS, abs=0.005)
    assert metrics["shape_snr10"] > 1.5 * metrics["shape_snr10_noiseless"]  # noise on top


def test_per_fiber_pixels_are_compared_with_their_own_truth(truths):
    truth = truths["wavela2d"]
    assert np.ptp(truth["fiber_wavelength"] - truth["wavelength"]) > 0.1 * SETUP.dispersion
    exact = _calibrated(truth, True)
    exact["flux"] = exact["flux"] / _error(truth["fiber_wavelength"])
    assert compare_with_truth(exact, truth)["shape_snr10"] < 1e-6
    shifted = exact.assign_coords(fiber_wavelength=exact["fiber_wavelength"] + 0.1)
    with pytest.raises(ValueError, match="per-fiber wavelengths differ"):
        compare_with_truth(shifted, truth)
    old = {k: v for k, v in truth.items() if k not in ("fiber_wavelength", "true_flux_fiber")}
    with pytest.raises(ValueError, match="no fiber_wavelength"):
        compare_with_truth(exact, old)


def test_per_fiber_pixels_with_arc_errors(small_grid):
    """A file's solutions are the true ones plus the simulator's arc errors: its pixels are
    compared with the truth where their light fell."""
    truth = simulate_exposure(8, GridStars(small_grid), setup=SETUP, n_standards=2,
                              wavelength_format="wavela2d", arc_error=0.2).truth
    written = truth["fiber_wavelength"] + truth["arc_error"]
    assert np.max(np.abs(truth["arc_error"])) > 0.1 * SETUP.dispersion
    exact = _calibrated(truth, True).assign_coords(
        fiber_wavelength=(("fiber", "wavelength"), written))
    exact["flux"] = (("fiber", "wavelength"), truth["true_flux_fiber"])
    assert compare_with_truth(exact, truth)["shape_snr10"] < 1e-6
    with pytest.raises(ValueError, match="per-fiber wavelengths differ"):
        compare_with_truth(exact.assign_coords(fiber_wavelength=exact["fiber_wavelength"]
                                               - truth["arc_error"]), truth)


def test_star_summary():
    rows = [{"status": "ok", "d_teff": d, "d_logg": 0.1 * k, "d_feh": 0.0, "d_rv": np.nan,
             "d_ebv": 0.01} for k, d in enumerate((-100.0, 50.0, 300.0))]
    rows.append({"status": "chi2/dof 12.00 > 10", "d_teff": 5000.0, "d_logg": 3.0,
                 "d_feh": 1.0, "d_rv": 0.0, "d_ebv": 1.0})
    summary = star_summary(rows)
    assert summary["n"] == 3
    assert summary["teff_median"] == 100.0 and summary["teff_bias"] == 50.0
    assert summary["logg_p90"] == pytest.approx(0.18)
    assert np.isnan(summary["rv_median"])  # unknown truth (e.g. CALSPEC's own velocity)
    assert star_summary(rows, only_ok=False)["teff_p90"] > 300


def test_true_calibration_is_the_floor(truths):
    """With the true factor, only the targets' noise is left: the noiseless metrics vanish."""
    from kspec_fluxcal.sim import with_true_calibration

    truth = truths["wavela"]
    calibrated = _calibrated(truth, False)
    factor = _error(truth["wavelength"]) / (truth["response_fiber"] * truth["aperture"][:, None])
    calibrated["cal_factor"] = (("fiber", "wavelength"), factor)
    perfect = compare_with_truth(with_true_calibration(calibrated, truth), truth)
    assert perfect["shape_snr10_noiseless"] < 1e-9
    assert perfect["telluric_science_noiseless"] < 1e-9
    assert compare_with_truth(calibrated, truth)["shape_snr10_noiseless"] > 0.005
