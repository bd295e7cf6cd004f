"""Chromatic fiber losses (issue 13 item 6): the physics in fiberloss and the simulator's
``chromatic_losses``, photometric nights and exposures without standards in survey plans."""

import json

import numpy as np
import pytest
from astropy.io import fits

from kspec_fluxcal.exposure import open_exposure
from kspec_fluxcal.sim import GridStars, Setup, simulate_exposure, simulate_survey
from kspec_fluxcal.sim import fiber_losses as fiberloss

SMALL = Setup("small", pixels=600, fibers=8)


def test_refraction_follows_edlen_and_grows_with_airmass():
    # Edlen 1953 (Filippenko 1982 Eq. 1): dry air at 15 C, 760 mmHg, (n - 1) 1e6 = 278.96 at
    # 5000 A; the pressure and temperature factor is 1 there.
    standard = {"pressure": 760.0, "temperature": 15.0, "water": 0.0}
    assert fiberloss.refractive_index_minus_one(5000.0, standard) == pytest.approx(
        278.96e-6, rel=1e-4)
    lam = np.array([3500.0, 4000.0, 6000.0, 8500.0])
    assert np.all(fiberloss.differential_refraction(lam, 1.0) == 0.0)  # zenith
    r15, r20 = (fiberloss.differential_refraction(lam, x) for x in (1.5, 2.0))
    assert r20[2] == 0.0 and r20[0] > r20[1] > 0 > r20[3]  # blue towards the zenith
    np.testing.assert_allclose(r20[[0, 1, 3]] / r15[[0, 1, 3]], np.sqrt(3.0 / 1.25))  # tan z
    assert 1.0 < r20[1] < 2.5  # arcsec, 4000 vs 6000 A at airmass 2 (Filippenko's Table 1)


def test_enclosed_fraction_of_a_centred_and_an_offset_image():
    fwhm = 1.2
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    centred = fiberloss.enclosed_fraction(0.0, fwhm)
    assert centred == pytest.approx(1 - np.exp(-0.5 * (1.5 / sigma) ** 2), rel=1e-9)
    assert fiberloss.enclosed_fraction(0.5, fwhm) < centred
    aperture = fiberloss.fiber_apertures(np.array([4000.0, 6000.0, 8000.0]), 1.2, 1.8,
                                         np.array([[0.3, 0.0], [0.0, 0.0]]))
    assert aperture[1, 1] > aperture[0, 1]  # the offset fiber loses more
    assert aperture[1, 0] < aperture[1, 1]  # blue: a broader, displaced image
    expected = fiberloss.expected_aperture(np.array([4000.0, 6000.0]), 1.2, 1.8, 0.25)
    assert np.all(expected < fiberloss.fiber_apertures(
        np.array([4000.0, 6000.0]), 1.2, 1.8, np.zeros((1, 2)))[0] + 1e-12)


def test_simulated_chromatic_losses_are_in_the_counts_and_the_truth(small_grid):
    stars = GridStars(small_grid)
    grey = simulate_exposure(5, stars, setup=SMALL, n_standards=2, airmass=1.9)
    sim = simulate_exposure(5, stars, setup=SMALL, n_standards=2, airmass=1.9,
                            chromatic_losses=True)
    t = sim.truth
    ap = t["aperture_chromatic"]
    np.testing.assert_allclose(t["counts_noiseless"], t["true_flux"] * t["response"] * ap,
                               rtol=1e-12)
    assert sim.hdulist[0].header["SEEING"] == pytest.approx(float(t["seeing"]))
    assert "SEEING" not in grey.hdulist[0].header and "aperture_chromatic" not in grey.truth
    blue, red = ap[:, :50].mean(axis=1), ap[:, 250:300].mean(axis=1)
    assert np.mean(blue < red) > 0.7  # at airmass 1.9 most fibers lose more blue light
    np.testing.assert_allclose(t["aperture"], np.median(ap, axis=1))
    assert t["aperture_expected"].shape == t["wavelength"].shape
    assert np.all(t["aperture_expected"] < 1) and np.ptp(t["aperture_expected"]) > 0.01
    # Grey losses: the expected aperture is the mean of the grey draws' range.
    np.testing.assert_allclose(grey.truth["aperture_expected"], 0.9)


def test_survey_plans_without_standards_weak_singles_and_photometric_nights(small_grid,
                                                                              tmp_path):
    out = simulate_survey(tmp_path / "sv", exposures=8, nights=2, seed=4, grid=small_grid,
                          pixels=400, fibers=8, n_standards=(1, 3), no_standards=0.3,
                          snr_range=(60.0, 150.0), snr_range_single=(20.0, 40.0),
                          photometric_nights=1.0, chromatic_losses=True)
    info = json.loads((out / "survey.json").read_text())
    entries = info["exposures"]
    assert info["options"]["no_standards"] == 0.3 and info["options"]["chromatic_losses"]
    assert any(e["n_standards"] == 0 for e in entries)
    for entry in entries:
        truth = dict(np.load(out / entry["truth"]))
        assert entry["photometric"] and bool(truth["photometric"])
        assert 0.98 <= truth["transparency"] <= 1.0
        if entry["n_standards"] == 1:
            assert 20.0 <= truth["std_snr"][0] <= 40.0
        elif entry["n_standards"] > 1:
            assert np.all(truth["std_snr"] >= 60.0)
        with fits.open(out / entry["path"]) as hdul:
            assert hdul[0].header["SEEING"] == pytest.approx(entry["seeing"])
        assert open_exposure(out / entry["path"]).attrs["seeing"] == pytest.approx(
            entry["seeing"])
    with pytest.raises(ValueError, match="no_standards"):
        simulate_survey(tmp_path / "bad", exposures=2, grid=small_grid, no_standards=1.5)


def test_refraction_loss_shape_is_the_small_displacement_loss_of_an_image():
    """The survey model's refraction shape: a star centred at the guide wavelength and
    displaced by the differential refraction elsewhere loses ln flux ~ shape(lambda)."""
    from kspec_fluxcal.refraction import refraction_loss_shape

    lam = np.linspace(3600.0, 8500.0, 50)
    shape = refraction_loss_shape(lam, guide=6000.0)
    assert shape[np.argmin(np.abs(lam - 6000.0))] < 1e-3
    assert refraction_loss_shape(4000.0, guide=6000.0) == pytest.approx(1.0)
    offset = 0.1 * fiberloss.differential_refraction(lam, 1.5)  # small: quadratic regime
    loss = np.log(fiberloss.enclosed_fraction(offset, 1.5) / fiberloss.enclosed_fraction(0.0, 1.5))
    amplitude = loss @ shape / (shape @ shape)
    assert amplitude < 0
    np.testing.assert_allclose(loss, amplitude * shape, atol=0.01 * abs(loss).max())
