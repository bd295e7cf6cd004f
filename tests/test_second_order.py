"""The pipeline's removal of the grating's second order (``[instrument] second_order``):
C1(lambda) = C(lambda) - w q(lambda / 2) d lambda / 2 on each fiber's own pixels."""

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from kspec_fluxcal import correct_second_order, open_exposure
from kspec_fluxcal.config import Config, load_config
from kspec_fluxcal.errors import ConfigError
from kspec_fluxcal.second_order import MAX_GAP
from kspec_fluxcal.sim import ISOPLANE_SETUP, GridStars, simulate_exposure

BLUE, RED, NPIX = 3500.0, 8500.0, 401  # 12.5 A pixels: lambda / 2 of every other pixel is one
RATIO, BLAZE = 0.05, 5000.0


def _scalar_ratio(wave, blaze):
    """E_2 / E_1 at lambda / 2 in scalar theory, written out ((x - 1) / (2 - x))^2."""
    mu = wave / 2
    with np.errstate(divide="ignore"):  # at lambda = blaze, below the second order's range
        return ((blaze - mu) / (2 * mu - blaze)) ** 2


@pytest.fixture
def octave(red_file):
    """Factory: a RED file over 3500-8500 A (12.5 A pixels) with the given flux/variance."""

    def make(flux, variance=None, wavelength=None):
        flux = np.asarray(flux, dtype=float)
        variance = np.full(flux.shape, 100.0) if variance is None else variance
        wavelength = np.linspace(BLUE, RED, NPIX) if wavelength is None else wavelength
        return open_exposure(red_file(nfib=flux.shape[0], npix=flux.shape[1], flux=flux,
                                      variance=variance, wavelength=wavelength))

    return make


def test_zero_ratio_is_the_identity(octave):
    ds = octave(np.full((6, NPIX), 1000.0))
    assert correct_second_order(ds, 0.0) is ds
    assert correct_second_order(ds, 0.0, 0.0) is ds


@pytest.mark.parametrize("blaze", [None, BLAZE])
def test_a_flat_spectrum_loses_half_the_ratio_from_twice_the_blue_end(octave, blaze):
    """Flat counts per Angstrom: the second order adds w / 2 of a pixel's counts (half the
    pixel's width at lambda / 2), so C1 = C / (1 + w / 2) needs C = C1 (1 + w / 2)."""
    wave = np.linspace(BLUE, RED, NPIX)
    scale = 1.0 if blaze else RATIO
    w = np.where(wave >= 2 * BLUE, scale * (_scalar_ratio(wave, blaze) if blaze else 1.0), 0.0)
    first = np.full((6, NPIX), 1000.0)
    # the light at lambda / 2 is the first order's own, uncontaminated, below 7000 A
    counts = first + np.where(wave >= 2 * BLUE, w / 2 * 1000.0, 0.0)
    ds = octave(counts)
    out = correct_second_order(ds, scale, blaze or 0.0)
    np.testing.assert_allclose(out["flux"].values, first, rtol=1e-6)
    assert out["good"].values.all()
    assert out.attrs["fcal2nd"] == scale and out.attrs["fcal2blz"] == (blaze or 0.0)
    assert "second-order light removed" in out.attrs["history"][-1]
    assert "fcal2nd" not in ds.attrs  # the input is left alone


def test_variance_gains_the_interpolated_counts_variance(octave):
    """var C1 = var C + (w d lambda / 2)^2 var q(lambda / 2), q linearly interpolated
    (weights squared) between the two pixels around lambda / 2."""
    rng = np.random.default_rng(3)
    wave = np.linspace(BLUE, RED, NPIX)
    variance = rng.uniform(50.0, 500.0, (6, NPIX))
    out = correct_second_order(octave(np.full((6, NPIX), 1000.0), variance), RATIO)
    step = wave[1] - wave[0]
    red = wave >= 2 * BLUE
    pos = (wave[red] / 2 - BLUE) / step  # fractional pixel of lambda / 2
    j = np.floor(pos).astype(int)
    t = pos - j
    nxt = np.minimum(j + 1, NPIX - 1)
    var_q = ((1 - t) ** 2 * variance[:, j] + t**2 * variance[:, nxt]) / step**2
    expected = variance[:, red] + (RATIO * step / 2) ** 2 * var_q
    np.testing.assert_allclose(out["variance"].values[:, red], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["variance"].values[:, ~red],
                                  variance[:, ~red].astype(np.float32))


def test_variance_matches_the_scatter_of_corrected_noise(octave):
    """Many fibers with independent Gaussian noise: the scatter of the corrected counts is
    the propagated variance (within 8 %: 600 fibers)."""
    rng = np.random.default_rng(5)
    nfib, sigma = 600, 30.0
    counts = 1000.0 + sigma * rng.standard_normal((nfib, NPIX))
    out = correct_second_order(octave(counts, np.full((nfib, NPIX), sigma**2)), 0.6)
    wave = out["wavelength"].values
    red = wave >= 2 * BLUE
    scatter = np.var(out["flux"].values[:, red], axis=0)
    predicted = np.mean(out["variance"].values[:, red], axis=0)
    assert np.median(predicted) > 1.05 * sigma**2  # the term is not negligible here
    assert np.median(scatter / predicted) == pytest.approx(1.0, abs=0.08)


def test_short_gaps_are_bridged_and_long_ones_make_pixels_bad(octave):
    """A bad first-order pixel at lambda / 2 is interpolated over from its good neighbours;
    a run longer than MAX_GAP makes the pixels whose lambda / 2 falls in it bad."""
    wave = np.linspace(BLUE, RED, NPIX)
    ramp = 1000.0 + 0.2 * (wave - BLUE)  # linear: interpolation over a gap is exact
    flux = np.tile(ramp, (6, 1))
    flux[1, 100] = np.nan  # one bad pixel (4750 A)
    flux[2, 100:101 + MAX_GAP] = np.nan  # one more than bridged
    out = correct_second_order(octave(flux), RATIO)
    lost_wave = wave[100:101 + MAX_GAP]
    # pixels whose lambda / 2 lies strictly between the gap's good neighbours
    between = (wave / 2 > wave[99]) & (wave / 2 < wave[101 + MAX_GAP])
    good = out["good"].values
    assert good[1][wave >= 2 * BLUE].all()
    assert not good[2][between].any() and np.isnan(out["flux"].values[2][between]).all()
    assert np.isnan(out["variance"].values[2][between]).all()
    assert good[2][(wave >= 2 * BLUE) & ~between].all()
    assert not good[2][np.isin(wave, lost_wave)].any()  # the gap itself stays bad
    red = wave >= 2 * BLUE
    expected = ramp[red] - RATIO * (wave[1] - wave[0]) / 2 * np.interp(wave[red] / 2, wave,
                                                                        ramp) / (wave[1] - wave[0])
    np.testing.assert_allclose(out["flux"].values[1][red], expected, rtol=1e-6)


def test_per_fiber_wavelengths_are_used(octave):
    """Each fiber reads its own counts at its own lambda / 2: a fiber shifted by 5 A with a
    spectrum that follows its own wavelengths is corrected as the unshifted one."""
    wave = np.linspace(BLUE, RED, NPIX)
    rows = wave[None, :] + np.array([0.0, 5.0, -5.0, 0.0, 2.5, 0.0])[:, None]
    first = 1000.0 + 0.3 * (rows - BLUE)
    counts = first + np.where(rows >= 2 * rows[:, :1], RATIO / 2 * (1000.0 + 0.3 * (
        rows / 2 - BLUE)), 0.0)
    out = correct_second_order(octave(counts, wavelength=rows), RATIO)
    np.testing.assert_allclose(out["flux"].values, first, rtol=1e-6)


def test_a_chunked_exposure_stays_lazy_and_gives_the_same(octave, raise_if_computes):
    rng = np.random.default_rng(1)
    ds = octave(1000.0 + 30.0 * rng.standard_normal((6, NPIX)))
    eager = correct_second_order(ds, RATIO, 0.0)
    with raise_if_computes():
        # as open_exposure(chunks=...) chunks: the data, not the coordinates
        chunked = ds.assign({name: ds[name].chunk({"fiber": 2}) for name in ds.data_vars})
        lazy = correct_second_order(chunked, RATIO, 0.0)
    assert lazy["flux"].chunks is not None
    xr.testing.assert_equal(lazy.compute(), eager)  # the data (attrs: a timestamp)


@pytest.fixture(scope="module", params=[{"second_order": RATIO},
                                        {"second_order": 1.0, "second_order_blaze": BLAZE}],
                ids=["constant", "blaze"])
def simulated(request, small_grid, tmp_path_factory):
    """A simulated IsoPlane exposure with second-order light, its truth, and the same file
    with noiseless counts (the first order plus the second, as the truth has them)."""
    sim = simulate_exposure(11, GridStars(small_grid), setup=ISOPLANE_SETUP, n_standards=2,
                            **request.param)
    truth = sim.truth
    root = tmp_path_factory.mktemp("second")
    sim.hdulist.writeto(root / "red.fits")
    first = truth["true_flux_fiber"] * truth["response_fiber"] * truth["aperture"][:, None]
    sim.hdulist[0].data = (first + truth["second_order_counts"]).astype(np.float32)
    sim.hdulist.writeto(root / "noiseless.fits")
    return (open_exposure(root / "red.fits"), open_exposure(root / "noiseless.fits"), truth,
            first, request.param)


def _targets(truth):
    return np.flatnonzero(~np.isin(truth["fiber_kind"], ["sky", "dead"]))


def test_the_simulated_second_order_is_removed(simulated):
    """Noiseless counts: the corrected ones are the first order's to 0.05 % per fiber (median
    over 7000-8500 A; the contamination is 0.2-6 %), although the counts at lambda / 2 are
    seen through their own line spread, twice the second order's in Angstrom."""
    _, noiseless, truth, first, options = simulated
    out = correct_second_order(noiseless, options["second_order"],
                               options.get("second_order_blaze", 0.0))
    wave = noiseless["wavelength"].values
    red = wave >= 2 * ISOPLANE_SETUP.wave_min
    targets = _targets(truth)
    corrected = out["flux"].values[targets][:, red]
    residual = np.median(np.abs(corrected / first[targets][:, red] - 1), axis=1)
    contamination = np.median(truth["second_order_counts"][targets][:, red]
                              / first[targets][:, red], axis=1)
    assert np.all(contamination > 0.001)
    assert np.all(residual < 5e-4), residual
    np.testing.assert_array_equal(out["flux"].values[:, ~red], noiseless["flux"].values[:, ~red])


def test_the_simulated_second_order_is_removed_from_noisy_counts(simulated):
    """The written counts: over 7000-8500 A, the counts removed from each target with S/N >=
    10 at lambda / 2 are the simulator's noiseless second-order counts to 2 % (the counts at
    lambda / 2 carry their noise); no pixel is lost (one-pixel cosmic rays are bridged)."""
    ds, _, truth, _, options = simulated
    out = correct_second_order(ds, options["second_order"],
                               options.get("second_order_blaze", 0.0))
    wave = ds["wavelength"].values
    red = wave >= 2 * ISOPLANE_SETUP.wave_min
    blue = (wave >= ISOPLANE_SETUP.wave_min) & (wave < wave.max() / 2)
    counts, corrected = ds["flux"].values, out["flux"].values
    snr = np.nanmedian(counts[:, blue] / np.sqrt(ds["variance"].values[:, blue]), axis=1)
    bright = [f for f in _targets(truth) if snr[f] >= 10]
    assert len(bright) >= 3
    for f in bright:
        ok = red & ds["good"].values[f]
        removed = np.sum((counts - corrected)[f, ok])
        assert removed == pytest.approx(np.sum(truth["second_order_counts"][f, ok]), rel=0.02)
    np.testing.assert_array_equal(out["good"].values, ds["good"].values)


@pytest.mark.parametrize(("options", "match"), [
    ({"second_order": -0.01}, r"\[instrument\] second_order.*below the minimum"),
    ({"second_order": 1.0}, r"\[instrument\] second_order.*below 1"),
    ({"second_order": 1.5, "second_order_blaze": BLAZE}, r"\[instrument\] second_order"),
    ({"second_order_blaze": -5000.0}, r"\[instrument\] second_order_blaze.*below the minimum"),
    ({"second_order_blaze": BLAZE}, r"\[instrument\] second_order: 0 with second_order_blaze"),
])
def test_bad_options_are_refused_naming_them(options, match):
    with pytest.raises(ConfigError, match=match):
        Config().replace(**{f"instrument__{k}": v for k, v in options.items()})


def test_a_blaze_beyond_twice_the_blue_end_is_refused_naming_it(octave):
    config = load_config(None, instrument__second_order=1.0,
                         instrument__second_order_blaze=7500.0)  # valid alone
    ds = octave(np.full((6, NPIX), 1000.0))
    with pytest.raises(ConfigError, match=r"second_order_blaze.*7000\) A \(twice the "
                                          "exposure's blue end"):
        correct_second_order(ds, config["instrument"]["second_order"],
                             config["instrument"]["second_order_blaze"])


def test_the_product_records_the_correction(command_inputs, tmp_path):
    """FCAL2ND and FCAL2BLZ and a HISTORY line in the product; none when off."""
    from kspec_fluxcal import calibrate_exposure

    inputs = command_inputs
    on = calibrate_exposure(inputs["red"], inputs["catalog"], inputs["cube"],
                            out=tmp_path / "on", instrument__second_order=0.05)
    off = calibrate_exposure(inputs["red"], inputs["catalog"], inputs["cube"],
                             out=tmp_path / "off")
    header_on, header_off = fits.getheader(on.path), fits.getheader(off.path)
    assert header_on["FCAL2ND"] == 0.05 and header_on["FCAL2BLZ"] == 0.0
    assert any("second-order light removed" in h for h in header_on["HISTORY"])
    assert "FCAL2ND" not in header_off and "FCAL2BLZ" not in header_off
    assert not any("second-order" in h for h in header_off["HISTORY"])


def test_the_archive_fallback_removes_it_too(red_file, tmp_path):
    """An exposure calibrated from the archive (no usable standard) is corrected the same
    way as one calibrated with its own standards: its flux is the corrected counts x the
    factor, and the product says so."""
    from kspec_fluxcal.survey.fallback import _from_archive

    wave = np.linspace(BLUE, RED, NPIX)
    counts = np.full((6, NPIX), 1000.0) * np.where(wave >= 2 * BLUE, 1 + RATIO / 2, 1.0)
    path = red_file(nfib=6, npix=NPIX, flux=counts, wavelength=wave)
    reference = (wave, np.full(NPIX, 2.0), np.full(NPIX, 0.01), 5, 0.5)
    config = Config().replace(instrument__second_order=RATIO)
    _from_archive(path, tmp_path / "out.fits", reference, "n401", "hash", 0.0, config)
    with fits.open(tmp_path / "out.fits") as hdul:
        assert hdul[0].header["FCAL2ND"] == RATIO
        flux, factor = hdul[0].data, hdul["FCALFAC"].data
    np.testing.assert_allclose(flux / factor, 1000.0, rtol=1e-5)
