import warnings

import numpy as np
import pytest
import xarray as xr

from kspec_fluxcal.calibration import apply_calibration, combine_vectors
from kspec_fluxcal.config import Config
from kspec_fluxcal.constants import FLUX_UNIT
from kspec_fluxcal.errors import CalibrationError, FluxCalWarning
from kspec_fluxcal.masks import region_mask
from kspec_fluxcal.photometric_fit import fit_photometry

WAVE = np.linspace(3600.0, 8600.0, 1200)


def _truth():
    smooth = 0.05 * (1 + 0.8 * np.exp(-0.5 * ((WAVE - 6000) / 1800) ** 2)) * (WAVE / 6000) ** -1
    tell = np.ones_like(WAVE)
    a_band = (WAVE > 7590) & (WAVE < 7700)
    tell[a_band] = 0.6
    return smooth / tell, smooth


def _stars(n=3, grey=(1.0, 0.93, 1.05), noise=0.01, seed=0, status=None, deviant=None):
    rng = np.random.default_rng(seed)
    cal_true, _ = _truth()
    cal = np.stack([cal_true * grey[s] * (1 + noise * rng.standard_normal(WAVE.size))
                    for s in range(n)])
    if deviant is not None:
        cal[deviant] *= 1 + 0.15 * (WAVE - 6000) / 2500  # a tilted, wrong star
    mask = np.ones_like(cal, bool)
    mask &= region_mask(WAVE, "stellar_lines")[None, :]
    cal[:, ~region_mask(WAVE, "stellar_lines")] *= 1.3  # line cores: garbage, masked
    return xr.Dataset(
        {"cal": (("star", "wavelength"), cal),
         "cal_variance": (("star", "wavelength"), (noise * cal) ** 2),
         "cal_mask": (("star", "wavelength"), mask)},
        coords={"wavelength": WAVE, "fiber": ("star", np.arange(n) * 2),
                "objid": ("star", 100 + np.arange(n)),
                "fiber_name": ("star", [f"s{i}" for i in range(n)]),
                "status": ("star", np.array(status or ["ok"] * n, dtype=object)),
                "scale": ("star", np.ones(n)), "scale_err": ("star", np.full(n, 0.01))},
    )


def test_combination_recovers_shape_level_and_tellurics():
    stars = _stars()
    comb = combine_vectors(stars)
    cal_true, _ = _truth()
    ratio = comb["cal"].values / cal_true
    # Level: the mean grey level of the stars (1.0, 0.93, 1.05 -> 0.993).
    assert np.median(ratio) == pytest.approx(np.mean([1.0, 0.93, 1.05]), rel=0.005)
    shape = ratio / np.median(ratio)
    outside = region_mask(WAVE, "telluric_default")
    assert np.std(shape[outside]) < 0.003  # smoothing beats 1 % pixel noise / sqrt(3)
    # The telluric band is kept in the vector (not smoothed away): Cal is ~1/0.6 higher there.
    band = (WAVE > 7610) & (WAVE < 7680)
    assert np.median(shape[band]) == pytest.approx(1.0, abs=0.01)
    # Line cores are bridged: never zero or NaN, flagged as not measured.
    cores = ~region_mask(WAVE, "stellar_lines")
    assert np.all(np.isfinite(comb["cal"].values)) and np.all(comb["cal"].values > 0)
    assert not comb["cal_mask"].values[cores].any()
    assert np.median(shape[cores]) == pytest.approx(1.0, abs=0.01)
    assert comb.attrs["fcalnstr"] == 3
    # Stars that agree in shape: only smoothed pixel noise is left in FCALRMS.
    assert comb.attrs["fcalrms"] < 0.004


@pytest.mark.filterwarnings("ignore:.*one usable standard star")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_levels_error_is_apart_from_the_pixels_variance(n):
    """FCALLERR: the level's error (the standards' photometry, 1 % each here, and their
    mean aperture, 3 % / sqrt(n)); it is common to every pixel and fiber, so it is not in
    the vector's per-pixel variance, which stays the shape's (pixel noise, smoothed)."""
    comb = combine_vectors(_stars(n=n, grey=(1.0, 0.93, 1.05)[:n]))
    expected = np.sqrt(0.01**2 / n + 0.03**2 / n)
    assert comb.attrs["fcallerr"] == pytest.approx(expected, rel=1e-6)
    assert comb.attrs["level_variance"] == pytest.approx(expected**2, rel=1e-6)
    outside = region_mask(WAVE, "telluric_default") & region_mask(WAVE, "stellar_lines")
    rel = np.sqrt(comb["cal_smooth_variance"] / comb["cal_smooth"] ** 2).values[outside]
    assert np.median(rel) < 0.3 * expected  # 1 % pixel noise, smoothed over ~100 A


def test_fcalrms_measures_disagreement_in_shape():
    stars = _stars()
    tilt = 1 + 0.03 * (WAVE - 6000) / 2500  # +-3 %: within the rejection threshold
    stars["cal"] = stars["cal"].where(stars["star"] != 1, stars["cal"] * tilt)
    comb = combine_vectors(stars)
    assert comb.attrs["fcalnstr"] == 3
    assert comb.attrs["fcalrms"] > 0.006


@pytest.mark.parametrize("method", ["weighted_mean", "median"])
def test_fcalrms_is_the_stars_disagreement_whatever_the_combination(method):
    """With the median combination FCALRMS read 0 (and the grade A) for stars 1-3 % apart:
    a per-pixel median is one of the stars at each pixel, and the block medians of star /
    combination came out at zero where pixel noise dominates."""
    stars = _stars()
    tilt = 1 + 0.03 * (WAVE - 6000) / 2500
    stars["cal"] = stars["cal"].where(stars["star"] != 1, stars["cal"] * tilt)
    agree = combine_vectors(_stars(), method=method)
    apart = combine_vectors(stars, method=method)
    assert apart.attrs["fcalrms"] > 0.006 > 0.004 > agree.attrs["fcalrms"]


def test_unsmoothed_and_median_options():
    stars = _stars()
    raw = combine_vectors(stars, smooth=False)
    med = combine_vectors(stars, method="median", smooth=False)
    cal_true, _ = _truth()
    for comb in (raw, med):
        shape = comb["cal"].values / cal_true
        shape /= np.median(shape)
        assert 0.003 < np.std(shape) < 0.02  # pixel noise remains without smoothing
        # Without smoothing no telluric model either: said, not silent.
        assert np.isnan(comb.attrs["fcalo2"])
        assert comb.attrs["history"][-1].endswith(
            "no telluric model: the bands keep the vector's own absorption (it is fitted "
            "with the smooth response, [combine] smooth = false)")
    with pytest.raises(ValueError, match="weighted_mean"):
        combine_vectors(stars, method="mean")


def test_savgol_smoothing():
    comb = combine_vectors(_stars(), config=Config().replace(smooth_method="savgol"))
    cal_true, _ = _truth()
    shape = comb["cal"].values / cal_true
    outside = region_mask(WAVE, "telluric_default") & region_mask(WAVE, "stellar_lines")
    assert np.std(shape[outside] / np.median(shape)) < 0.005


def test_deviant_star_rejected_with_reason():
    stars = _stars(n=4, grey=(1.0, 0.95, 1.02, 0.98), deviant=2)
    comb = combine_vectors(stars)
    assert comb.attrs["fcalnstr"] == 3
    assert list(comb["used"].values) == [True, True, False, True]
    assert "shape deviates" in comb["star_status"].values[2]


def test_wrong_photometry_star_rejected_by_level():
    stars = _stars(n=3, grey=(1.0, 0.95, 1e4))  # 10 mag off: another star's photometry
    comb = combine_vectors(stars)
    assert not comb["used"].values[2] and "level" in comb["star_status"].values[2]


def test_two_stars_disagreeing_in_level_calibrate_with_a_low_grade():
    """Which of two standards 10 mag apart is wrong cannot be told from the vectors alone
    (the fit's implied throughput usually tells, see test_standards): both are used, with a
    warning and grade C."""
    with pytest.warns(FluxCalWarning, match="disagree in level"):
        comb = combine_vectors(_stars(n=2, grey=(1.0, 1e4)))
    assert comb.attrs["fcalnstr"] == 2 and comb.attrs["fcalqual"] == "C"


def test_of_two_disagreeing_stars_the_implausible_one_goes():
    stars = _stars(n=2, grey=(1.0, 1e4)).assign_coords(
        flags=("star", np.array(["", "implied throughput 1.5e3 outside 0.02-0.6"], object)))
    with pytest.warns(FluxCalWarning, match="one usable standard star"):
        comb = combine_vectors(stars)
    assert list(comb["used"].values) == [True, False]
    assert "implausible implied throughput" in comb["star_status"].values[1]


def test_single_star_passes_through_with_warning():
    stars = _stars(n=3, status=["ok", "S/N 2.0 < 5", "no catalog match"])
    with pytest.warns(FluxCalWarning, match="one usable standard star"):
        comb = combine_vectors(stars)
    assert comb.attrs["fcalnstr"] == 1 and comb.attrs["single_star"] == 1
    assert np.isnan(comb.attrs["fcalrms"])
    cal_true, _ = _truth()
    assert np.median(comb["cal"].values / cal_true) == pytest.approx(1.0, rel=0.01)


def test_zero_stars_error_names_every_reason():
    stars = _stars(n=2, status=["S/N 2.0 < 5", "no catalog match"])
    with pytest.raises(CalibrationError) as info:
        combine_vectors(stars)
    message = str(info.value)
    assert "fiber 0 (s0) objid 100: S/N 2.0 < 5" in message
    assert "fiber 2 (s1) objid 101: no catalog match" in message


def test_apply_calibration_propagates_variance_lazily(raise_if_computes):
    comb = combine_vectors(_stars())
    rng = np.random.default_rng(0)
    flux = rng.uniform(100, 1000, (5, WAVE.size))
    exposure = xr.Dataset(
        {"flux": (("fiber", "wavelength"), flux.astype(np.float32), {"units": "count"}),
         "variance": (("fiber", "wavelength"), flux.astype(np.float32), {"units": "count2"})},
        coords={"wavelength": WAVE, "fiber": np.arange(5)},
        attrs={"expid": "X", "history": ["read"]},
    ).chunk({"fiber": 2})
    with raise_if_computes():
        out = apply_calibration(exposure, comb)
    assert out["flux"].chunks is not None
    out = out.compute()
    cal, cal_var = comb["cal"].values, comb["cal_variance"].values
    np.testing.assert_allclose(out["flux"].values, flux * cal, rtol=1e-6)
    np.testing.assert_allclose(out["variance"].values, flux * cal**2 + flux**2 * cal_var, rtol=1e-5)
    assert out["flux"].attrs["units"] == FLUX_UNIT
    assert out["variance"].attrs["units"] == f"({FLUX_UNIT})**2"
    # the factor's own description stays on the factor, not on the calibrated flux
    assert "description" not in out["flux"].attrs and "description" not in out["variance"].attrs
    assert out["cal_factor"].attrs["description"] == "factor applied to each pixel"
    assert out.attrs["fcalnstr"] == 3
    assert out.attrs["history"][0] == "read" and "flux calibrated" in out.attrs["history"][-1]


def test_apply_carries_the_vector_on_the_exposures_grid():
    """The calibration's vector is carried as it is on the exposure's own grid (no alignment
    then) and aligned to it otherwise: NaN where the calibration has no pixel; the output's
    attrs are its own, not the exposure's."""
    comb = combine_vectors(_stars())
    exposure = xr.Dataset({"flux": (("fiber", "wavelength"), np.full((2, WAVE.size), 2.0)),
                           "variance": (("fiber", "wavelength"), np.ones((2, WAVE.size)))},
                          coords={"wavelength": WAVE}, attrs={"history": ["read"]})
    out = apply_calibration(exposure, comb)
    np.testing.assert_array_equal(out["cal"].values, comb["cal"].values)
    assert out["cal_mask"].dtype == bool and out.attrs is not exposure.attrs
    assert exposure.attrs == {"history": ["read"]}
    shorter = comb.isel(wavelength=slice(3, None))
    out = apply_calibration(exposure, shorter)
    assert np.isnan(out["cal"].values[:3]).all() and np.isnan(out["cal_smooth"].values[:3]).all()
    np.testing.assert_array_equal(out["cal"].values[3:], shorter["cal"].values)
    np.testing.assert_array_equal(out["cal_variance"].values[3:], shorter["cal_variance"].values)


def test_apply_evaluates_the_calibration_on_each_fibers_own_pixels():
    """Fibers shifted from the reference grid get the calibration at their own wavelengths
    (interpolated in ln lambda), nothing beyond the grid; their counts are not resampled."""
    comb = combine_vectors(_stars())
    step = WAVE[1] - WAVE[0]
    shifts = np.array([0.0, 0.75 * step, -1.0 * step, 0.3 * step])[:, None]
    fiber_wave = WAVE[None, :] + shifts
    exposure = xr.Dataset({"flux": (("fiber", "wavelength"), np.full((4, WAVE.size), 2.0)),
                           "variance": (("fiber", "wavelength"), np.ones((4, WAVE.size)))},
                          coords={"wavelength": WAVE,
                                  "fiber_wavelength": (("fiber", "wavelength"), fiber_wave)})
    out = apply_calibration(exposure, comb)
    np.testing.assert_array_equal(out["cal_factor"].values[0], comb["cal"].values)
    expected = np.interp(np.log(fiber_wave[1, :-1]), np.log(WAVE), comb["cal"].values)
    np.testing.assert_allclose(out["cal_factor"].values[1, :-1], expected, rtol=1e-12)
    assert np.isnan(out["cal_factor"].values[1, -1])  # beyond the reference grid
    assert np.isnan(out["cal_factor"].values[2, 0])
    # A fraction of a pixel beyond (each fiber's own solution about the median one): the
    # grid's end value, not a lost pixel.
    assert out["cal_factor"].values[3, -1] == comb["cal"].values[-1]
    assert np.isfinite(out["cal_factor"].values[3]).all()
    np.testing.assert_array_equal(out["flux"].values,
                                  (2.0 * out["cal_factor"].values).astype(np.float32))


def test_fibers_sharing_a_solution_get_what_the_distinct_fibers_get():
    """The factor is computed once per distinct row (wavelengths and line-spread scale):
    fibers repeating others' rows get their values to the bit, in their order, and a fiber
    on the same pixels with another line spread is a row of its own (the telluric bands)."""
    from kspec_fluxcal.calibration import calibration_factor
    from kspec_fluxcal.lsf import LineSpread

    stars = _stars()
    stars.attrs.update(lsf_fwhm_coeffs=list(LineSpread.constant(6.0).coeffs), airmass=1.2)
    comb = combine_vectors(stars)
    assert np.isfinite(comb.attrs["fcalo2"])
    shifted = WAVE + 0.4 * (WAVE[1] - WAVE[0])
    rows = np.stack([WAVE, shifted, WAVE])
    scale = np.array([1.0, 1.0, 1.1])
    order = [0, 1, 0, 2, 1, 0]

    def factor(waves, scales):
        out = calibration_factor(comb, xr.DataArray(waves, dims=("fiber", "wavelength")),
                                 scales)
        return [a.values for a in out]

    distinct = factor(rows, scale)
    together = factor(rows[order], scale[order])
    for values, expected in zip(together, distinct, strict=True):
        np.testing.assert_array_equal(values, expected[order])
    a_band = (WAVE > 7590) & (WAVE < 7700)
    assert not np.array_equal(distinct[0][0][a_band], distinct[0][2][a_band])
    # A Variable (apply_calibration's) gives Variables of the same values.
    variables = calibration_factor(comb, xr.Variable(("fiber", "wavelength"), rows), scale)
    for variable, expected in zip(variables, distinct, strict=True):
        assert isinstance(variable, xr.Variable)
        np.testing.assert_array_equal(variable.values, expected)


def test_a_pixel_beyond_float32_after_calibration_is_no_data():
    """A damaged pixel of 3e38 counts (finite in the float32 file) calibrates to a flux and a
    variance beyond float32's range: NaN (no data, contract section 1) in the product, no
    infinity and no cast warning (package warnings are errors here); its neighbours as
    usual."""
    comb = combine_vectors(_stars())
    comb["cal"] = comb["cal"] * 100.0  # a factor of ~10 flux units per count
    assert 3e38 * comb["cal"].values[40] > np.finfo(np.float32).max
    flux = np.full((2, WAVE.size), 500.0, dtype=np.float32)
    flux[1, 40] = 3e38
    exposure = xr.Dataset({"flux": (("fiber", "wavelength"), flux),
                           "variance": (("fiber", "wavelength"), np.full_like(flux, 500.0))},
                          coords={"wavelength": WAVE})
    out = apply_calibration(exposure, comb)
    for name in ("flux", "variance"):
        np.testing.assert_array_equal(np.isfinite(out[name].values[:, 39:42]),
                                      [[True] * 3, [True, False, True]])


def _stretched(wave, factor):
    """``wave`` with its dispersion times ``factor`` about its middle."""
    mid = 0.5 * (wave[0] + wave[-1])
    return mid + (wave - mid) * factor


def test_a_fiber_with_wider_pixels_gets_the_same_flux_density():
    """Counts per pixel grow with the pixel's width: a fiber whose own solution has a 1 %
    larger dispersion than the reference grid collects 1 % more counts of the same source,
    and its calibrated flux density must be the reference fiber's."""
    comb = combine_vectors(_stars())
    fiber_wave = np.stack([WAVE, _stretched(WAVE, 1.01)])
    counts = np.stack([np.full(WAVE.size, 2.0), np.full(WAVE.size, 2.0 * 1.01)])
    exposure = xr.Dataset({"flux": (("fiber", "wavelength"), counts),
                           "variance": (("fiber", "wavelength"), counts)},
                          coords={"wavelength": WAVE,
                                  "fiber_wavelength": (("fiber", "wavelength"), fiber_wave)})
    out = apply_calibration(exposure, comb)
    # On the reference pixels the factor is the vector itself, to the bit.
    np.testing.assert_array_equal(out["cal_factor"].values[0], comb["cal"].values)
    flux = out["flux"].values.astype(float)
    inner = np.isfinite(flux[1]) & (fiber_wave[1] > WAVE[1]) & (fiber_wave[1] < WAVE[-2])
    reference = np.interp(np.log(fiber_wave[1]), np.log(WAVE), flux[0])
    np.testing.assert_allclose(flux[1][inner], reference[inner], rtol=2e-4)
    # The factor's variance scales with the factor's square.
    ratio = out["cal_factor_variance"].values[1] / out["cal_factor"].values[1] ** 2
    at = np.log(fiber_wave[1])
    expected = (np.interp(at, np.log(WAVE), comb["cal_variance"].values)
                / np.interp(at, np.log(WAVE), comb["cal"].values) ** 2)
    np.testing.assert_allclose(ratio[inner], expected[inner], rtol=1e-6)


def test_standards_on_solutions_of_other_dispersions_agree():
    """A standard whose own pixels are 2 % wider has a vector 2 % lower per count; put per
    reference pixel it agrees with the others (no level conflict, its shape kept)."""
    stars = _stars(noise=0.002)
    star_wave = np.stack([WAVE, _stretched(WAVE, 1.02), WAVE])
    stars = stars.assign_coords(star_wavelength=(("star", "wavelength"), star_wave))
    # Star 1 on wider pixels: its counts per pixel 2 % higher, its vector 2 % lower, and
    # its true vector is evaluated at its own wavelengths.
    cal_true, _ = _truth()
    own = np.interp(star_wave[1], WAVE, cal_true) / 1.02 * 0.93
    stars["cal"] = stars["cal"].where(stars["star"] != 1, own)
    stars["cal_variance"] = stars["cal_variance"].where(stars["star"] != 1, (0.002 * own) ** 2)
    comb = combine_vectors(stars)
    assert comb.attrs["fcalnstr"] == 3
    # The level is that of grey levels 1.0, 0.93, 1.05, as for stars on one grid.
    level = np.median(comb["cal"].values / cal_true)
    assert level == pytest.approx(np.mean([1.0, 0.93, 1.05]), rel=0.002)


def test_median_combination_variance_is_the_medians():
    """The median of 3 has 1.346 times the variance of the mean (2: the mean itself), not
    pi/2 (its large-n value), which overstated the error of K-SPEC's 1-3 standards."""
    from types import SimpleNamespace

    from kspec_fluxcal.calibration import _mean_shape

    for n, factor in ((2, 1.0), (3, 1.346)):
        stack = SimpleNamespace(shapes=np.ones((n, 5)), svar=np.ones((n, 5)),
                                m=np.ones((n, 5), bool))
        _, var = _mean_shape(stack, "median")
        np.testing.assert_allclose(var, factor / n)


def test_savgol_smoothing_variance_is_its_noise_gain():
    """The Savitzky-Golay option's variance matches the scatter of the smoothed noise."""
    from kspec_fluxcal.smoothing import _smooth

    opts = Config().replace(combine__smooth_method="savgol").combine
    rng = np.random.default_rng(3)
    fit = np.ones(WAVE.size, bool)
    runs = [_smooth(WAVE, 1 + 0.01 * rng.standard_normal(WAVE.size), np.full(WAVE.size, 1e-4),
                    fit, opts) for _ in range(300)]
    empirical = np.var([curve for curve, _ in runs], axis=0)[200:-200]
    predicted = runs[0][1]()[200:-200]
    assert np.median(empirical / predicted) == pytest.approx(1.0, abs=0.1)


def test_fit_photometry_recovers_scale_and_reddening():
    rng = np.random.default_rng(1)
    nstar, nband = 50, 10
    ext = np.tile(np.linspace(3.8, 0.35, nband), (nstar, 1))  # A_b/E(B-V), blue to infrared
    model = rng.uniform(-40, -38, (nstar, nband))
    mu, ebv = rng.uniform(50, 55, nstar), rng.uniform(0.0, 0.2, nstar)
    err = np.full((nstar, nband), 0.01)
    obs = model + mu[:, None] + ext * ebv[:, None] + rng.normal(0, 0.01, (nstar, nband))
    # A biased-high prior (dust maps) must not drag the answer far.
    res = fit_photometry(obs, err, model, ext, ebv_prior=1.3 * ebv, ebv_prior_sigma=0.05,
                         error_floor=0.0)
    assert np.std(res["ebv"] - ebv) < 0.01
    assert np.abs(np.mean(res["ebv"] - ebv)) < 0.005
    assert np.std(res["mu"] - mu) < 0.02
    assert np.all(res["n_bands"] == nband)
    off = fit_photometry(obs, err, model, ext, reddening=False)
    assert np.all(off["ebv"] == 0)


def test_ebv_prior_sigma_zero_is_no_prior_for_any_star():
    """``ebv_prior_sigma = 0`` means no prior, also for a star without a catalog extinction
    (which otherwise gets 0 +/- 0.1 mag)."""
    ext = np.linspace(3.8, 0.35, 10)[None, :]
    model = np.zeros((1, 10))
    obs = 12.0 + ext * 0.5
    err = np.full((1, 10), 0.01)
    free = fit_photometry(obs, err, model, ext, ebv_prior=np.array([np.nan]),
                          ebv_prior_sigma=0.0, error_floor=0.0)
    assert free["ebv"][0] == pytest.approx(0.5, abs=1e-6)
    pulled = fit_photometry(obs, err, model, ext, ebv_prior=np.array([np.nan]),
                            ebv_prior_sigma=0.05, error_floor=0.0)
    assert pulled["ebv"][0] < free["ebv"][0] - 1e-4  # the 0 +/- 0.1 prior pulls


@pytest.mark.parametrize("law", ["F99", "CCM89"])
def test_fit_photometry_reddening_beyond_the_linear_regime(law):
    """A_b / E(B-V) falls as a star reddens (its bands' mean wavelengths move red). Taken as
    the constant of E(B-V) = 0.05, a 5800 K star reddened by E(B-V) = 0.4, exactly, came out
    at E(B-V) = 0.392, its scale 0.5 % off and a band residual of 0.028 mag (Gaia G); with
    the coefficients' slope the fit recovers it (within 2 mmag up to E(B-V) = 0.6)."""
    from kspec_fluxcal.constants import BANDS, EBV_REFERENCE, EBV_SLOPE_REFERENCE
    from kspec_fluxcal.photometric_fit import band_extinction
    from kspec_fluxcal.photometry import synthetic_mag
    from kspec_fluxcal.reddening import extinction_per_ebv

    wave = np.geomspace(2500.0, 26000.0, 40000)
    flux = xr.DataArray(1e-2 / wave**5 / np.expm1(1.4388e8 / (wave * 5800.0)),
                        dims="wavelength", coords={"wavelength": wave})
    a_lambda = extinction_per_ebv(wave, law)

    def mags(ebv):
        return synthetic_mag(flux * 10.0 ** (-0.4 * ebv * a_lambda), BANDS).values

    plain = mags(0.0)
    coeff = (mags(EBV_REFERENCE) - plain) / EBV_REFERENCE
    slope = ((mags(EBV_SLOPE_REFERENCE) - plain) / EBV_SLOPE_REFERENCE - coeff) / (
        EBV_SLOPE_REFERENCE - EBV_REFERENCE)
    err = np.full((1, len(BANDS)), 0.01)
    for true in (0.1, 0.4, 0.6):
        observed = (mags(true) + 12.3)[None]
        args = (observed, err, plain[None], coeff[None])
        curved = fit_photometry(*args, ext_slope=slope[None], ebv_prior_sigma=0.0)
        assert curved["ebv"][0] == pytest.approx(true, abs=0.002)
        assert curved["mu"][0] == pytest.approx(12.3, abs=0.003)
        assert np.nanmax(np.abs(curved["resid"])) < 0.003
        model = plain + curved["mu"][0] + band_extinction(curved["ebv"], coeff[None],
                                                          slope[None])[0]
        np.testing.assert_allclose(model, observed[0], atol=0.003)
        if true >= 0.4:
            linear = fit_photometry(*args, ebv_prior_sigma=0.0)
            assert np.nanmax(np.abs(linear["resid"])) > 0.006
    assert np.all(slope[:3] < 0) and np.all(np.isfinite(slope))  # blue bands: falling


def test_fit_photometry_drops_outlier_band_and_counts_valid():
    ext = np.array([[3.5, 3.0, 2.5, 2.0, 1.5]])
    model = np.zeros((1, 5))
    obs = 10 + ext * 0.05
    obs[0, 2] += 0.5  # a bad band
    err = np.full((1, 5), 0.01)
    res = fit_photometry(obs, err, model, ext, error_floor=0.0)
    assert res["dropped"][0, 2] and not res["used"][0, 2]
    assert res["n_bands"][0] == 4 and res["ebv"][0] == pytest.approx(0.05, abs=1e-3)
    nan_obs = obs.copy()
    nan_obs[0, :4] = np.nan
    assert fit_photometry(nan_obs, err, model, ext)["n_bands"][0] == 1


def test_fit_photometry_stars_fitted_together_get_what_each_gets_alone():
    """Each star's fit is its own row: fitted with others (one dropping two bad bands, so the
    drop loop runs on after the others have settled; one without a catalog E(B-V); one with
    too few bands), a star's results are those of a call of its own, bit for bit
    (the final model fits its stars' photometry in one call)."""
    rng = np.random.default_rng(3)
    nstar, nband = 4, 9
    ext = np.tile(np.linspace(3.8, 0.35, nband), (nstar, 1)) + rng.normal(0, 0.05, (nstar, nband))
    slope = -0.1 * ext
    model = rng.uniform(-40, -38, (nstar, nband))
    obs = model + 52.0 + ext * 0.1 + rng.normal(0, 0.01, (nstar, nband))
    obs[0, [1, 6]] += [0.6, -0.4]  # two bad bands: two passes of the drop loop
    obs[2, 3:] = np.nan  # three bands only
    err = np.full((nstar, nband), 0.01)
    prior = np.array([0.12, np.nan, 0.08, 0.1])
    kw = {"ext_slope": slope, "ebv_prior": prior, "min_bands": 2}
    together = fit_photometry(obs, err, model, ext, **kw)
    assert together["dropped"][0].sum() == 2 and not together["dropped"][1:].any()
    for s in range(nstar):
        alone = fit_photometry(obs[s:s + 1], err[s:s + 1], model[s:s + 1], ext[s:s + 1],
                               ext_slope=slope[s:s + 1], ebv_prior=prior[s:s + 1],
                               min_bands=2)
        for key, value in alone.items():
            np.testing.assert_array_equal(together[key][s:s + 1], value, err_msg=key)


def test_warp_basis_has_no_constant_and_its_kept_mean_is_not_the_callers():
    """The warp's shapes have zero mean over their range (the flux scale stays the fit's own
    parameter); the means removed are kept per range, and a caller changing a basis it was
    given changes nothing for the next caller."""
    from kspec_fluxcal.photometric_fit import warp_basis

    over = np.linspace(3700.0, 9000.0, 200)
    basis = warp_basis(over, (3700, 9000.0), 3)
    np.testing.assert_allclose(basis.mean(axis=0), 0.0, atol=1e-15)
    assert not np.allclose(basis, 0.0)
    first = warp_basis([4000.0, 6000.0], (3700.0, 9000.0), 3)
    kept = first.copy()
    first += 1.0
    np.testing.assert_array_equal(warp_basis([4000.0, 6000.0], (3700.0, 9000.0), 3), kept)
    assert warp_basis([5000.0], (3700.0, 9000.0), 0).shape == (1, 0)


def test_water_vapour_followed_over_a_night():
    """Exposures of one night with different water columns and airmasses: the fitted columns
    (FCALH2O, FCALO2) follow the ones the standards' vectors were made with, the telluric
    truth being the high-resolution sum (not the fitter's boxes), with 0.5 % pixel noise."""
    from kspec_fluxcal.constants import FWHM_PER_SIGMA
    from kspec_fluxcal.lsf import LineSpread
    from kspec_fluxcal.telluric import optical_depths, sample_transmission

    hr, tau = optical_depths()
    fwhm = 6.0
    airmass = np.array([1.05, 1.2, 1.4, 1.7, 2.1])
    water = airmass * np.array([0.8, 2.5, 1.6, 3.5, 1.1])  # airmass x precipitable water
    fitted = []
    for k, (x, w) in enumerate(zip(airmass, water, strict=True)):
        stars = _stars(noise=0.005, seed=k)
        _, smooth = _truth()
        trans = sample_transmission(hr, np.exp(-x * tau[0] - w * tau[1]), WAVE,
                                    fwhm / FWHM_PER_SIGMA)
        grey = stars["cal"].values / _truth()[0]  # each star's grey level and noise
        stars["cal"] = (("star", "wavelength"), grey * smooth / trans)
        stars["cal_variance"] = (0.005 * stars["cal"]) ** 2
        stars.attrs.update(lsf_fwhm_coeffs=list(LineSpread.constant(fwhm).coeffs), airmass=x)
        comb = combine_vectors(stars)
        fitted.append((comb.attrs["fcalo2"], comb.attrs["fcalh2o"], comb.attrs["fcalh2o_err"]))
    o2, h2o, h2o_err = np.array(fitted).T
    np.testing.assert_allclose(o2, airmass, rtol=0.03)
    np.testing.assert_allclose(h2o, water, rtol=0.05)
    assert np.corrcoef(h2o, water)[0, 1] > 0.99
    assert np.all(h2o_err > 0) and np.all(h2o_err < 0.1 * water)


def test_pixels_beyond_the_telluric_line_list_are_named(tmp_path):
    """A setup reaching 10000 A, beyond the line list's last line (~9190 A): the exposure is
    calibrated, and a warning (a HISTORY note of the product) says that those pixels have no
    telluric model; the same stars cut at 8600 A say nothing."""
    from kspec_fluxcal.lsf import LineSpread
    from kspec_fluxcal.telluric import telluric_lines, uncovered_red

    last = telluric_lines()["wavelength"][-1]
    red = np.linspace(3600.0, 10000.0, 1500)
    base = _stars()
    stars = base.drop_vars(["cal", "cal_variance", "cal_mask", "wavelength"]).assign(
        {name: (("star", "wavelength"), np.stack([np.interp(red, WAVE, row) for row in
                                                  base[name].values]))
         for name in ("cal", "cal_variance")}).assign_coords(wavelength=red)
    stars["cal_mask"] = xr.ones_like(stars["cal"], dtype=bool)  # the edge values beyond
    stars.attrs.update(lsf_fwhm_coeffs=list(LineSpread.constant(6.0).coeffs), airmass=1.2)
    expected = f"ends at {last:.0f} A: the pixels at {last:.0f}-10000 A have no telluric " \
        "correction \\(water absorbs strongly"
    with pytest.warns(FluxCalWarning, match=expected):
        comb = combine_vectors(stars)
    assert np.isfinite(comb.attrs["fcalo2"])  # the bands it covers are still modelled
    # A list of the A band alone, on pixels short of the water band: no band named.
    short = tmp_path / "a_band.csv"
    short.write_text("wavelength,species,ew,hwhm\n7620.0,O2,1.0,0.025\n")
    message = uncovered_red(np.linspace(3600.0, 8500.0, 50), short)
    assert "7620-8500 A have no telluric correction;" in message
    assert uncovered_red(np.linspace(3600.0, 7700.0, 50), short) is None
    blue = stars.sel(wavelength=slice(None, 8600.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FluxCalWarning)
        assert np.isfinite(combine_vectors(blue).attrs["fcalo2"])


def test_standards_no_template_fits_calibrate_with_grade_d():
    """Every standard rejected for its model error alone: the exposure is calibrated from them
    with grade D and a warning, unless the mismatch is beyond twice the limit."""
    reason = "model error 14.0% > 10% (not a star like the templates?)"
    stars = _stars(status=[reason] * 3).assign_coords(model_error=("star", np.full(3, 0.14)))
    with pytest.warns(FluxCalWarning, match="no template fits well"):
        comb = combine_vectors(stars)
    assert comb.attrs["fcalqual"] == "D" and comb.attrs["fcalnstr"] == 3
    cal_true, _ = _truth()
    shape = comb["cal"].values / cal_true
    assert np.std(shape[region_mask(WAVE, "telluric_default")] / np.median(shape)) < 0.005
    hopeless = stars.assign_coords(model_error=("star", np.full(3, 0.35)))
    with pytest.raises(CalibrationError, match="no usable standard"):
        combine_vectors(hopeless)
    mixed = stars.assign_coords(status=("star", np.array(["ok", reason, reason], dtype=object)))
    with pytest.warns(FluxCalWarning, match="one usable standard"):
        assert combine_vectors(mixed).attrs["fcalnstr"] == 1  # a star that fits is preferred


def _smooth_fit(values, variance, curvature):
    from kspec_fluxcal.smoothing import _smooth

    opts = Config().replace(smooth_curvature=curvature).combine
    return _smooth(WAVE, values, variance, np.ones(WAVE.size, bool), opts)[0]


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_curvature_prior_bridges_weak_data_and_follows_strong_data(seed):
    """A response with a 5 % dip (sigma 100 A) measured at S/N 100 per pixel, except a
    300 A stretch of line-like template errors (3 % low, with the 30 % per-pixel error the
    line weights give deep lines): with the prior the curve bridges the stretch within 1 %
    and still follows the dip; without it, it follows the biased stretch."""
    rng = np.random.default_rng(seed)
    truth = _truth()[1] * (1 - 0.05 * np.exp(-0.5 * ((WAVE - 5600) / 100) ** 2))
    weak = (WAVE > 4550) & (WAVE < 4850)
    values = truth * (1 + 0.01 * rng.standard_normal(WAVE.size) - 0.03 * weak)
    variance = (np.where(weak, 0.3, 0.01) * truth) ** 2
    with_prior = _smooth_fit(values, variance, 0.02) / truth - 1
    without = _smooth_fit(values, variance, 0.0) / truth - 1
    assert np.max(np.abs(with_prior[weak])) < 0.01
    assert np.max(np.abs(without[weak])) > 0.025
    dip = np.abs(WAVE - 5600) < 150
    assert np.max(np.abs(with_prior[dip])) < 0.008
    assert np.max(np.abs(with_prior[dip])) < np.max(np.abs(without[dip])) + 0.001


def test_smooth_curve_solved_directly_equals_the_pseudo_inverse_and_falls_back_to_it():
    """The response's normal equations are solved directly (issue 14: a third of the
    pseudo-inverse's time); the curve is the one the pseudo-inverse gives, and a singular
    system (which a direct solve refuses) still gets the minimum-norm solution."""
    from kspec_fluxcal.smoothing import _solve

    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 12))
    normal, rhs = a.T @ a + 1e-6 * np.eye(12), rng.standard_normal(12)
    np.testing.assert_allclose(_solve(normal, rhs), np.linalg.pinv(normal) @ rhs, rtol=1e-9)
    singular = np.zeros((4, 4))
    singular[:2, :2] = [[2.0, 1.0], [1.0, 2.0]]
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.solve(singular, np.ones(4))
    np.testing.assert_allclose(_solve(singular, np.ones(4)),
                               np.linalg.pinv(singular) @ np.ones(4), atol=1e-12)


def test_curvature_prior_leaves_straight_lines_alone_across_knot_gaps():
    """The prior's second differences are divided differences at the coefficients' Greville
    abscissae: zero for a straight line, also at the ends (repeated knots) and across a
    band without knots, where plain differences of the coefficients are not; equal to the
    plain ones between evenly spaced knots."""
    from kspec_fluxcal._bspline import design_matrix
    from kspec_fluxcal.smoothing import _second_differences

    x = np.linspace(0.0, 1.0, 500)
    inner = np.linspace(0.0, 1.0, 21)
    gap = inner[(inner < 0.4) | (inner > 0.6)]
    for interior in (inner, gap):
        knots = np.concatenate([[0.0] * 3, interior, [1.0] * 3])
        basis = design_matrix(x, knots, 3).toarray()
        coef = np.linalg.lstsq(basis, 2.0 + 3.0 * x, rcond=None)[0]
        assert np.abs(_second_differences(knots, 0.05) @ coef).max() < 1e-9
        assert np.abs(np.diff(coef, 2)).max() > 0.01
    even = _second_differences(np.concatenate([[0.0] * 3, inner, [1.0] * 3]), 0.05)
    plain = np.diff(np.eye(even.shape[1]), n=2, axis=0)
    assert np.allclose(even[3:-3], plain[3:-3])


def test_response_knots_skip_excluded_pixels_and_are_kept_per_mask():
    """The response's knots: evenly spaced in ln lambda from end to end (ends repeated),
    none where knots are excluded; the same pixels and mask again give the kept arrays
    (the three fits of an exposure), another mask its own knots."""
    from kspec_fluxcal.smoothing import _knots

    excluded = (WAVE > 6800.0) & (WAVE < 7000.0)
    x, knots, step = _knots(WAVE, 100.0, excluded)
    np.testing.assert_array_equal(x, np.log(WAVE))
    assert step == 100.0 / np.median(WAVE)
    assert np.all(knots[:4] == x[0]) and np.all(knots[-4:] == x[-1])
    inner = knots[3:-3]
    assert not np.any((inner > np.log(6800.0)) & (inner < np.log(7000.0)))
    spacing = np.diff(inner[inner < np.log(6800.0)])
    np.testing.assert_allclose(spacing, spacing[0], rtol=1e-9)
    assert spacing[0] <= step < 1.1 * spacing[0]
    assert _knots(WAVE.copy(), 100.0, excluded.copy())[1] is knots
    everywhere = _knots(WAVE, 100.0, None)[1]
    assert everywhere.size > knots.size and np.isin(knots, everywhere).all()


def test_median_of_all_values_is_numpys():
    """The combination's median of all values (the stars' deviations, FCALRMS) is
    np.nanmedian's to the bit: odd and even counts, ties, NaN and infinities, none left."""
    from kspec_fluxcal.calibration import _nanmedian

    rng = np.random.default_rng(6)
    for size in (1, 2, 7, 100, 4096):
        values = np.round(rng.normal(size=(3, size)), 2)
        values[rng.random(values.shape) < 0.2] = np.nan
        values[0, 0] = np.inf
        assert _nanmedian(values, axis=None) == np.nanmedian(values)
    assert np.isnan(_nanmedian(np.full((2, 5), np.nan), axis=None))
