"""Telluric model: transmission at pixels through a line spread, derivatives, the fit."""

import numpy as np
import pytest

from kspec_fluxcal.config import load_config
from kspec_fluxcal.constants import FWHM_PER_SIGMA
from kspec_fluxcal.errors import ConfigError
from kspec_fluxcal.lsf import LineSpread
from kspec_fluxcal.telluric import (
    divide_transmission,
    fit_telluric,
    optical_depths,
    sample_transmission,
    telluric_lines,
    transmission,
)

COLUMNS = (1.3, 2.5)


def _direct(wave, sigma, o2, h2o):
    """The transmission as a plain sum over the high-resolution grid (the definition)."""
    hr, tau = optical_depths()
    trans = np.exp(-o2 * tau[0] - h2o * tau[1])
    out = []
    for w in wave:
        k = np.exp(-0.5 * ((hr - w) / sigma) ** 2)
        out.append(np.sum(k * trans) / np.sum(k))
    return np.array(out)


@pytest.mark.parametrize("fwhm, npix", [(12.0, 1340), (4.0, 4096), (2.0, 8000)])
def test_transmission_equals_the_high_resolution_sum(fwhm, npix):
    """Boxes of a third of sigma with their moments: the sum over the high-resolution grid to
    2e-5, for the IsoPlane's line spread and finer ones."""
    wave = np.linspace(3600.0, 8400.0, npix)
    sigma = fwhm / FWHM_PER_SIGMA
    hr = optical_depths()[0]
    inside = np.flatnonzero((wave > hr[0] + 5 * sigma) & (wave < hr[-1] - 5 * sigma))[::5]
    got = transmission(wave, LineSpread.constant(fwhm), *COLUMNS)
    want = _direct(wave[inside], sigma, *COLUMNS)
    assert want.min() < 0.6  # the O2 A band is in
    assert np.abs(got[inside] - want).max() < 2e-5
    fine = sample_transmission(hr, np.exp(-COLUMNS[0] * optical_depths()[1][0]
                                          - COLUMNS[1] * optical_depths()[1][1]), wave, sigma)
    assert np.abs(fine[inside] - want).max() < 2e-6


def test_one_outside_the_bands_and_derivatives():
    wave = np.linspace(3700.0, 8400.0, 3000)
    lsf = LineSpread.constant(5.0)
    trans, d_o2, d_h2o = transmission(wave, lsf, *COLUMNS, derivatives=True)
    assert np.all(trans[wave < 6000] == 1.0)
    assert np.all(d_o2[wave < 6000] == 0.0)
    # Five-point differences of steps large enough for T's float32 exponentials (~1e-8).
    h, steps, coeffs = 0.03, np.array([-2, -1, 1, 2]), np.array([1, -8, 8, -1]) / 12
    num_o2 = sum(c * transmission(wave, lsf, COLUMNS[0] + k * h, COLUMNS[1])
                 for k, c in zip(steps, coeffs, strict=True)) / h
    num_h2o = sum(c * transmission(wave, lsf, COLUMNS[0], COLUMNS[1] + k * h)
                  for k, c in zip(steps, coeffs, strict=True)) / h
    np.testing.assert_allclose(d_o2, num_o2, atol=2e-7)
    np.testing.assert_allclose(d_h2o, num_h2o, atol=2e-7)
    assert d_o2.min() < -0.05 and d_h2o.min() < -0.01


def test_rows_have_their_own_pixels_and_line_spreads():
    """Fibers sharing pixels are computed once, but each row keeps its own pixels and width:
    the same as separate calls, and a broader fiber sees a shallower A band."""
    lsf = LineSpread.constant(6.0)
    base = np.linspace(6800.0, 7800.0, 600)
    rows = np.stack([base, base, base + 0.8, base])
    scale = np.array([1.0, 1.0, 1.0, 1.2])
    together = transmission(rows, lsf, *COLUMNS, scale=scale)
    for r in range(4):  # boxes follow the narrowest spread of a call: equal to 2 x 2e-5
        alone = transmission(rows[r], lsf.scaled(scale[r]), *COLUMNS)
        np.testing.assert_allclose(together[r], alone, rtol=0, atol=4e-5)
    assert np.array_equal(together[0], together[1])
    assert together[3].min() > together[0].min() + 0.02


def test_rows_reaching_different_bands_keep_their_own():
    """The model computes only the boxes the pixels reach, from the bluest to the reddest:
    rows on far-apart ranges (the A band, the water beyond 8900 A, none) are each what they
    are alone, their derivatives too, and a row no band reaches transmits 1."""
    lsf = LineSpread.constant(4.0)
    rows = np.stack([np.linspace(7550.0, 7700.0, 300), np.linspace(8900.0, 9300.0, 300),
                     np.linspace(4000.0, 5000.0, 300)])
    together = transmission(rows, lsf, *COLUMNS, derivatives=True)
    for r in range(3):
        alone = transmission(rows[r], lsf, *COLUMNS, derivatives=True)
        for got, want in zip(together, alone, strict=True):
            np.testing.assert_allclose(got[r], want, rtol=1e-12, atol=1e-15)
    assert together[0][0].min() < 0.6 and together[0][1].min() < 0.9
    assert np.all(together[0][2] == 1.0) and not together[1][2].any()


def test_pixels_modelled_are_those_an_absorbing_box_reaches():
    """A pixel has a kernel row exactly when an absorbing box's centre lies within
    [wavelength - reach, wavelength + reach), reach = 5 sigma: pixels at the reach's ends
    of the absorbing runs' first and last boxes (both sides of each), NaN pixels and
    sigmas, random ones."""
    from kspec_fluxcal.telluric import _line_list_boxes, _Sampler

    boxes, _ = _line_list_boxes("telluric_lines", 20)
    absorbing = boxes.centres[boxes.active]
    edges = np.flatnonzero(np.diff(boxes.active.astype(int)))
    ends = boxes.centres[np.concatenate([edges, edges + 1])]
    rng = np.random.default_rng(3)
    sigma = np.concatenate([np.full(4 * ends.size, 1.5), rng.uniform(0.5, 3.0, 2000)])
    reach = 5.0 * sigma[:ends.size]
    wave = np.concatenate([ends - reach, ends + reach, np.nextafter(ends - reach, 0),
                           np.nextafter(ends + reach, np.inf),
                           rng.uniform(boxes.centres[0] - 50, boxes.centres[-1] + 50, 2000)])
    wave[5], sigma[7] = np.nan, np.nan
    sampler = _Sampler(boxes, wave, sigma)
    lo, hi = wave - 5.0 * sigma, wave + 5.0 * sigma
    want = [k for k in range(wave.size)
            if np.any((absorbing >= lo[k]) & (absorbing < hi[k]))]
    assert 0 < len(want) < wave.size
    np.testing.assert_array_equal(sampler.index, want)


def test_increasing_points_are_reached_as_by_one_search_each():
    """Increasing points outnumbering the absorbing boxes (uniform nodes; their reach
    varying) are found by a search of the boxes among them: the same points as by the
    definition, including points at the reach's ends of the absorbing runs' boxes."""
    from kspec_fluxcal._telluric_kernels import reached
    from kspec_fluxcal.telluric import _line_list_boxes

    boxes, _ = _line_list_boxes("telluric_lines", 20)
    absorbing = boxes.centres[boxes.active]
    wave = np.linspace(boxes.centres[0] - 30.0, boxes.centres[-1] + 30.0, 3 * absorbing.size)
    edges = np.flatnonzero(np.diff(boxes.active.astype(int)))
    wave = np.sort(np.concatenate([wave, boxes.centres[edges] + 4.0, boxes.centres[edges] - 4.0]))
    reach = 4.0 + 1e-5 * (wave - wave[0])  # increasing by less than the points
    ok = np.ones(wave.size, bool)
    got = reached(boxes, wave, reach, ok)
    first = np.searchsorted(absorbing, wave - reach)
    want = np.flatnonzero(np.append(absorbing, np.inf)[first] < wave + reach)
    assert 0 < want.size < wave.size
    np.testing.assert_array_equal(got, want)
    ok[::7] = False  # unusable points (no reach): not reached, and the points not increasing
    np.testing.assert_array_equal(reached(boxes, wave, reach, ok), want[want % 7 != 0])


def test_the_model_is_the_kernel_matrix_applied_to_the_boxes_moments():
    """T, dT/do2 and dT/dh2o (sampled one vector at a time) are, to the bit, the kernel
    matrix's product with the three vectors of the boxes' moments of their deficits at
    once, on fibers of their own solutions."""
    from kspec_fluxcal.telluric import _Model

    lsf = LineSpread.constant(3.0)
    base = np.linspace(6000.0, 9000.0, 2000)
    rows = np.stack([base, base + 0.3, base - 0.2])
    model = _Model(np.column_stack([np.ones(3), rows]), lsf, "telluric_lines")
    got = model(*COLUMNS, derivatives=True)
    sampler, tau = model.sampler, model.tau  # float32, the exponential too
    hr = np.exp((-COLUMNS[0] * tau[0].astype(np.float64)
                 - COLUMNS[1] * tau[1].astype(np.float64)).astype(np.float32))
    deficits = np.stack([1.0 - hr, tau[0] * hr, tau[1] * hr])
    moments = deficits.reshape(3, -1, sampler.box) @ sampler.moments
    boxed = np.zeros((3, sampler.absorbing + 1, 3))  # the last box: the matrix's zero columns
    boxed[:, :-1] = moments
    want = np.zeros((3, rows.size))
    want[0] = 1.0
    want[:, sampler.index] -= (sampler.matrix @ boxed.reshape(3, -1).T).T
    assert sampler.index.size > 100
    np.testing.assert_array_equal(np.reshape(got, (3, -1)), want)


def test_each_species_summed_over_its_own_boxes_changes_no_bit(monkeypatch):
    """A model sums each species' terms over the boxes of that species (O2's, both's, H2O's
    in turn): T, dT/do2 and dT/dh2o are, to the bit, those of the boxes along the grid
    without species (every term of both summed everywhere), of boxes all said to have both,
    and of a random mix; non-finite and negative columns too (NaN and overflows there, as
    everywhere)."""
    import kspec_fluxcal.telluric as telluric

    lsf = LineSpread.constant(3.0)
    rows = np.column_stack([np.ones(2), np.stack([np.linspace(6000.0, 9000.0, 2000)] * 2)
                            + np.array([[0.0], [0.3]])])
    boxes, tau = telluric._line_list_boxes("telluric_lines", 20)
    assert set(np.unique(boxes.kind[boxes.active])) == {0, 2}  # the stand-in list's
    mixed = np.where(np.random.default_rng(5).uniform(size=boxes.kind.size) < 0.3, 1,
                     boxes.kind)
    got = {}
    for name, kind in (("kinds", boxes.kind), ("none", None), ("both", np.ones_like(mixed)),
                       ("mixed", mixed)):
        monkeypatch.setattr(telluric, "_line_list_boxes",
                            lambda source, box, kind=kind: (boxes._replace(kind=kind), tau))
        model = telluric._Model(rows, lsf, "telluric_lines")
        assert (model.sampler.order is None) == (kind is None)
        with np.errstate(all="ignore"):
            got[name] = [np.array(model(*columns, derivatives=True))
                         for columns in (COLUMNS, (np.nan, 1.0), (-0.5, 2.0))]
    assert got["kinds"][0][0].min() < 0.5 and np.isnan(got["kinds"][1]).any()
    for name in ("none", "both", "mixed"):
        for want, have in zip(got[name], got["kinds"], strict=True):
            np.testing.assert_array_equal(have, want)


def test_dividing_by_the_transmission_propagates_the_columns_errors():
    """In place: F / T and V / T^2 + F^2 var(T) / T^4 with var(T) = (dT/do2 e_o2)^2 +
    (dT/dh2o e_h2o)^2, on fibers of their own solutions; a pixel without a wavelength (T = 1,
    no derivative) keeps its values."""
    lsf = LineSpread.constant(3.0)
    base = np.linspace(6000.0, 9000.0, 2000)
    wave = np.stack([base, base + 0.3, base - 0.2])
    wave[1, 7] = np.nan
    values = np.random.default_rng(5).uniform(0.5, 2.0, (2,) + wave.shape)
    factor, variance = values.copy()
    errors = (0.02, 0.05)
    trans, d_o2, d_h2o = transmission(wave, lsf, *COLUMNS, derivatives=True)
    divide_transmission(values, wave, lsf, COLUMNS, errors)
    var_t = (d_o2 * errors[0]) ** 2 + (d_h2o * errors[1]) ** 2
    assert trans.min() < 0.5 and np.all(np.isfinite(var_t))
    np.testing.assert_array_equal(values[0], factor / trans)
    np.testing.assert_allclose(values[1], variance / trans**2 + factor**2 * var_t / trans**4,
                               rtol=1e-14)
    np.testing.assert_array_equal(values[:, 1, 7], [factor[1, 7], variance[1, 7]])


@pytest.mark.parametrize("nodes", [False, True])
def test_the_model_at_some_pixels_is_the_whole_model_there(nodes):
    """The fit samples only its weighted pixels (flat indices into its rows): the whole
    model's values there, on rows sharing pixels and rows of their own, sampled at their
    pixels or interpolated from nodes (14 fibers' own solutions)."""
    from kspec_fluxcal import telluric

    base = np.linspace(6800.0, 7800.0, 500)
    rows, lsf = np.stack([base, base + 0.5, base, base - 0.3]), LineSpread.constant(4.0)
    if nodes:
        lsf, base = LineSpread((5.5, -10.0, 8.4)), np.linspace(3500.0, 8500.0, 4096)
        rows = base + np.random.default_rng(7).uniform(-0.8, 0.8, (14, 1))
    sample = telluric._model(rows, lsf, None, "telluric_lines")
    assert (next(reversed(telluric._MODELS.values()))[1].nodes is not None) == nodes
    whole = sample(*COLUMNS, derivatives=True)
    pixels = np.random.default_rng(5).choice(rows.size, rows.size // 4, replace=False)
    some = sample(*COLUMNS, derivatives=True, pixels=pixels)
    assert whole[0].min() < 0.6 and some[0].min() < 0.6 and np.any(some[0] == 1.0)
    for got, want in zip(some, whole, strict=True):
        np.testing.assert_array_equal(got, want.ravel()[pixels])


def test_fit_recovers_the_columns():
    """Stars' observed transmissions (the definition's high-resolution sum, 0.3 % noise,
    different pixels per star) give back the columns they were made with."""
    rng = np.random.default_rng(4)
    lsf = LineSpread.constant(8.0)
    sigma = 8.0 / FWHM_PER_SIGMA
    hr, tau = optical_depths()
    truth = (1.15, 1.8)
    star_wave = np.stack([np.linspace(3800.0, 8300.0, 1500) + shift for shift in (0, 1.1, 2.3)])
    hr_trans = np.exp(-truth[0] * tau[0] - truth[1] * tau[1])
    observed = np.stack([sample_transmission(hr, hr_trans, w, sigma) for w in star_wave])
    observed += rng.normal(0.0, 0.003, observed.shape)
    weight = np.where(transmission(star_wave, lsf, 1.0, 1.0) < 0.999, 1.0 / 0.003**2, 0.0)
    fit = fit_telluric(star_wave, observed, weight, lsf, start=(1.0, 1.0))
    assert fit["o2"] == pytest.approx(truth[0], rel=0.01)
    assert fit["h2o"] == pytest.approx(truth[1], rel=0.02)
    assert abs(fit["o2"] - truth[0]) < 4 * fit["o2_err"] + 1e-3
    assert 0.7 < fit["chi2_dof"] < 1.3
    assert fit["model"].shape == observed.shape


def test_fit_without_bands_reports_nan():
    wave = np.linspace(4000.0, 5500.0, 500)[None]
    fit = fit_telluric(wave, np.ones_like(wave), np.ones_like(wave), LineSpread.constant(5.0))
    assert np.isnan(fit["o2"]) and np.isnan(fit["h2o"])


_HEADER = "wavelength,species,ew,hwhm\n"


@pytest.mark.parametrize("row, match", [
    # A zero width gave the line no absorption at all (and a divide-by-zero warning).
    ("7610.0,O2,0.5,0.0", r"line 3, column hwhm: '0.0': must be a positive number"),
    # Any species but H2O counted as O2.
    ("7610.0,CO2,0.5,0.02", r"line 3, column species: 'CO2': the model has O2 and H2O only"),
    # A negative or missing equivalent width became a line of no absorption.
    ("7610.0,O2,-0.5,0.02", r"line 3, column ew: '-0.5': must be a positive number"),
    ("7610.0,O2,,0.02", r"line 3, column ew: '': must be a positive number"),
    # Wavelengths in nm: lines nowhere near any spectrum, columns never constrained.
    ("761.0,O2,0.5,0.02", r"line 3, column wavelength: '761.0': must be air Angstrom in "
     r"3000-30000 \(nm or micron\?\)"),
    ("7610.0,O2,0.5", r"line 3: 3 fields, the header has 4"),
])
def test_bad_line_list_names_the_line(tmp_path, row, match):
    path = tmp_path / "lines.csv"
    path.write_text(_HEADER + "7600.0,O2,0.5,0.03\n" + row + "\n")
    with pytest.raises(ConfigError, match=match) as info:
        telluric_lines(str(path))
    assert str(path) in str(info.value)


def test_bad_line_list_in_the_config_names_the_line(tmp_path):
    lines = tmp_path / "lines.csv"
    lines.write_text(_HEADER + "7600.0,O2,0.5,0.0\n")
    config = tmp_path / "c.toml"
    config.write_text(f"[telluric]\nlines = '{lines}'\n")
    with pytest.raises(ConfigError, match=r"c.toml: \[telluric\] lines: .*lines.csv': line 2, "
                       r"column hwhm: '0.0': must be a positive number"):
        load_config(config)


def test_line_list_of_valid_lines_reads(tmp_path):
    """A user list in another column order, lower-case species: read as given."""
    path = tmp_path / "lines.csv"
    path.write_text("# a comment\nspecies,hwhm,ew,wavelength\nh2o,0.05,0.2,8200.0\n"
                    "O2,0.03,0.5,7600.0\n")
    lines = telluric_lines(str(path))
    assert lines["wavelength"].tolist() == [7600.0, 8200.0]
    assert lines["water"].tolist() == [False, True]
    assert lines["ew"].tolist() == [0.5, 0.2]
    assert lines["hwhm"].tolist() == [0.03, 0.05]


def test_line_list_with_a_byte_order_mark_reads(tmp_path):
    """A byte-order mark made the first column 'missing'."""
    path = tmp_path / "lines.csv"
    path.write_text("wavelength,species,ew,hwhm\n7600.0,O2,0.5,0.03\n", encoding="utf-8-sig")
    assert telluric_lines(str(path))["wavelength"].tolist() == [7600.0]


@pytest.mark.parametrize(("content", "match"), [
    (b"wavelength,species,ew\n7600.0,O2,0.5\n", r"line 1: missing column\(s\) hwhm"),
    # a column given twice was read from its first place, silently
    (b"wavelength,species,ew,hwhm,ew\n7600.0,O2,0.5,0.03,0.9\n",
     r"line 1: column ew appears 2 times \(columns 3, 5\)"),
    (b"\xff\xfe\x00binary", "lines.csv: not a readable CSV text file"),
], ids=["missing-column", "column-twice", "not-text"])
def test_line_list_refused(tmp_path, content, match):
    path = tmp_path / "lines.csv"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        telluric_lines(str(path))


def test_rows_on_one_line_spread_are_interpolated_from_nodes(monkeypatch):
    """Fourteen fibers of their own solutions on one line spread (varying with wavelength)
    are sampled at uniform nodes and interpolated: T and its derivatives within 1e-5 of
    every pixel's own kernel sum; exactly 1 and 0 far from the bands, and at NaN pixels."""
    import kspec_fluxcal.telluric as telluric

    lsf = LineSpread((5.5, -10.0, 8.4))  # the lake's: sigma 1.0-1.3 A
    base = np.linspace(3500.0, 8500.0, 4096)
    rows = base + np.random.default_rng(7).uniform(-0.8, 0.8, (14, 1)) * (1 + base / 1e4)
    rows[3, :20] = np.nan
    rows = np.column_stack([np.ones(14), rows])
    model = telluric._Model(rows, lsf, "telluric_lines")
    got = np.array(model(*COLUMNS, derivatives=True))
    monkeypatch.setattr(telluric, "_NODE_SHARE", 0.0)
    direct = telluric._Model(rows, lsf, "telluric_lines")
    want = np.array(direct(*COLUMNS, derivatives=True))
    assert model.nodes is not None and direct.nodes is None
    assert model.sampler.index.size < direct.sampler.index.size / 2
    assert want[0].min() < 0.3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    blue = np.isnan(rows[:, 1:]) | (rows[:, 1:] < 6000.0)
    assert np.all(got[0][blue] == 1.0) and not got[1:, blue].any()


def test_a_model_kept_for_rows_serves_only_those_rows():
    """Models are kept by the sums of their rows' bits and a hit is compared whole: rows
    whose bits sum alike (two pixels swapped) get their own model, the same rows the kept
    one."""
    from kspec_fluxcal.telluric import _model

    lsf = LineSpread.constant(4.0)
    rows = np.stack([np.linspace(6800.0, 7800.0, 400), np.linspace(6801.0, 7801.0, 400)])
    swapped = rows.copy()
    swapped[0, [28, 320]] = swapped[0, [320, 28]]  # in the B and A bands
    assert rows.view(np.int64).sum() == swapped.view(np.int64).sum()
    first = _model(rows, lsf, None, "telluric_lines")(*COLUMNS)
    other = _model(swapped, lsf, None, "telluric_lines")(*COLUMNS)
    assert first[0, 28] != first[0, 320]
    np.testing.assert_array_equal(other[0, [28, 320]], first[0, [320, 28]])
    np.testing.assert_array_equal(_model(rows.copy(), lsf, None, "telluric_lines")(*COLUMNS),
                                  first)
