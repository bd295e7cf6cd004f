"""The simulator's second-order light (``second_order``): the light of lambda / 2 on the
pixel of lambda, from twice the setup's blue end redward."""

import json

import numpy as np
import pytest
from conftest import FlatStar

from kspec_fluxcal.errors import FluxCalWarning
from kspec_fluxcal.second_order import blaze_efficiency
from kspec_fluxcal.sim import (
    ISOPLANE_SETUP,
    GridStars,
    Setup,
    simulate_exposure,
    simulate_survey,
)

RATIO = 0.05


@pytest.fixture(scope="module")
def pair(small_grid):
    """The same exposure (IsoPlane, a flat standard) without and with second order."""

    def make(**kwargs):
        return simulate_exposure(11, GridStars(small_grid), setup=ISOPLANE_SETUP,
                                 n_standards=1, standard_source=FlatStar(), **kwargs)

    return make(), make(second_order=RATIO)


def test_flat_source_gains_the_ratio_times_half_its_counts_at_half_the_wavelength(pair):
    """Pixel lambda gets r x the photons of lambda / 2 over half a pixel's width: for a
    flat source (reddened only), r / 2 x its first-order counts at lambda / 2."""
    _, on = pair
    t = on.truth
    f = int(t["std_fiber"][0])
    wave = t["wavelength"]
    second = t["second_order_counts"][f]
    red = wave >= 2 * ISOPLANE_SETUP.wave_min
    expected = RATIO / 2 * np.interp(wave[red] / 2, wave, t["counts_noiseless"][f])
    np.testing.assert_allclose(second[red], expected, rtol=2e-4)
    assert np.all(second[~red] == 0)  # nothing below twice the blue end (7000 A)
    assert float(t["second_order"]) == RATIO


def test_every_fiber_and_nothing_else_changes(pair):
    """Every target gets second-order light; the written counts change only from 7000 A
    (by the second order's counts and their noise); every other number is the same."""
    off, on = pair
    t = on.truth
    red = t["wavelength"] >= 2 * ISOPLANE_SETUP.wave_min
    targets = np.flatnonzero(~np.isin(t["fiber_kind"], ["sky", "dead"]))
    second = t["second_order_counts"]
    assert np.all(second[targets][:, red] > 0) and np.all(second[:, ~red] == 0)
    counts_off, counts_on = off.hdulist[0].data, on.hdulist[0].data
    np.testing.assert_array_equal(counts_on[:, ~red], counts_off[:, ~red])
    variance_off, variance_on = off.hdulist["VARIANCE"].data, on.hdulist["VARIANCE"].data
    np.testing.assert_array_equal(variance_on[:, ~red], variance_off[:, ~red])
    added = variance_on - variance_off
    for f in targets:  # the targets' and the sky's second order, as Poisson counts
        sky = added[f, red] - second[f, red]  # subtracted: in the variance only
        assert np.all(sky[np.isfinite(sky)] > 0)
        gained = np.nansum((counts_on - counts_off)[f, red])
        assert abs(gained - np.sum(second[f, red])) < 4 * np.sqrt(np.nansum(added[f, red]))
    for key in ("true_flux", "counts_noiseless", "sky_counts", "std_gmag", "aperture",
                "transparency"):
        np.testing.assert_array_equal(t[key], off.truth[key])
    assert "second_order" not in off.truth and "second_order_counts" not in off.truth
    assert "second_order_blaze" not in on.truth  # the constant ratio: no blaze recorded


def test_second_order_needs_a_ratio_below_one(small_grid):
    for bad in (-0.01, 1.0):
        with pytest.raises(ValueError, match="second_order"):
            simulate_exposure(1, GridStars(small_grid), setup=ISOPLANE_SETUP,
                              second_order=bad)


def test_survey_passes_and_records_second_order(small_grid, tmp_path):
    out = simulate_survey(tmp_path / "s", exposures=1, seed=4, grid=small_grid,
                          setups=[Setup("t", pixels=600)], second_order=0.02)
    info = json.loads((out / "survey.json").read_text())
    assert info["options"]["second_order"] == 0.02
    assert "second_order_blaze" not in info["options"]
    truth = np.load(out / info["exposures"][0]["truth"])
    assert float(truth["second_order"]) == 0.02 and np.nanmax(truth["second_order_counts"]) > 0


class _LineAt4000(FlatStar):
    """A flat continuum with one unresolved emission line at 4000 A."""

    label = "test:line4000"
    centre = 4000.0

    def __init__(self):
        super().__init__()
        coarse = self.wavelength
        fine = np.exp(np.arange(np.log(3980.0), np.log(4020.0), 2e-6))
        self.wavelength = np.union1d(coarse[(coarse < 3980) | (coarse > 4020)], fine)

    def spectra(self, params):
        line = 50.0 * np.exp(-0.5 * ((self.wavelength - self.centre) / 0.03) ** 2)
        return np.broadcast_to(1e6 * (1.0 + line), (len(params["teff"]), self.wavelength.size))


def _line_fwhm_pixels(counts, near):
    """FWHM in pixels of the emission line in ``counts`` around pixel ``near`` (continuum
    from the median of the 60 pixels around, half maximum by linear interpolation)."""
    window = counts[near - 30:near + 30]
    peak = window - np.median(window)
    k = int(np.argmax(peak))
    half = peak[k] / 2
    left = k - 1 - np.flatnonzero(peak[k - 1::-1] < half)[0]
    right = k + np.flatnonzero(peak[k:] < half)[0]
    lo = left + (half - peak[left]) / (peak[left + 1] - peak[left])
    hi = right - 1 + (peak[right - 1] - half) / (peak[right - 1] - peak[right])
    return near - 30 + k, hi - lo


def test_the_second_order_line_spread_is_the_same_in_pixels(small_grid):
    """A line at 4000 A falls in second order at the pixel of 8000 A with the first order's
    FWHM in pixels (FWHM(8000 A) / 2 in Angstrom at 4000 A, pixels of half the width): with
    the first order's line spread at 4000 A instead it would be twice as wide."""
    setup = Setup("octave", pixels=2000, fibers=8, wave_min=3800.0, wave_max=8400.0,
                  fwhm_pixels=(3.0, 3.0, 3.0))
    t = simulate_exposure(5, GridStars(small_grid), setup=setup, n_standards=1,
                          standard_source=_LineAt4000(), second_order=RATIO).truth
    f, wave = int(t["std_fiber"][0]), t["wavelength"]
    shift = 1.0 + float(t["std_rv"][0]) / 299792.458  # the star's own velocity
    first = int(np.argmin(np.abs(wave - 4000.0 * shift)))
    second = int(np.argmin(np.abs(wave - 8000.0 * shift)))
    at1, fwhm1 = _line_fwhm_pixels(t["counts_noiseless"][f], first)
    at2, fwhm2 = _line_fwhm_pixels(t["second_order_counts"][f], second)
    assert abs(at2 - second) <= 1 and abs(at1 - first) <= 1
    assert fwhm1 == pytest.approx(3.0, rel=0.05)
    assert fwhm2 == pytest.approx(fwhm1, rel=0.05)


def test_a_setup_short_of_an_octave_is_told_it_gets_no_second_order(small_grid):
    setup = Setup("narrow", pixels=600, fibers=8, wave_min=5000.0, wave_max=7000.0)
    with pytest.warns(FluxCalWarning, match="second_order=0.05 adds nothing"):
        t = simulate_exposure(2, GridStars(small_grid), setup=setup, second_order=RATIO).truth
    assert not np.any(t["second_order_counts"])


BLAZE = 5000.0


def _scalar_ratio(wave, blaze):
    """E_2 / E_1 at lambda / 2 in scalar theory, written out: with x = lambda_b / mu,
    |sin pi (2 - x)| = |sin pi (1 - x)|, so the ratio is ((x - 1) / (2 - x))^2."""
    mu = wave / 2
    return ((blaze - mu) / (2 * mu - blaze)) ** 2


def test_scalar_ratio_at_a_few_wavelengths():
    wave = np.array([7000.0, 7500.0, 8000.0, 8500.0])
    ratio = blaze_efficiency(wave / 2, 2, BLAZE) / blaze_efficiency(wave / 2, 1, BLAZE)
    np.testing.assert_allclose(ratio, [9 / 16, 1 / 4, 1 / 9, 9 / 196], rtol=1e-12)
    np.testing.assert_allclose(ratio, _scalar_ratio(wave, BLAZE), rtol=1e-12)
    assert blaze_efficiency(BLAZE, 1, BLAZE) == 1.0 == blaze_efficiency(BLAZE / 2, 2, BLAZE)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_blaze_weights_the_second_order_by_the_scalar_ratio(small_grid, scale):
    """With second_order_blaze, pixel lambda gets scale x E_2/E_1(lambda / 2) x the photons
    of lambda / 2 over half a pixel's width; the first order is the same as without."""
    t = simulate_exposure(11, GridStars(small_grid), setup=ISOPLANE_SETUP, n_standards=1,
                          standard_source=FlatStar(), second_order=scale,
                          second_order_blaze=BLAZE).truth
    f = int(t["std_fiber"][0])
    wave = t["wavelength"]
    red = wave >= 2 * ISOPLANE_SETUP.wave_min
    expected = scale * _scalar_ratio(wave[red], BLAZE) / 2 \
        * np.interp(wave[red] / 2, wave, t["counts_noiseless"][f])
    np.testing.assert_allclose(t["second_order_counts"][f][red], expected, rtol=2e-4)
    assert np.all(t["second_order_counts"][:, ~red] == 0)
    assert float(t["second_order_blaze"]) == BLAZE and float(t["second_order"]) == scale


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"second_order": 1.0, "second_order_blaze": 0.0}, "second_order_blaze=0.0"),
    ({"second_order": 1.0, "second_order_blaze": float("nan")}, "second_order_blaze=nan"),
    # twice the IsoPlane's blue end: E_1 would vanish at lambda / 2 = 3500 A
    ({"second_order": 1.0, "second_order_blaze": 7000.0}, "second_order_blaze=7000.0"),
    ({"second_order": 0.0, "second_order_blaze": BLAZE}, "second_order=0.0 with"),
    ({"second_order": 1.5, "second_order_blaze": BLAZE}, "second_order=1.5 with"),
])
def test_bad_blaze_options_are_refused(small_grid, kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_exposure(1, GridStars(small_grid), setup=ISOPLANE_SETUP, **kwargs)


def test_survey_records_the_blaze(small_grid, tmp_path):
    out = simulate_survey(tmp_path / "s", exposures=1, seed=4, grid=small_grid,
                          setups=[Setup("t", pixels=600)], second_order=1.0,
                          second_order_blaze=BLAZE)
    info = json.loads((out / "survey.json").read_text())
    assert info["options"]["second_order_blaze"] == BLAZE
    truth = np.load(out / info["exposures"][0]["truth"])
    assert float(truth["second_order_blaze"]) == BLAZE
