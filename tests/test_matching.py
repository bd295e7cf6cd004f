import numpy as np
import pytest
import xarray as xr

from kspec_fluxcal.constants import SPEED_OF_LIGHT_KMS
from kspec_fluxcal.continuum import fit_continuum, normalize_continuum
from kspec_fluxcal.fit.matching import score_star, score_templates
from kspec_fluxcal.fit.refinement import quadratic_minimum
from kspec_fluxcal.fit.shifts import shift_spectra
from kspec_fluxcal.fit.velocity import cross_correlate_rv, refine_rv

WAVE = np.linspace(3800.0, 8200.0, 1600)
SIGMA_PIX = 1.0  # line sigma in pixels (FWHM ~2.4 pixels, like K-SPEC)


def _lines(depths, centres, wave=WAVE, rv=0.0):
    step = wave[1] - wave[0]
    z = 1 + rv / SPEED_OF_LIGHT_KMS
    spec = np.ones_like(wave)
    for d, c in zip(depths, centres, strict=True):
        spec -= d * np.exp(-0.5 * ((wave - c * z) / (SIGMA_PIX * step)) ** 2)
    return spec


RNG = np.random.default_rng(3)
CENTRES = np.sort(RNG.uniform(3900, 8100, 120))
BASE_DEPTHS = RNG.uniform(0.05, 0.6, 120)


def _templates(n=9):
    """A family of templates whose line depths scale smoothly with a parameter."""
    scales = np.linspace(0.6, 1.4, n)
    return scales, np.stack([_lines(BASE_DEPTHS * s, CENTRES) for s in scales])


def test_continuum_recovers_smooth_shape_under_lines():
    shape = 1.0 + 0.5 * np.sin((WAVE - 3800) / 1500.0)
    flux = shape * _lines(BASE_DEPTHS, CENTRES)
    cont = fit_continuum(flux[None], WAVE)[0]
    line_free = _lines(BASE_DEPTHS, CENTRES) > 0.999
    np.testing.assert_allclose(cont[line_free], shape[line_free], rtol=0.01)


def test_continuum_ignores_masked_and_nonpositive_pixels():
    flux = np.ones((2, WAVE.size)) * 5.0
    flux[0, 100:200] = -3.0  # non-positive: never used, never divided by
    mask = np.ones(WAVE.size, bool)
    mask[500:600] = False
    flux[1, 500:600] = 100.0  # masked garbage
    cont = fit_continuum(flux, WAVE, mask)
    np.testing.assert_allclose(cont, 5.0, rtol=1e-6)


@pytest.mark.parametrize("method", ["bspline", "polynomial"])
def test_continuum_normal_system_is_both_products(method):
    """One product of the side-by-side system with weights then weighted flux gives the
    normal matrices' upper triangles and the right-hand sides bit for bit (1, 3 and 5 rows:
    one by one and at once)."""
    from kspec_fluxcal.continuum import _basis, _key, _normal_system, sparse_products

    wave = np.sort(RNG.uniform(3800.0, 8200.0, 700))
    key = (wave.size, _key(wave), method, 11 if method == "bspline" else 0,
           3 if method == "bspline" else 8)
    _, outer_t, basis_t, _ = _basis(*key)
    system = _normal_system(*key)
    for rows in (1, 3, 5):
        weights = (RNG.random((rows, wave.size)) < 0.8).astype(float)
        weighted = weights * RNG.lognormal(size=(rows, wave.size))
        sums = sparse_products(system, np.concatenate([weights, weighted], axis=1))
        nn = outer_t.shape[0]
        expected = [np.stack([outer_t @ w for w in weights]),
                    np.stack([basis_t @ w for w in weighted])]
        assert np.array_equal(sums[:, :nn], expected[0])
        assert np.array_equal(sums[:, nn:], expected[1])


@pytest.mark.parametrize("method", ["bspline", "polynomial", "running_median"])
def test_normalize_methods_and_laziness(method, raise_if_computes):
    flux = xr.DataArray(np.stack([3.0 * _lines(BASE_DEPTHS, CENTRES)] * 4),
                        dims=("star", "wavelength"), coords={"wavelength": WAVE})
    with raise_if_computes():
        norm, cont = normalize_continuum(flux.chunk({"star": 2}), method=method)
    assert norm.chunks is not None
    norm = norm.compute()
    assert np.nanmedian(norm.values) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("rv", [-187.0, -33.3, 0.0, 41.5, 260.0])
def test_rv_cross_correlation_and_refinement(rv):
    template = _lines(BASE_DEPTHS, CENTRES)
    obs = _lines(BASE_DEPTHS, CENTRES, rv=rv)
    noise = 0.01
    obs = obs + np.random.default_rng(1).normal(0, noise, WAVE.size)
    weight = np.full(WAVE.size, 1 / noise**2)
    rv0, peak = cross_correlate_rv(obs[None], weight[None], template[None], WAVE, rv_max=500)
    pix_kms = SPEED_OF_LIGHT_KMS * np.log(WAVE[1] / WAVE[0])
    assert abs(rv0[0] - rv) < 0.3 * pix_kms  # sub-pixel from the cross-correlation alone
    assert peak[0] > 0.8
    rv1, err = refine_rv(obs[None], weight[None], template[None], WAVE, rv0)
    assert abs(rv1[0] - rv) < 3.0  # km/s; pixels are ~160 km/s here
    assert 0 < err[0] < 3.0



def test_rv_cross_correlation_of_several_stars_at_once():
    # Each star correlated with its own template, as alone.
    rvs = np.array([-120.0, 15.0, 230.0])
    template = _lines(BASE_DEPTHS, CENTRES)
    obs = np.stack([_lines(BASE_DEPTHS, CENTRES, rv=v) for v in rvs])
    weight = np.ones_like(obs)
    weight[1, 300:340] = 0  # a masked region of one star only
    templates = np.stack([template] * rvs.size)
    together, peaks = cross_correlate_rv(obs, weight, templates, WAVE, rv_max=500)
    alone = [cross_correlate_rv(obs[[s]], weight[[s]], templates[[s]], WAVE, rv_max=500)[0][0]
             for s in range(rvs.size)]
    np.testing.assert_array_equal(together, alone)
    pix_kms = SPEED_OF_LIGHT_KMS * np.log(WAVE[1] / WAVE[0])
    assert np.all(np.abs(together - rvs) < 0.3 * pix_kms) and np.all(peaks > 0.8)


def test_rv_cross_correlation_of_stars_on_their_own_pixels():
    """Stars on one wavelength solution (interpolated once) or on their own: each star's
    velocity is the one it gets alone, to the last bit; the shared row is found only when
    every row is equal."""
    from kspec_fluxcal.fit.velocity import _shared_row

    rvs = np.array([-60.0, 40.0, 110.0])
    obs = np.stack([_lines(BASE_DEPTHS, CENTRES, rv=v) for v in rvs])
    weight = np.ones_like(obs)
    weight[2, 500:530] = 0
    templates = np.stack([_lines(BASE_DEPTHS, CENTRES)] * rvs.size)
    shared = np.stack([WAVE + 0.3] * rvs.size)
    assert _shared_row(shared).shape == WAVE.shape
    own = shared.copy()
    own[1] += 0.2
    assert _shared_row(own).shape == own.shape
    for star_wave in (shared, own):
        together = cross_correlate_rv(obs, weight, templates, WAVE, star_wavelength=star_wave)
        for s in range(rvs.size):
            alone = cross_correlate_rv(obs[[s]], weight[[s]], templates[[s]], WAVE,
                                       star_wavelength=star_wave[[s]])
            assert together[0][s] == alone[0][0] and together[1][s] == alone[1][0]
    # the shared solution is each star's own: the same velocities as on their rows
    np.testing.assert_array_equal(
        cross_correlate_rv(obs, weight, templates, WAVE, star_wavelength=shared)[0],
        cross_correlate_rv(obs, weight, templates, WAVE, star_wavelength=WAVE + 0.3)[0])


def test_rv_cross_correlation_of_stars_on_the_templates_pixels_to_the_last_bit(monkeypatch):
    """Stars on the templates' own pixels share the templates' taps on the grid and their
    data mask: the velocities and peaks of each star's pixels interpolated on their own."""
    from kspec_fluxcal.fit import velocity

    rvs = np.array([-60.0, 40.0])
    obs = np.stack([_lines(BASE_DEPTHS, CENTRES, rv=v) for v in rvs])
    weight = np.ones_like(obs)
    weight[1, 500:530] = 0
    weight[0, :7] = 0
    templates = np.stack([_lines(BASE_DEPTHS, CENTRES)] * rvs.size)
    rows = np.stack([WAVE] * rvs.size)
    shared = cross_correlate_rv(obs, weight, templates, WAVE, star_wavelength=rows)
    assert np.array_equal(cross_correlate_rv(obs, weight, templates, WAVE)[0], shared[0])
    monkeypatch.setattr(velocity, "_shared_row", lambda r: np.asarray(r))  # rows kept
    own = cross_correlate_rv(obs, weight, templates, WAVE, star_wavelength=rows)
    for a, b in zip(shared, own, strict=True):
        assert np.array_equal(a, b)
    assert np.all(np.abs(shared[0] - rvs) < 10.0)


def test_rv_refinement_of_stars_on_shared_pixels_is_each_stars_own():
    """Stars on one wavelength solution are fitted in one call: the velocities and errors
    are those of each star refined alone, to the last bit; rows grouped by equal values."""
    from kspec_fluxcal.fit.velocity import _same_rows

    rvs = np.array([20.0, 28.0, 35.0])
    rng = np.random.default_rng(3)
    obs = np.stack([_lines(BASE_DEPTHS, CENTRES, rv=v) for v in rvs])
    obs += rng.normal(0, 0.01, obs.shape)
    weight = np.full(obs.shape, 1e4)
    weight[0, 200:230] = 0
    templates = np.stack([_lines(BASE_DEPTHS, CENTRES)] * rvs.size)
    star_wave = np.stack([WAVE, WAVE + 0.05, WAVE])  # stars 0 and 2 share their pixels
    assert _same_rows(star_wave) == [[0, 2], [1]]
    assert _same_rows(np.broadcast_to(WAVE, (3, WAVE.size))) == [[0, 1, 2]]
    assert _same_rows(np.array([[0.0, 1.0], [-0.0, 1.0]])) == [[0], [1]]  # bits, not ==
    rv0 = np.full(rvs.size, 30.0)  # one margin for the stars together and alone
    together = refine_rv(obs, weight, templates, WAVE, rv0, knot_spacing=400.0,
                         star_wavelength=star_wave)
    for s in range(rvs.size):
        alone = refine_rv(obs[[s]], weight[[s]], templates[[s]], WAVE, rv0[[s]],
                          knot_spacing=400.0, star_wavelength=star_wave[[s]])
        assert together[0][s] == alone[0][0] and together[1][s] == alone[1][0]


def test_rv_refinement_pixel_in_kms():
    """The velocity scan's half width: the median pixel in km/s, kept by the pixels' bytes."""
    from kspec_fluxcal.constants import SPEED_OF_LIGHT_KMS
    from kspec_fluxcal.fit.velocity import _pixel_kms

    wave = np.geomspace(4000.0, 8000.0, 500) + np.linspace(0.0, 1.0, 500) ** 2
    want = SPEED_OF_LIGHT_KMS * np.median(np.diff(np.log(wave)))
    assert _pixel_kms(wave.tobytes()) == want == _pixel_kms(wave.copy().tobytes())
    assert _pixel_kms(WAVE.tobytes()) == SPEED_OF_LIGHT_KMS * np.median(np.diff(np.log(WAVE)))


def test_shift_matches_analytic_shift():
    rv = 57.0
    shifted = shift_spectra(_lines(BASE_DEPTHS, CENTRES), WAVE, rv)
    expected = _lines(BASE_DEPTHS, CENTRES, rv=rv)
    inner = slice(20, -20)
    # Lines of sigma = 1 pixel are not fully band-limited: ~1% of the depth is the limit.
    np.testing.assert_allclose(shifted[inner], expected[inner], atol=1e-2)
    assert np.sqrt(np.mean((shifted - expected)[inner] ** 2)) < 2e-3


def test_scores_pick_the_right_template_and_are_lazy(raise_if_computes):
    scales, templates = _templates()
    truth = 5
    rv = np.array([30.0, -80.0])
    rng = np.random.default_rng(0)
    obs = np.stack([_lines(BASE_DEPTHS * scales[truth], CENTRES, rv=v) for v in rv])
    obs += rng.normal(0, 0.01, obs.shape)
    ivar = np.full(obs.shape, 1e4)
    ivar[:, 700:720] = 0  # a masked region
    args = (xr.DataArray(obs, dims=("star", "wavelength"), coords={"wavelength": WAVE}),
            xr.DataArray(ivar, dims=("star", "wavelength"), coords={"wavelength": WAVE}),
            xr.DataArray(templates, dims=("template", "wavelength"), coords={"wavelength": WAVE}),
            xr.DataArray(rv, dims="star"))
    eager = score_templates(*args)
    assert eager.dims == ("star", "template")
    assert list(eager.argmin("template").values) == [truth, truth]
    npix = (ivar[0] > 0).sum()
    assert eager.values[0, truth] / npix == pytest.approx(1.0, abs=0.15)  # chi2/dof of the truth
    lazy_templates = args[2].chunk({"template": 3})
    with raise_if_computes():
        lazy = score_templates(args[0], args[1], lazy_templates, args[3], knot_spacing=400.0)
    assert lazy.chunks is not None
    assert list(lazy.compute().argmin("template").values) == [truth, truth]
    # templates on other pixels than the stars' are refused, not silently compared
    shifted = args[2].assign_coords(wavelength=WAVE + 0.5)
    with pytest.raises(ValueError, match="wavelength"):
        score_templates(args[0], args[1], shifted, args[3])


def test_scores_are_float64_even_for_float32_templates():
    scales, templates = _templates()
    obs = templates[4] + np.random.default_rng(2).normal(0, 0.003, WAVE.size)
    s32 = score_star(obs, np.full(WAVE.size, 1 / 0.003**2), templates.astype(np.float32), 0.0, WAVE)
    s64 = score_star(obs, np.full(WAVE.size, 1 / 0.003**2), templates, 0.0, WAVE)
    assert s32.dtype == np.float64
    assert np.argmin(s32) == np.argmin(s64) == 4


def test_fast_scores_of_float32_templates_are_summed_in_float64():
    """Issue 14: the exposure's templates are kept in float32 and scored as they are (no
    float64 copy of the candidates), in blocks converted to float64: the same chi^2 as the
    float64 templates at S/N 1000, where float32 sums err by tens (the difference of two sums
    ~1e9)."""
    from kspec_fluxcal.fit.matching import _SCORE_BLOCK, ScoringTemplates, score_rest_frame

    _, templates = _templates(2 * _SCORE_BLOCK + 5)  # blocks, one of them partial
    t32 = templates.astype(np.float32)
    prepared = ScoringTemplates(t32)
    assert prepared.tmpl.dtype == np.float32 and np.shares_memory(prepared.tmpl, t32)
    t32[3] = np.nan  # a missing grid point
    rng = np.random.default_rng(4)
    flux = np.stack([t32[k].astype(np.float64) + rng.normal(0, 1e-3, WAVE.size) for k in (10, 40)])
    rest = (flux, np.full(flux.shape, 1e6))
    got = score_rest_frame(rest, t32)
    want = score_rest_frame(rest, t32.astype(np.float64))
    assert got.dtype == np.float64 and np.isnan(got[:, 3]).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert list(np.nanargmin(got, axis=1)) == [10, 40]
    assert np.nanmin(got) == pytest.approx(WAVE.size, rel=0.1)  # chi2 of the truth ~ P
    # Star by star: each star's scores are the ones it gets scored alone, to the last bit.
    for s in range(flux.shape[0]):
        assert np.array_equal(got[s], score_rest_frame((flux[s], rest[1][s]), t32),
                              equal_nan=True)



def test_fast_scores_of_wanted_templates_only_are_the_full_ones():
    """With ``wanted`` (the scan's windows), a star's blocks of templates with none wanted
    are not scored (NaN) and its other scores are those it gets without, to the last bit."""
    from kspec_fluxcal.fit.matching import _SCORE_BLOCK, score_rest_frame

    _, templates = _templates(3 * _SCORE_BLOCK)
    rng = np.random.default_rng(15)
    flux = np.stack([templates[k] + rng.normal(0, 1e-2, WAVE.size) for k in (5, 70)])
    rest = (flux, np.full(flux.shape, 1e4))
    wanted = np.zeros((2, templates.shape[0]), bool)
    wanted[0, :40] = True  # blocks 0 and 1
    wanted[1, 70:80] = True  # block 2 alone
    full = score_rest_frame(rest, templates)
    got = score_rest_frame(rest, templates, wanted)
    scored = np.zeros_like(wanted)
    scored[0, :2 * _SCORE_BLOCK] = scored[1, 2 * _SCORE_BLOCK:] = True
    assert np.array_equal(got[scored], full[scored]) and np.isnan(got[~scored]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stars_scored_against_their_own_templates_score_as_alone(dtype):
    """score_own_templates (the lattices' models, each star its own, in one call) gives
    each star the scores score_rest_frame gives it alone, to the last bit: blocks, one
    partial, missing (NaN, infinite) models and a star without weight."""
    from kspec_fluxcal.fit.matching import (
        _SCORE_BLOCK,
        RestFrame,
        score_own_templates,
        score_rest_frame,
    )

    _, templates = _templates(3 * (_SCORE_BLOCK + 5))
    own = templates.reshape(3, _SCORE_BLOCK + 5, -1).astype(dtype)
    own[1, 7] = np.nan
    own[0, 5, 100] = np.inf  # where the star has weight: an infinite sum of squares
    own[2, 4, 10] = -np.inf  # where it has none: a NaN one
    rng = np.random.default_rng(21)
    rests = [(own[s, 3 * s].astype(np.float64) + rng.normal(0, 1e-2, WAVE.size),
              np.full(WAVE.size, 1e4 if s < 2 else 0.0)) for s in range(3)]
    got = score_own_templates(rests, own)
    assert got.shape == own.shape[:2] and np.isnan(got[1, 7]) and np.isnan(got[2]).all()
    assert np.isnan(got[0, 5]) and np.isfinite(np.delete(got[0], 5)).all()
    assert list(np.nanargmin(got[:2], axis=1)) == [0, 3]
    for s in range(3):
        assert np.array_equal(got[s], score_rest_frame(rests[s], own[s]), equal_nan=True)
    # Rest frames that keep their sums (RestFrame) score the same, again and again
    kept = [RestFrame(rest) for rest in rests]
    for _ in range(2):
        assert np.array_equal(score_own_templates(kept, own), got, equal_nan=True)


def test_huber_resists_sky_residual_spikes():
    scales, templates = _templates()
    truth = 3
    obs = templates[truth] + np.random.default_rng(5).normal(0, 0.01, WAVE.size)
    spikes = np.random.default_rng(6).choice(WAVE.size, 25, replace=False)
    obs[spikes] += 0.5  # sky residuals: not in the variance
    ivar = np.full(WAVE.size, 1e4)
    chi2 = score_star(obs, ivar, templates, 0.0, WAVE, metric="chi2")
    huber = score_star(obs, ivar, templates, 0.0, WAVE, metric="huber", delta=3.0)
    assert np.argmin(huber) == truth
    # Huber's contrast between the truth and its neighbours is not drowned by the spikes.
    contrast_huber = (huber[truth + 1] - huber[truth]) / huber[truth]
    assert contrast_huber > (chi2[truth + 1] - chi2[truth]) / chi2[truth]


def test_multiplicative_correction_absorbs_smooth_continuum_errors():
    scales, templates = _templates()
    tilt = 1.0 + 0.08 * np.sin((WAVE - 3800) / 900.0)  # a normalisation mismatch
    obs = templates[6] * tilt + np.random.default_rng(7).normal(0, 0.005, WAVE.size)
    ivar = np.full(WAVE.size, 1 / 0.005**2)
    plain = score_star(obs, ivar, templates, 0.0, WAVE)
    corrected = score_star(obs, ivar, templates, 0.0, WAVE, knot_spacing=400.0)
    assert corrected[6] / WAVE.size < 1.3 < plain[6] / WAVE.size
    assert np.argmin(corrected) == 6


@pytest.mark.parametrize("knots", [400.0, None])
def test_templates_scored_alone_in_one_call_score_as_in_one_call_each(knots):
    """The line-spread width fit scores a star's trial models in one call (``alone``): each
    score must be that of the model scored by itself to the last bit (the width's parabola
    through three scores is noise-sensitive where the lines hardly constrain it), which a
    plain call of several templates is not (its sums run in another order)."""
    _, templates = _templates(3)
    rng = np.random.default_rng(11)
    star_wave = WAVE + 0.2 * np.sin(WAVE / 300.0)
    obs = _lines(BASE_DEPTHS, CENTRES, wave=star_wave, rv=40.0) * (1 + rng.normal(0, 0.01,
                                                                                  WAVE.size))
    ivar = np.where(rng.uniform(size=WAVE.size) < 0.05, 0.0, 1 / 0.01**2)
    one_each = [score_star(obs, ivar, t[None], 40.0, WAVE, knot_spacing=knots,
                           star_wavelength=star_wave)[0] for t in templates]
    together = score_star(obs, ivar, templates, 40.0, WAVE, knot_spacing=knots,
                          star_wavelength=star_wave, alone=True)
    assert together.tolist() == one_each


def test_corrections_of_several_templates_are_each_ones_own():
    """star_corrections of a star's several templates (the parameter choice's starts): each
    row the template's own star_correction to the last bit, masked pixels and a template
    with NaN included."""
    from kspec_fluxcal.fit.matching import star_correction, star_corrections

    _, templates = _templates(4)
    templates[2, 100:110] = np.nan
    rng = np.random.default_rng(12)
    star_wave = WAVE + 0.2 * np.sin(WAVE / 300.0)
    obs = _lines(BASE_DEPTHS, CENTRES, wave=star_wave, rv=-25.0) * (1 + 0.1 * np.cos(
        WAVE / 700.0)) * (1 + rng.normal(0, 0.01, WAVE.size))
    ivar = np.where(rng.uniform(size=WAVE.size) < 0.05, 0.0, 1 / 0.01**2)
    together = star_corrections(obs, ivar, templates, -25.0, WAVE, 400.0, star_wave)
    one_each = np.stack([star_correction(obs, ivar, t, -25.0, WAVE, 400.0, star_wave)
                         for t in templates])
    assert together.tobytes() == one_each.tobytes()



@pytest.mark.parametrize("own_pixels", [False, True])
@pytest.mark.parametrize("corrected", [False, True])
def test_rest_frames_of_several_stars_are_each_stars_own(own_pixels, corrected):
    """rest_frame_stars gives each star rest_frame_star's (flux, weights), to the last bit:
    stars on their own pixels or the templates', a star's two starts (the same velocity and
    pixels, their own corrections) next to each other, masked pixels."""
    from kspec_fluxcal.fit.matching import rest_frame_star, rest_frame_stars

    rng = np.random.default_rng(17)
    rv = np.array([-25.0, -25.0, 140.0, 140.0])
    star_wave = np.stack([WAVE + 0.2 * np.sin(WAVE / 300.0)] * 2 + [WAVE] * 2)
    obs = np.stack([_lines(BASE_DEPTHS, CENTRES, wave=w, rv=v) for w, v in zip(
        star_wave, rv, strict=True)]) * (1 + rng.normal(0, 0.01, (4, WAVE.size)))
    ivar = np.where(rng.uniform(size=obs.shape) < 0.05, 0.0, 1 / 0.01**2)
    obs[1, 40:50] = np.nan
    corr = 1 + 0.1 * rng.uniform(size=obs.shape) if corrected else None
    if corrected:
        corr[3, 100:110] = np.nan
    got = rest_frame_stars(obs, ivar, rv, WAVE, corr, star_wave if own_pixels else None)
    assert len(got) == 4
    for s in range(4):
        want = rest_frame_star(obs[s], ivar[s], rv[s], WAVE, None if corr is None else corr[s],
                               star_wave[s] if own_pixels else None)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got[s], want, strict=True))
        assert (want[1] == 0).sum() > 50


def test_stars_corrections_are_each_templates_own_fit_to_the_last_bit():
    """Issue 14: stars_corrections of several stars (their templates' corrections fitted
    together per set of normalised pixels) gives each row the fit of its template alone
    against its star, bit for bit: stars on shared and on their own pixels, at their own
    velocities, with masked pixels and a template with NaN."""
    from kspec_fluxcal.fit.matching import _corrections, stars_corrections
    from kspec_fluxcal.fit.shifts import shift_spectra

    _, templates = _templates(6)
    templates[4, 100:110] = np.nan
    rng = np.random.default_rng(14)
    bent = WAVE + 0.2 * np.sin(WAVE / 300.0)
    star_wave = np.stack([bent, bent + 0.05, WAVE + 0.3 * np.cos(WAVE / 500.0)])
    rv = np.array([-25.0, 60.0, 140.0])
    obs = np.stack([_lines(BASE_DEPTHS, CENTRES, wave=w, rv=v) for w, v in zip(
        star_wave, rv, strict=True)]) * (1 + rng.normal(0, 0.01, (3, WAVE.size)))
    ivar = np.where(rng.uniform(size=obs.shape) < 0.05, 0.0, 1 / 0.01**2)
    obs[1, 40:50] = np.nan
    mine = [templates[:2], templates[2:5], templates[5:]]
    got = stars_corrections(obs, ivar, mine, rv, WAVE, 400.0, star_wave)
    want = []
    for s, rows in enumerate(mine):
        for row in rows:
            shifted = shift_spectra(np.nan_to_num(row)[None], star_wave[s], rv[s], WAVE)
            w = np.where(np.isfinite(obs[s]) & np.isfinite(shifted) & (ivar[s] > 0), ivar[s],
                         0.0)
            corr = _corrections(np.nan_to_num(obs[s]), w, np.nan_to_num(shifted),
                                star_wave[s], 400.0)[0]
            want.append(np.where(corr > 0, corr, np.nan))
    assert got.shape == (6, WAVE.size) and np.isfinite(got).mean() > 0.9
    assert got.tobytes() == np.stack(want).tobytes()


def test_shift_operator_keys_of_wavelengths_seen_before():
    """Wavelengths seen before give the same key object (their rounded bytes); others of the
    same fingerprint (two pixels swapped: the same sum of bits) their own; exposures of one
    setup (1e-11 A apart) one key, as before."""
    from kspec_fluxcal.fit.shifts import _key, keyed_wavelengths, shift_operator

    wave = np.linspace(4000.0, 5000.0, 300) + 1e-9
    first = _key(wave)
    assert first == keyed_wavelengths(wave).tobytes()
    assert _key(wave.copy()) is first
    swapped = wave.copy()
    swapped[[3, 7]] = swapped[[7, 3]]
    assert _key(swapped) == keyed_wavelengths(swapped).tobytes() != first
    assert _key(wave + 1e-11) == first
    assert shift_operator(wave + 1e-11, 30.0) is shift_operator(wave, 30.0)


def test_sampled_rest_frames_are_the_operators_within_rounding():
    """sampled_rest_frames (the scan's first pass) gives each star's rest_frame_star divided
    by its template's star_correction: the same weighted pixels, the values within rounding
    (the taps summed pairwise); stars on their own pixels and at their own velocities."""
    from kspec_fluxcal.fit.matching import rest_frame_star, sampled_rest_frames, star_correction

    _, templates = _templates(2)
    rng = np.random.default_rng(13)
    star_wave = np.stack([WAVE + 0.2 * np.sin(WAVE / 300.0), WAVE])
    rv = np.array([-25.0, 140.0])
    obs = np.stack([_lines(BASE_DEPTHS, CENTRES, wave=w, rv=v) for w, v in zip(
        star_wave, rv, strict=True)]) * (1 + rng.normal(0, 0.01, (2, WAVE.size)))
    ivar = np.where(rng.uniform(size=obs.shape) < 0.05, 0.0, 1 / 0.01**2)
    obs[1, 40:50] = np.nan
    got = sampled_rest_frames(obs, ivar, templates, rv, WAVE, 400.0, star_wave)
    for s in range(2):
        corr = star_correction(obs[s], ivar[s], templates[s], rv[s], WAVE, 400.0,
                               star_wave[s])
        flux, weight = rest_frame_star(obs[s], ivar[s], rv[s], WAVE, corr, star_wave[s])
        assert np.array_equal(got[s][1] > 0, weight > 0) and (weight == 0).sum() > 50
        np.testing.assert_allclose(got[s][0], flux, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[s][1], weight, rtol=1e-12, atol=0)


def test_sampled_moments_are_the_operators_products_within_rounding():
    """sample_moments gives what a shift operator's matrix, squared and absolute weights make
    of three sets of rows, within rounding, where no tap is clipped."""
    from kspec_fluxcal.fit.shifts import rest_positions, sample_moments, shift_operator

    rng = np.random.default_rng(14)
    wave = np.round(WAVE, 6)
    source = np.round(wave * (1 + 1e-4), 6)
    rows = [rng.normal(size=(1, wave.size)) for _ in range(3)]
    pos = rest_positions(wave, 37.3, source)[None]
    op = shift_operator(wave, 37.3, source)
    got = sample_moments(*rows, pos)
    inner = np.isfinite(pos[0]) & (pos[0] > 4) & (pos[0] < wave.size - 6)
    assert inner.sum() > wave.size - 20
    for g, matrix, r in zip(got, (op.matrix, op.squared, op.absolute), rows, strict=True):
        assert g.shape == pos.shape
        np.testing.assert_allclose(g[0, inner], (matrix @ r[0])[inner], rtol=1e-13,
                                   atol=1e-14)


def test_quadratic_minimum():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 40, 3))
    centre = np.array([[0.2, -0.3, 0.1], [-0.5, 0.4, 0.0]])
    h = np.array([[4.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]])
    d = x - centre[:, None, :]
    y = 10 + 0.5 * np.einsum("ski,ij,skj->sk", d, h, d)
    xmin, cov = quadratic_minimum(x, y)
    np.testing.assert_allclose(xmin, centre, atol=1e-8)
    np.testing.assert_allclose(cov[0], 2 * np.linalg.inv(h), rtol=1e-6)


def test_tabulated_lanczos_weights_equal_the_kernel():
    from kspec_fluxcal.fit.shifts import _exact_kernel_weights, _kernel_weights

    frac = np.random.default_rng(2).random(5000)
    frac[:3] = [0.0, 1.0 - 1e-12, 0.5]
    table = _kernel_weights(frac)
    np.testing.assert_allclose(table, _exact_kernel_weights(frac), rtol=0, atol=1e-6)
    np.testing.assert_allclose(table.sum(axis=-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("rv", [0.0, 37.3, -900.0])
def test_shift_operator_rows_are_the_tabulated_taps(rv):
    """Each row of a shift operator holds _kernel_weights at its pixel's position, taps past
    the ends summed (in order) into the end pixels; rows whose source is off the spectrum
    are empty; the absolute weights are abs(matrix); the margin covers the largest shift."""
    from kspec_fluxcal.fit.shifts import (
        _TAPS,
        _kernel_weights,
        position_margin,
        rest_positions,
        shift_operator,
    )

    wave = np.round(np.exp(np.linspace(np.log(4000.0), np.log(9000.0), 300)), 6)  # as keyed
    source = np.round(wave * (1 + 2e-4), 6)
    op = shift_operator(wave, rv, source)
    pos = rest_positions(wave, rv, source)
    expected = np.zeros((wave.size, source.size))
    for p, x in enumerate(pos):
        if np.isfinite(x):
            base = int(np.floor(x))
            for tap, weight in zip(_TAPS, _kernel_weights(np.array([x - base]))[0],
                                   strict=True):
                expected[p, np.clip(base + tap, 0, source.size - 1)] += weight
    assert np.array_equal(op.matrix.toarray(), expected)
    assert np.array_equal(op.empty, ~np.isfinite(pos)) and op.empty.any()
    assert np.array_equal(op.absolute.toarray(), abs(op.matrix).toarray())
    shift = np.abs(pos - np.arange(pos.size))[np.isfinite(pos)].max()
    assert op.margin == int(np.ceil(shift)) + 5 == position_margin(pos)

@pytest.mark.parametrize("zero", [False, True])
def test_squared_shift_weights_are_the_elementwise_product_zeros_dropped(zero):
    """A shift operator's squared weights are matrix.multiply(matrix), zeros dropped (a
    stored zero, as a tap's weight may round to), and the matrix is left as it was."""
    import scipy.sparse

    from kspec_fluxcal.fit.shifts import ShiftOperator

    wave = np.exp(np.linspace(np.log(4000.0), np.log(9000.0), 800))
    matrix = scipy.sparse.csr_matrix(shift_spectra(np.eye(800), wave, 37.3).T)  # (P, P)
    if zero:
        matrix.data[5] = 0.0
    before = [a.copy() for a in (matrix.data, matrix.indices, matrix.indptr)]
    squared = ShiftOperator(matrix, 5).squared
    expected = matrix.multiply(matrix).tocsr()
    expected.eliminate_zeros()
    assert squared.nnz == expected.nnz and not np.any(squared.data == 0)
    for name in ("data", "indices", "indptr"):
        assert getattr(squared, name).tobytes() == getattr(expected, name).tobytes()
    for a, b in zip(before, (matrix.data, matrix.indices, matrix.indptr), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("block", [None, 7])
def test_sampled_rows_are_the_tabulated_taps_summed_pairwise(block, monkeypatch):
    """sample_rows to the last bit: each tap's weight from _kernel_weights, taps beyond the
    ends reading the end pixels, the eight products summed pairwise; positions that are not
    finite read pixel 0 (weight 1 within rounding). Whole, and in blocks of points."""
    from kspec_fluxcal.fit import shifts
    from kspec_fluxcal.fit.shifts import _TAPS, _kernel_weights, sample_rows

    if block:
        monkeypatch.setattr(shifts, "_SAMPLE_BLOCK", block)

    rng = np.random.default_rng(5)
    n = 50
    spectra = rng.normal(size=(2, n))
    pos = rng.uniform(0, n - 1, size=(2, 3, 40))
    pos[0, 0, :4] = [0.0, 0.3, n - 1.0, n - 1.2]  # taps past both ends
    pos[1, 2, :2] = [np.inf, -np.inf]
    got = sample_rows(spectra, pos)
    ok = np.isfinite(pos)
    base = np.floor(np.where(ok, pos, 0.0)).astype(int)
    weights = _kernel_weights(np.where(ok, pos, 0.0) - base)
    rows = np.arange(2)[:, None, None]
    terms = [spectra[rows, np.clip(base + tap, 0, n - 1)] * weights[..., k]
             for k, tap in enumerate(_TAPS)]
    pairs = [terms[0] + terms[1], terms[2] + terms[3], terms[4] + terms[5], terms[6] + terms[7]]
    expected = (pairs[0] + pairs[1]) + (pairs[2] + pairs[3])
    assert got.shape == pos.shape
    assert np.array_equal(got, expected)
    assert got[1, 2, 0] == pytest.approx(spectra[1, 0], rel=1e-15)



@pytest.mark.parametrize("precision", [np.float64, np.float32])
def test_sampled_sets_are_each_sets_sampled_rows_to_the_last_bit(precision, monkeypatch):
    """sample_sets: each set of rows what sample_rows makes of it alone at the same
    positions (the kernel's weights shared, not changed), in blocks of points too."""
    from kspec_fluxcal.fit import shifts
    from kspec_fluxcal.fit.shifts import sample_rows, sample_sets

    monkeypatch.setattr(shifts, "_SAMPLE_BLOCK", 13)
    rng = np.random.default_rng(7)
    n = 60
    sets = [rng.normal(size=(3, n)), 1.0 + rng.random((3, n))]
    pos = rng.uniform(0, n - 1, size=(3, 50))
    pos[0, :2] = [0.1, n - 1.4]  # taps past both ends
    pos[2, 0] = np.inf
    got = sample_sets(sets, pos, precision)
    assert len(got) == 2
    for rows, out in zip(sets, got, strict=True):
        assert out.shape == pos.shape
        assert np.array_equal(out, sample_rows(rows, pos, precision))
    assert not np.array_equal(got[0], got[1])


def test_sampled_rows_in_float32_are_the_float64_ones_within_its_rounding():
    from kspec_fluxcal.fit.shifts import sample_rows

    rng = np.random.default_rng(6)
    n = 300
    spectra = 1.0 - 0.5 * rng.random((2, n))
    pos = rng.uniform(0, n - 1, size=(2, 5, 200))
    pos[0, 0, :2] = [0.2, n - 1.3]  # taps past both ends
    exact = sample_rows(spectra, pos)
    single = sample_rows(spectra, pos, np.float32)
    assert single.dtype == np.float64 and single.shape == pos.shape
    assert not np.array_equal(single, exact)
    np.testing.assert_allclose(single, exact, rtol=1e-6, atol=0)

def _alpha_world(feh_slope=0.05):
    """Templates whose lines deepen linearly with [alpha/M], on a grid that has +0.25 only
    at [M/H] -0.5 (not at 0), and a star at [M/H] 0, [alpha/M] +0.4 that they describe
    exactly by the response of [M/H] -0.5, extrapolated."""
    wave = np.linspace(5000.0, 6000.0, 800)
    lines = sum(np.exp(-0.5 * ((wave - c) / 1.5) ** 2) for c in np.linspace(5020, 5980, 40))
    axes = {"teff": np.array([6000.0, 6500.0]), "logg": np.array([4.0]),
            "feh": np.array([-0.5, 0.0]), "alpha": np.array([0.0, 0.25])}
    index = -np.ones((2, 1, 2, 2), int)
    rows = []
    for i, t in enumerate(axes["teff"]):
        for k, m in enumerate(axes["feh"]):
            for a in axes["alpha"][: 2 if m < 0 else 1]:
                index[i, 0, k, int(a > 0)] = len(rows)
                rows.append(1.0 - (0.2 + feh_slope * m + 0.3 * a + 1e-5 * (t - 6000)) * lines)

    def star(alpha):
        return 1.0 - (0.2 + 0.3 * alpha + 0.002) * lines

    return wave, axes, index, np.array(rows), star


@pytest.mark.parametrize("beyond, prior, expected", [(0.25, 0.0, 0.4), (0.0, 0.0, 0.25)])
def test_alpha_fitted_beyond_the_grid_and_into_its_holes(beyond, prior, expected):
    from types import SimpleNamespace

    from kspec_fluxcal.fit.parameter_choice import _refine_alpha

    wave, axes, index, templates, star = _alpha_world()
    obs = SimpleNamespace(norm=star(0.4)[None], ivar=np.full((1, wave.size), 1e4), wave=wave)
    fit = SimpleNamespace(alpha_extrapolation=beyond, alpha_prior=prior)
    params = {"teff": np.array([6200.0]), "logg": np.array([4.0]), "feh": np.array([0.0])}
    alpha, err = _refine_alpha(obs, templates, SimpleNamespace(rv=np.zeros(1)), params,
                               np.array([0]), {"metric": "chi2"}, axes, index, fit)
    assert alpha[0] == pytest.approx(expected, abs=0.01)


def test_alpha_prior_holds_back_what_the_grid_does_not_have():
    from types import SimpleNamespace

    from kspec_fluxcal.fit.parameter_choice import _alpha_cover, _refine_alpha

    wave, axes, index, templates, star = _alpha_world()
    np.testing.assert_allclose(_alpha_cover(axes, index, np.array([-0.5, -0.25, 0.0])),
                               [0.25, 0.125, 0.0])
    obs = SimpleNamespace(norm=star(0.4)[None], ivar=np.full((1, wave.size), 1.0), wave=wave)
    found = []
    for prior in (0.0, 0.3, 0.05):
        fit = SimpleNamespace(alpha_extrapolation=0.25, alpha_prior=prior)
        params = {"teff": np.array([6200.0]), "logg": np.array([4.0]), "feh": np.array([0.0])}
        found.append(_refine_alpha(obs, templates, SimpleNamespace(rv=np.zeros(1)), params,
                                   np.array([0]), {"metric": "chi2"}, axes, index, fit)[0][0])
    assert found[0] > found[1] > found[2]
    assert found[2] < 0.2


def test_float32_rows_missing_exactly_where_their_float64_sums_are_not_finite():
    """ScoringTemplates' missing rows of float32 templates (by a test of every value) are
    those whose float64 sum is not finite: NaN, either infinity, both, and the largest
    finite values (no overflow in float64)."""
    from kspec_fluxcal.fit.matching import ScoringTemplates

    rows = np.ones((6, 50), dtype=np.float32)
    rows[1, 3] = np.nan
    rows[2, 7] = np.inf
    rows[3, [0, 9]] = [np.inf, -np.inf]
    rows[4, :] = np.finfo(np.float32).max
    rows[5, 0] = -np.inf
    prepared = ScoringTemplates(rows)
    assert prepared.tmpl.dtype == np.float32
    with np.errstate(invalid="ignore"):  # inf - inf
        sums = rows.sum(axis=1, dtype=np.float64)
    assert prepared.missing.tolist() == (~np.isfinite(sums)).tolist()
    assert prepared.missing.tolist() == [False, True, True, True, False, True]
    assert not prepared.tmpl[prepared.missing].any()


def test_correction_basis_is_the_pixels_own_spline_basis():
    """The correction's basis, looked up by the pixels' bytes: spline_basis' for these
    pixels (a view or a copy of them alike), another for other pixels or another knot
    spacing, a constant without knots."""
    from kspec_fluxcal.continuum import spline_basis
    from kspec_fluxcal.fit.matching import _correction_basis

    wave = np.linspace(4000.0, 9000.0, 600)
    other = np.geomspace(3900.0, 9100.0, 1200)[::2]  # a strided view; other normalised pixels
    for pixels, knots in ((wave, 500.0), (wave.copy(), 500.0), (other, 500.0), (wave, 250.0)):
        got = _correction_basis(pixels, knots)
        expected = spline_basis(pixels, knots)
        assert (got[0] != expected[0]).nnz == 0 and got[0].shape == expected[0].shape
        np.testing.assert_array_equal(got[3], expected[3])
    assert _correction_basis(wave, 500.0)[0].shape != _correction_basis(wave, 250.0)[0].shape
    assert (_correction_basis(other, 500.0)[0] != _correction_basis(wave, 500.0)[0]).nnz
    constant = _correction_basis(wave, None)[0]
    assert constant.shape == (wave.size, 1) and (constant.toarray() == 1).all()


@pytest.mark.parametrize("knots", [None, 300.0])
def test_corrected_chi2_is_the_fitted_models_residuals(knots):
    """corrected_chi2 from the normal equations: sum w (f - m)^2 of fit_corrected's models,
    within rounding of sum w f^2, masked pixels and an empty row included."""
    from kspec_fluxcal.fit.matching import corrected_chi2, fit_corrected

    rng = np.random.default_rng(11)
    wave = np.linspace(4000.0, 9000.0, 800)
    templates = 1.0 - 0.3 * rng.random((4, wave.size))
    slope = 1.0 + 0.2 * (wave - 6500.0) / 2500.0
    flux = templates * slope * 1.1 + rng.normal(0.0, 0.02, templates.shape)
    weights = np.full(templates.shape, 2500.0)
    weights[1, 100:300] = 0.0
    weights[3] = 0.0  # nothing to fit
    model = fit_corrected(flux, weights, templates, wave, knots)
    expected = np.sum(weights * (flux - model) ** 2, axis=1)
    got = corrected_chi2(flux, weights, templates, wave, knots)
    scale = np.sum(weights * flux**2, axis=1)
    assert got.shape == (4,)
    assert np.all(np.abs(got - expected) <= 1e-12 * scale + 1e-300)
    assert got[3] == 0.0 and expected[0] > 100.0  # the fits are not trivial
