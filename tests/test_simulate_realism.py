"""Instrument realism of the simulator: true LSF vs header, pixel integration, per-fiber
LSF_SCALE, the IsoPlane setup, mixed setups, exposures without standards."""

import json

import numpy as np
import pytest
from astropy.io import fits
from conftest import FlatStar

from kspec_fluxcal.exposure import open_exposure
from kspec_fluxcal.sim import (
    ISOPLANE_SETUP,
    LARGE_SETUP,
    GridStars,
    Setup,
    bosz_wavelength_grid,
    simulate_exposure,
    simulate_survey,
)

#: 1 A pixels, FWHM 2 pixels: the pixel box widens a line's sigma by ~6 %.
LINE_SETUP = Setup("line", pixels=2000, fibers=8, wave_min=5000.0, wave_max=7000.0,
                   fwhm_pixels=(2.0, 2.0, 2.0))
LINE_CENTRE = 6000.0


class _LineStar(FlatStar):
    """A test source: a flat continuum with one unresolved emission line at 6000 A."""

    label = "test:line"

    def __init__(self):
        coarse = bosz_wavelength_grid(10000, 2500.0, 26000.0)
        fine = np.exp(np.arange(np.log(5970.0), np.log(6030.0), 2e-6))
        self.wavelength = np.union1d(coarse[(coarse < 5970) | (coarse > 6030)], fine)

    def spectra(self, params):
        line = 50.0 * np.exp(-0.5 * ((self.wavelength - LINE_CENTRE) / 0.03) ** 2)
        return np.broadcast_to(1e6 * (1.0 + line), (len(params["teff"]), self.wavelength.size))


@pytest.fixture(scope="module")
def stars(small_grid):
    return GridStars(small_grid)


def _line_sigma(truth):
    """Second-moment sigma (A) of the emission line in the standard's truth on its pixels,
    above a straight continuum fitted beside it."""
    f = int(truth["std_fiber"][0])
    wave, flux = truth["fiber_wavelength"][f], truth["true_flux_fiber"][f]
    peak = wave[np.argmax(flux)]
    side = (np.abs(wave - peak) > 8) & (np.abs(wave - peak) < 30)
    continuum = np.polyval(np.polyfit(wave[side], flux[side], 1), wave)
    near = np.abs(wave - peak) < 6  # > 5 sigma of the broadest line here
    excess = (flux - continuum)[near]
    centre = np.sum(wave[near] * excess) / np.sum(excess)
    return np.sqrt(np.sum((wave[near] - centre) ** 2 * excess) / np.sum(excess))


@pytest.fixture(scope="module")
def line_truths(stars):
    def make(**kwargs):
        return simulate_exposure(3, stars, setup=LINE_SETUP, n_standards=1,
                                 standard_source=_LineStar(), **kwargs).truth

    return {"nominal": make(), "scaled": make(lsf_scale=1.3),
            "box": make(pixel_integration=True), "fibers": make(fiber_lsf_scatter=0.05)}


def test_lsf_scale_broadens_lines_by_the_factor(line_truths):
    nominal = _line_sigma(line_truths["nominal"])
    sigma_header = LINE_SETUP.lsf.sigma(LINE_CENTRE)
    assert nominal == pytest.approx(sigma_header, rel=0.01)
    assert _line_sigma(line_truths["scaled"]) / nominal == pytest.approx(1.3, rel=0.01)
    assert float(line_truths["scaled"]["lsf_scale"]) == 1.3
    # The header keeps the nominal FWHM: the LSF error is what the fitter must cope with.
    assert line_truths["scaled"]["setup_key"] == line_truths["nominal"]["setup_key"]
    # The sky lines and tellurics go through the true LSF too: narrower dips, same area.
    band = (line_truths["nominal"]["wavelength"] > 6860) & (line_truths["nominal"]["wavelength"]
                                                           < 6960)
    assert (line_truths["scaled"]["telluric"][band].min()
            > line_truths["nominal"]["telluric"][band].min())


def test_pixel_integration_adds_a_box_in_quadrature(line_truths):
    expected = np.hypot(LINE_SETUP.lsf.sigma(LINE_CENTRE), LINE_SETUP.dispersion / np.sqrt(12))
    assert _line_sigma(line_truths["box"]) == pytest.approx(expected, rel=0.01)
    assert bool(line_truths["box"]["pixel_integration"])


def test_per_fiber_line_spread_is_written_and_applied(stars, line_truths):
    t = line_truths["fibers"]
    scale = t["fiber_lsf_scale"]
    assert 0.01 < np.std(scale) < 0.1 and np.all(scale == np.round(scale, 4))
    f = int(t["std_fiber"][0])
    assert _line_sigma(t) / _line_sigma(line_truths["nominal"]) == pytest.approx(scale[f],
                                                                                   rel=0.01)
    sim = simulate_exposure(3, stars, setup=LINE_SETUP, n_standards=1, fiber_lsf_scatter=0.05)
    hdul = fits.HDUList([h.copy() for h in sim.hdulist])
    np.testing.assert_array_equal(hdul["FIBRES"].data["LSF_SCALE"], sim.truth["fiber_lsf_scale"])
    nominal = simulate_exposure(3, stars, setup=LINE_SETUP, n_standards=1)
    assert "LSF_SCALE" not in nominal.hdulist["FIBRES"].columns.names


def test_per_fiber_truth_equals_the_common_one_for_1d_files(line_truths):
    t = line_truths["nominal"]
    np.testing.assert_array_equal(t["fiber_wavelength"], np.broadcast_to(t["wavelength"],
                                                                          t["true_flux"].shape))
    np.testing.assert_array_equal(t["true_flux_fiber"], t["true_flux"])


def test_exposure_without_standards(stars, tmp_path):
    sim = simulate_exposure(7, stars, setup=Setup("t", pixels=600), n_standards=0)
    t = sim.truth
    assert t["std_fiber"].size == 0 and t["std_snr"].size == 0 and t["std_plx"].size == 0
    assert "standard" not in set(t["fiber_kind"])
    sim.hdulist.writeto(tmp_path / "none.fits")
    assert "C" not in set(open_exposure(tmp_path / "none.fits")["fiber_type"].values)
    with pytest.raises(ValueError, match="n_standards"):
        simulate_exposure(7, stars, setup=Setup("t", pixels=600), n_standards=-1)


def test_isoplane_and_mixed_setups_survey(small_grid, tmp_path):
    small_default = Setup("default-small", pixels=700)
    large = Setup("large-small", pixels=512, fibers=LARGE_SETUP.fibers)
    out = simulate_survey(tmp_path / "mixed", exposures=4, nights=2, seed=3, grid=small_grid,
                          setups=[ISOPLANE_SETUP, small_default, large], n_standards=(0, 3),
                          snr_range=(20.0, 300.0), lsf_scale=(1.0, 1.05),
                          fiber_lsf_scatter=0.02)
    info = json.loads((out / "survey.json").read_text())
    entries = info["exposures"]
    assert [e["setup"] for e in entries] == ["isoplane", "default-small", "large-small",
                                             "isoplane"]
    assert sorted(e["n_standards"] for e in entries)[:1] == [0]
    assert info["options"]["lsf_scale"] == [1.0, 1.05]
    for entry in entries:
        ds = open_exposure(out / entry["path"])
        truth = dict(np.load(out / entry["truth"]))
        assert 1.0 <= entry["lsf_scale"] <= 1.05 and entry["lsf_scale"] == truth["lsf_scale"]
        assert np.all((truth["std_snr"] >= 20) & (truth["std_snr"] <= 300))
        if entry["setup"] != "isoplane":
            continue
        with fits.open(out / entry["path"]) as hdul:
            assert "WAVELA" not in hdul and hdul[0].header["CTYPE1"] == "Wavelength"
        assert entry["wavelength_format"] == "wcs" and entry["medium"] == "air"
        assert ds.sizes == {"fiber": 14, "wavelength": 1340}
        assert np.gradient(ds["wavelength"].values).mean() == pytest.approx(3.734, abs=0.001)
        fwhm = np.polynomial.polynomial.polyval(6000 / 1e4, ds.attrs["lsf_fwhm_coeffs"])
        assert fwhm == pytest.approx(2.7 * 3.734, rel=0.01)
    assert {open_exposure(out / e["path"]).sizes["fiber"] for e in entries} == {14, 30}
    # Water vapour changes from exposure to exposure within a night; airmass up to 2.
    pwv = [e["pwv"] for e in entries if e["night"] == entries[0]["night"]]
    assert len(set(pwv)) == len(pwv)
    assert all(1.0 <= e["airmass"] <= 2.0 for e in entries)


#: 0.25 A pixels, FWHM 8 pixels (2 A): fine enough to measure a profile's FWHM and shape;
#: the [O I] 5577 A sky line and the test star's line at 6000 A.
FINE_SETUP = Setup("fine", pixels=2001, fibers=8, wave_min=5540.0, wave_max=6040.0,
                   fwhm_pixels=(8.0, 8.0, 8.0))


def _profile(wave, flux, centre):
    """FWHM (A, interpolated at half the peak), sigma (A) and kurtosis of a line above a
    straight continuum fitted beside it."""
    side = (np.abs(wave - centre) > 8) & (np.abs(wave - centre) < 20)
    excess = flux - np.polyval(np.polyfit(wave[side], flux[side], 1), wave)
    near = np.abs(wave - centre) < 6
    w, e = wave[near], excess[near]
    mean = np.sum(w * e) / np.sum(e)
    sigma = np.sqrt(np.sum((w - mean) ** 2 * e) / np.sum(e))
    kurtosis = np.sum((w - mean) ** 4 * e) / np.sum(e) / sigma**4
    k = int(np.argmax(e))
    half = 0.5 * e[k]
    left = np.interp(half, e[:k + 1], w[:k + 1])  # rising side
    right = np.interp(half, e[k:][::-1], w[k:][::-1])  # falling side
    return right - left, sigma, kurtosis


@pytest.fixture(scope="module")
def shape_sims(stars):
    def make(**kwargs):
        return simulate_exposure(5, stars, setup=FINE_SETUP, n_standards=1,
                                 standard_source=_LineStar(), **kwargs).truth

    return {"gaussian": make(), "fiber": make(lsf_shape="fiber")}


def test_fiber_line_spread_keeps_the_fwhm_with_a_flat_top(shape_sims, stars):
    """The round fiber's image blurred by the camera: the header's FWHM, a smaller second
    moment (no Gaussian wings) and a flatter top, for the stars and the sky lines alike."""
    fwhm_header = FINE_SETUP.lsf.fwhm(6000.0)
    profiles = {}
    for name, t in shape_sims.items():
        f = int(t["std_fiber"][0])
        sky = int(np.flatnonzero(t["fiber_kind"] == "sky")[0])
        profiles[name] = (_profile(t["fiber_wavelength"][f], t["true_flux_fiber"][f], 6000.0),
                          _profile(t["fiber_wavelength"][sky], t["sky_counts"][sky], 5577.34))
    for star_or_sky in (0, 1):
        gauss = profiles["gaussian"][star_or_sky]
        fiber = profiles["fiber"][star_or_sky]
        assert gauss[0] == pytest.approx(fwhm_header, rel=0.01)
        assert gauss[2] > 2.9  # 3 for a Gaussian, less by the pixels' sampling
        assert fiber[0] == pytest.approx(fwhm_header, rel=0.01)
        assert 0.90 < fiber[1] / gauss[1] < 0.96  # 0.93 for a 1.1-FWHM fiber image
        assert fiber[2] < gauss[2] - 0.1  # a flatter top
    assert str(shape_sims["fiber"]["lsf_shape"]) == "fiber"
    assert "lsf_shape" not in shape_sims["gaussian"]
    # Everything else is the same exposure.
    for key in ("std_teff", "airmass", "pwv", "aperture"):
        np.testing.assert_array_equal(shape_sims["fiber"][key], shape_sims["gaussian"][key])
    with pytest.raises(ValueError, match="lsf_shape"):
        simulate_exposure(5, stars, setup=FINE_SETUP, lsf_shape="lorentz")


def test_fiber_line_spread_reaches_the_tellurics(line_truths, stars):
    """The telluric bands through the fiber's profile: the same equivalent width, another
    shape."""
    fiber = simulate_exposure(3, stars, setup=LINE_SETUP, n_standards=1,
                              standard_source=_LineStar(), lsf_shape="fiber").truth
    wave = fiber["wavelength"]
    band = (wave > 6860) & (wave < 6960)
    nominal = line_truths["nominal"]["telluric"][band]
    assert np.sum(1 - fiber["telluric"][band]) == pytest.approx(np.sum(1 - nominal), rel=0.005)
    assert np.max(np.abs(fiber["telluric"][band] - nominal)) > 0.005


@pytest.mark.parametrize("fmt", ["wavela", "wavela2d", "wcs"])
def test_arc_errors_move_the_light_not_the_written_solution(stars, fmt):
    def make(**kwargs):
        return simulate_exposure(19, stars, setup=LINE_SETUP, n_standards=1,
                                 standard_source=_LineStar(), wavelength_format=fmt, **kwargs)

    exact, off = make(), make(arc_error=0.1)
    t = off.truth
    # The files say the same wavelengths; the light falls elsewhere.
    assert "WAVELA" not in off.hdulist if fmt == "wcs" else np.array_equal(
        off.hdulist["WAVELA"].data, exact.hdulist["WAVELA"].data)
    assert off.hdulist[0].header.tostring() == exact.hdulist[0].header.tostring()
    written = exact.truth["fiber_wavelength"]
    np.testing.assert_allclose(t["fiber_wavelength"] + t["arc_error"], written, rtol=0,
                               atol=1e-9)
    error = t["arc_error"] / LINE_SETUP.dispersion  # pixels
    assert 0.03 < np.sqrt(np.mean(error**2)) < 0.25 and np.ptp(error[:, 0]) > 0.05
    x = np.arange(error.shape[1])
    for row in error:  # a shift and a tilt per fiber
        assert np.ptp(row - np.polyval(np.polyfit(x, row, 1), x)) < 1e-9
    # The line's light at its true wavelength: its centroid moves by the error there.
    f = int(t["std_fiber"][0])
    pixel = int(np.argmax(exact.truth["true_flux_fiber"][f]))  # the line, Doppler shifted
    offset = np.abs(x - pixel) * LINE_SETUP.dispersion
    near, side = offset < 5, (offset > 8) & (offset < 30)

    def centroid(flux):
        """Above a straight continuum beside the line; NaN: the simulated cosmics."""
        ok = side & np.isfinite(flux)
        excess = flux - np.polyval(np.polyfit(x[ok], flux[ok], 1), x)
        ok = near & np.isfinite(flux)
        return np.sum(x[ok] * excess[ok]) / np.sum(excess[ok])

    moved = centroid(t["true_flux_fiber"][f]) - centroid(exact.truth["true_flux_fiber"][f])
    assert abs(error[f, pixel]) > 0.05  # this seed's: 0.06-0.12 pixel
    assert moved == pytest.approx(error[f, pixel], abs=0.01)
    # Drawn from a stream of their own: the same exposure otherwise (the stars' spectra to
    # the spline of their Doppler shift, over a window that the true pixels widen).
    for key in ("std_teff", "std_rv", "aperture", "telluric"):
        np.testing.assert_array_equal(t[key], exact.truth[key])
    np.testing.assert_allclose(t["true_flux"], exact.truth["true_flux"], rtol=1e-3)
    assert "arc_error" not in exact.truth
    with pytest.raises(ValueError, match="arc_error"):
        make(arc_error=-0.1)


def test_survey_passes_and_records_the_line_spread_shape_and_arc_errors(small_grid, tmp_path):
    out = simulate_survey(tmp_path / "s", exposures=1, seed=4, grid=small_grid,
                          setups=[Setup("t", pixels=600)], lsf_shape="fiber", arc_error=0.05)
    info = json.loads((out / "survey.json").read_text())
    assert info["options"]["lsf_shape"] == "fiber" and info["options"]["arc_error"] == 0.05
    truth = np.load(out / info["exposures"][0]["truth"])
    assert str(truth["lsf_shape"]) == "fiber" and np.any(truth["arc_error"] != 0)
