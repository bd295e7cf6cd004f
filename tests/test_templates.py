import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse
import xarray as xr

from kspec_fluxcal import convolution, template_cache, templates
from kspec_fluxcal.constants import FWHM_PER_SIGMA
from kspec_fluxcal.errors import FluxCalWarning, GridError
from kspec_fluxcal.grid import PARAMS, open_grid
from kspec_fluxcal.grid.build import build_grid
from kspec_fluxcal.lsf import LineSpread
from kspec_fluxcal.templates import (
    CACHE_ENV,
    clear_cache,
    convolution_matrix,
    default_cache_dir,
    library_arrays,
    library_range,
    prepare_library,
    prepare_templates,
    prepared_templates,
)

R_GRID = 20000.0
LINES = (3600.0, 6000.0, 8400.0)


def _grid(nteff=3, chunked=False):
    """A tiny in-memory cube: lines of the grid's own width (FWHM = lambda/R), flat continuum."""
    wave = np.exp(np.arange(np.log(3000.0), np.log(9500.0), 1.0 / (2.3 * R_GRID)))
    prof = sum(0.5 * np.exp(-0.5 * ((wave - c) / (c / R_GRID / FWHM_PER_SIGMA)) ** 2)
               for c in LINES)
    base = 1.0 - prof
    flux = np.stack([base * (1 + 0.1 * k) for k in range(nteff)])[:, None, None, None, :]
    ds = xr.Dataset(
        {"flux": (("teff", "logg", "feh", "alpha", "wavelength"), flux.astype(np.float32)),
         "continuum": (("teff", "logg", "feh", "alpha", "wavelength"),
                       np.ones_like(flux, dtype=np.float32)),
         "exists": (("teff", "logg", "feh", "alpha"), np.ones((nteff, 1, 1, 1), bool))},
        coords={"teff": 5000.0 + 500 * np.arange(nteff), "logg": [4.5], "feh": [0.0],
                "alpha": [0.0], "wavelength": wave},
        attrs={"resolving_power": R_GRID, "build_plan": f"test-{nteff}"},
    )
    return ds.chunk({"teff": 1}) if chunked else ds


def _fwhm(wave, depth):
    """FWHM from the second moment of an absorption profile."""
    w = np.clip(depth, 0, None)
    mean = np.sum(w * wave) / w.sum()
    return np.sqrt(np.sum(w * (wave - mean) ** 2) / w.sum()) * FWHM_PER_SIGMA


@pytest.mark.parametrize("centre", LINES)
def test_line_broadened_to_wavelength_dependent_fwhm(centre):
    lsf = LineSpread((3.0, 6.0), "FWHMPC")  # 5.2 A at 3600 A, 8.0 A at 8400 A
    grid = _grid(1)
    out = np.arange(centre - 40, centre + 40, 0.2)
    matrix, sharper = convolution_matrix(grid["wavelength"].values, out, lsf, R_GRID)
    assert sharper == 0
    result = matrix @ grid["flux"].values[0, 0, 0, 0].astype(float)
    measured = _fwhm(out, 1.0 - result)
    assert measured == pytest.approx(float(lsf.fwhm(centre)), rel=0.02)
    assert np.asarray(matrix.sum(axis=1)).ravel() == pytest.approx(1.0)


def test_prepare_is_lazy_and_matches_eager(raise_if_computes):
    lsf = LineSpread.constant(7.0)
    wave = np.linspace(3500, 9000, 1500)
    with raise_if_computes():
        lazy = prepare_templates(_grid(3, chunked=True), wave, lsf)
    assert lazy["flux"].chunks is not None
    eager = prepare_templates(_grid(3), wave, lsf)
    xr.testing.assert_allclose(lazy["flux"].compute(), eager["flux"], rtol=1e-6)
    assert eager["flux"].dims == ("teff", "logg", "feh", "alpha", "wavelength")
    np.testing.assert_array_equal(eager["wavelength"].values, wave)
    assert eager.attrs["lsf_fwhm_coeffs"] == [7.0]
    # Away from lines the flat continuum is preserved exactly (rows sum to one).
    flat = (wave > 4000) & (wave < 5000)
    np.testing.assert_allclose(eager["flux"].values[1, 0, 0, 0, flat], 1.1, rtol=1e-5)


def test_grid_must_cover_exposure():
    with pytest.raises(GridError, match=r"the grid covers 3000-9500 A but the exposure needs"):
        prepare_templates(_grid(1), np.linspace(3005, 9000, 500), LineSpread.constant(8.0))


def test_convolution_entries_are_each_rows_normalised_gaussian_to_the_last_bit():
    """The operator's entries, computed in place for the whole matrix, are row by row what
    the module's formula gives: a Gaussian in ln(lambda) of the instrument's width with the
    grid's removed (half a grid step where the instrument is sharper), times the input's ln
    steps, over the rows' 5-sigma columns, divided by their sum taken in column order."""
    wave_in = np.exp(np.arange(np.log(3000.0), np.log(9500.0), 1.0 / (2.3 * R_GRID)))
    wave_out = np.linspace(3600.0, 9000.0, 700)
    lsf = LineSpread((-1.08, 3.43), "test")  # sharper than the grid at the blue end
    vals, cols, indptr, sharper = convolution.convolution_entries(
        convolution.log_sampling(wave_in), wave_out, lsf, R_GRID)
    assert 0 < sharper < 1
    ln_in, dln = np.log(wave_in), np.gradient(np.log(wave_in))
    excess = (lsf.fwhm(wave_out) / wave_out / FWHM_PER_SIGMA) ** 2 - (
        1.0 / (R_GRID * FWHM_PER_SIGMA)) ** 2
    floor = 0.5 * np.interp(np.log(wave_out), ln_in, dln)
    for j, sigma in enumerate(np.sqrt(np.maximum(excess, floor**2))):
        centre = np.log(wave_out[j])
        row = np.flatnonzero(np.abs(ln_in - centre) <= 5.0 * sigma)
        u = (ln_in[row] - centre) / sigma
        weights = np.exp(-0.5 * u * u) * dln[row]
        np.testing.assert_array_equal(cols[indptr[j]:indptr[j + 1]], row)
        np.testing.assert_array_equal(vals[indptr[j]:indptr[j + 1]],
                                      weights / np.add.accumulate(weights)[-1])


def test_convolution_entries_in_float32_are_the_float64_ones_rounded(cube):
    """Issue 14: the library operators' entries computed in float32 (their Gaussians' exp
    is SIMD) are those of float64 to ~1e-6 of themselves, on the same columns, their rows
    summing to 1; the library's operator is built so."""
    wave_in = np.exp(np.arange(np.log(3000.0), np.log(9500.0), 1.0 / (2.3 * R_GRID)))
    wave_out = np.linspace(3600.0, 9000.0, 700)
    lsf = LineSpread((-1.08, 3.43), "test")
    log_in = convolution.log_sampling(wave_in)
    want = convolution.convolution_entries(log_in, wave_out, lsf, R_GRID)
    got = convolution.convolution_entries(log_in, wave_out, lsf, R_GRID, np.float32)
    assert got[0].dtype == np.float32 and want[0].dtype == np.float64
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got[0], want[0], rtol=3e-6, atol=0)
    assert not np.array_equal(got[0], want[0].astype(np.float32))  # computed in float32
    sums = np.add.reduceat(got[0].astype(np.float64), got[2][:-1])
    np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    library = _library(cube, cache_dir=False)
    wave, lsf = np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0)
    matrix, *_ = templates._library_operator(library, wave, lsf)
    vals = convolution.convolution_entries(
        templates._library_log_sampling(library), np.round(wave, 6), lsf,
        float(library.attrs["resolving_power"]), np.float32)[0]
    np.testing.assert_array_equal(matrix.data, vals)


def test_instrument_sharper_than_grid_warns():
    grid = _grid(1).assign_attrs(resolving_power=500.0)
    with pytest.warns(FluxCalWarning, match="sharper than the grid's resolution R = 500"):
        prepare_templates(grid, np.linspace(4000, 8000, 800), LineSpread.constant(2.0))


def test_cache_reuses_in_memory_and_on_disk(tmp_path):
    clear_cache()
    grid = _grid(2)
    wave = np.linspace(3500, 9000, 800)
    lsf = LineSpread.constant(8.0)
    a = prepared_templates(grid, wave, lsf, cache_dir=tmp_path)
    b = prepared_templates(grid, wave, lsf, cache_dir=tmp_path)
    assert a is b
    stores = list(tmp_path.glob("prepared-*.zarr"))
    assert len(stores) == 1
    clear_cache()
    c = prepared_templates(grid, wave, lsf, cache_dir=tmp_path)  # read back from Zarr
    xr.testing.assert_allclose(a["flux"], c["flux"])
    other = prepared_templates(grid, wave, LineSpread.constant(6.0), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("prepared-*.zarr"))) == 2
    assert not np.allclose(other["flux"].values, a["flux"].values)


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_damaged_cache_store_is_rebuilt_with_a_note(tmp_path, damage):
    """Issue 16: a cached prepared cube missing a chunk read as NaN templates ('no usable
    template' on every run, nothing pointing at the cache); a garbage chunk was an internal
    error. The cache is rebuilt, with a note naming it."""
    clear_cache()
    grid = _grid(3)
    wave = np.linspace(3500, 9000, 800)
    lsf = LineSpread.constant(8.0)
    fresh = prepared_templates(grid, wave, lsf, cache_dir=tmp_path).copy(deep=True)
    (store,) = tmp_path.glob("prepared-*.zarr")
    chunk = next(p for p in sorted((store / "flux").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    if damage == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(b"garbage")
    clear_cache()
    with pytest.warns(FluxCalWarning, match=rf"{store.name}: damaged prepared-template cache "
                                            r"\(variable flux chunk c/.*\); rebuilt"):
        again = prepared_templates(grid, wave, lsf, cache_dir=tmp_path)
    xr.testing.assert_equal(again["flux"], fresh["flux"])
    clear_cache()
    xr.testing.assert_equal(prepared_templates(grid, wave, lsf, cache_dir=tmp_path)["flux"],
                            fresh["flux"])  # the rebuilt store is whole


# ----------------------------------------------------------------------------- library cache


@pytest.fixture(scope="module")
def cube(small_grid, tmp_path_factory):
    return build_grid(small_grid, tmp_path_factory.mktemp("cube") / "grid.zarr", progress=False)


def _library(cube, **kwargs):
    wave_range = library_range(np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0))
    return prepare_library(open_grid(cube), wave_range, **kwargs)


@pytest.mark.parametrize("wave_range", [(9000.0, 4000.0), (100.0, 200.0), (1e6, 2e6)])
def test_a_range_outside_the_grid_is_a_grid_error(cube, wave_range):
    """A reversed range, or one outside the grid, was an IndexError deep in the build."""
    with pytest.raises(GridError, match="has no part in the grid's"):
        prepare_library(open_grid(cube), wave_range, cache_dir=False)


def _no_build(*args, **kwargs):
    raise AssertionError("the library was prepared again instead of read from the disk cache")


def test_library_kept_on_disk_by_default_and_read_back(cube, tmp_path, monkeypatch):
    """Issue 14: the library (continuum fits of every template, seconds) is prepared once per
    machine, not once per process: a later process reads the store."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    clear_cache()
    first = _library(cube)
    (store,) = (tmp_path / "cache").glob("library-*.zarr")
    assert store.name == f"library-{first.attrs['library_key']}.zarr"
    clear_cache()  # as a new process
    monkeypatch.setattr(templates, "_build_library", _no_build)
    again = _library(cube)
    xr.testing.assert_identical(again.drop_attrs(), first.drop_attrs())
    assert again.attrs["library_key"] == first.attrs["library_key"]
    assert not list((tmp_path / "cache").glob(".kspec-tmp-*"))  # published, nothing left


def test_library_carries_the_extinction_slope_zero_for_an_older_grid(cube):
    """The library's ``ext_slope`` is the grid's, per template; a grid built before it
    existed (none in the store) gives a library whose reddening is linear, as then."""
    clear_cache()
    wave_range = library_range(np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0))
    grid = open_grid(cube)
    library = prepare_library(grid, wave_range, cache_dir=False)
    stacked = grid["ext_slope"].stack(template=PARAMS).transpose("template", "law", "band")
    present = grid["exists"].stack(template=PARAMS).values
    np.testing.assert_array_equal(library["ext_slope"].values, stacked.values[present])
    assert np.all(library["ext_slope"].sel(band="panstarrs-g").values < 0)
    clear_cache()
    older = prepare_library(grid.drop_vars("ext_slope"), wave_range, cache_dir=False)
    assert np.all(older["ext_slope"].values == 0)
    xr.testing.assert_identical(older["ext_coeff"], library["ext_coeff"])


def test_library_arrays_are_the_library_values_read_only_and_kept(cube, tmp_path):
    clear_cache()
    library = _library(cube, cache_dir=tmp_path)
    arrays = library_arrays(library)
    assert library_arrays(library) is arrays  # looked up once per library
    for name in ("teff", "template_logg", "template_index"):
        np.testing.assert_array_equal(arrays[name], library[name].values)
        assert not arrays[name].flags.writeable
    assert library[name].values.flags.writeable  # the library's own arrays untouched


def test_library_columns_equal_whether_gathered_by_rows_or_from_the_transposed_copy(
        cube, tmp_path, monkeypatch):
    """Issue 14: many templates (an exposure's candidates) are taken as columns of a
    transposed copy of the library, a few (corners) as rows: the same values either way."""
    clear_cache()
    library = _library(cube, cache_dir=tmp_path)
    wave, lsf = np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0)
    n = library.sizes["template"]
    assert n >= 3
    picks = [np.array([n - 1, 0, n // 2]), slice(1, n), np.arange(n), None]

    def columns():
        return [templates.library_columns(library, wave, lsf, ids) for ids in picks]

    monkeypatch.setattr(templates, "_TRANSPOSED_FROM", 10**9)
    by_rows = columns()
    assert not len(templates._TRANSPOSED)
    monkeypatch.setattr(templates, "_TRANSPOSED_FROM", 1)
    for got, want in zip(columns(), by_rows, strict=True):
        assert got.shape == want.shape == (wave.size, want.shape[1])
        np.testing.assert_array_equal(got, want)
    assert len(templates._TRANSPOSED) == 1  # made once, kept
    clear_cache()
    assert not len(templates._TRANSPOSED)


def test_exposure_templates_are_kept_in_the_library_dtype(cube):
    """Issue 14: an exposure's templates are kept as the library gives them (float32: half
    the memory of float64), given as float64 by ``fetch`` and as kept by ``stored`` (what
    the scores and interpolations sum in float64 themselves)."""
    from kspec_fluxcal.fit.exposure_templates import ExposureTemplates

    library = _library(cube, cache_dir=False)
    wave, lsf = np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0)
    n = library.sizes["template"]
    tm = ExposureTemplates(library, wave, lsf, [n - 1])
    every = np.arange(n)
    stored = tm.stored(every)
    assert stored.dtype == templates.SPECTRA_DTYPE == library["norm"].dtype == np.float32
    assert not stored.flags.writeable  # a view of what is kept, not a copy
    np.testing.assert_array_equal(tm(every), stored)
    fetched = tm.fetch(every[::-1])
    assert fetched.dtype == np.float64
    np.testing.assert_array_equal(fetched, templates.library_spectra(library, wave, lsf)[::-1])


def test_library_bands_are_the_columns_by_bands_of_pixels(cube, monkeypatch):
    """Issue 14: many templates' product comes a band of pixels at a time (each band's
    columns copied into rows while in the cache): the bands cover every pixel once, in
    order, the last one partial, and hold library_columns' values to the bit; a few
    templates come as one product."""
    clear_cache()  # no operator whose bands were made at another size
    library = _library(cube, cache_dir=False)
    wave, lsf = np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0)
    n = library.sizes["template"]
    monkeypatch.setattr(templates, "_PIXEL_BAND", 7)
    monkeypatch.setattr(templates, "_TRANSPOSED_FROM", 2)
    for ids in (slice(None), np.array([n - 1, 0, n // 2])):
        want = templates.library_columns(library, wave, lsf, ids)
        bands = list(templates.library_bands(library, wave, lsf, ids))
        assert [b[0] for b in bands] == [slice(s, min(s + 7, wave.size))
                                         for s in range(0, wave.size, 7)]
        np.testing.assert_array_equal(np.concatenate([b[1] for b in bands]), want)
    monkeypatch.setattr(templates, "_TRANSPOSED_FROM", 4)
    (pixels, columns), = templates.library_bands(library, wave, lsf, [1, 0])
    assert pixels == slice(None)
    np.testing.assert_array_equal(columns, templates.library_columns(library, wave, lsf, [1, 0]))
    clear_cache()


def test_exposure_templates_rows_put_by_bands_of_pixels(cube, monkeypatch):
    """Issue 14: the rows asked for (consecutive: a slice; or scattered) get their templates
    band by band, exactly library_spectra's, and no other row is touched."""
    from kspec_fluxcal.fit.exposure_templates import ExposureTemplates

    clear_cache()
    library = _library(cube, cache_dir=False)
    wave, lsf = np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0)
    n = library.sizes["template"]
    monkeypatch.setattr(templates, "_PIXEL_BAND", 7)
    monkeypatch.setattr(templates, "_TRANSPOSED_FROM", 2)
    want = templates.library_spectra(library, wave, lsf).astype(templates.SPECTRA_DTYPE)
    for ids in (np.arange(1, 3), np.array([n - 1, 0])):
        tm = ExposureTemplates(library, wave, lsf, [])
        tm._data[:] = -1.0
        tm._prepare(ids)
        untouched = np.setdiff1d(np.arange(n), ids)
        assert untouched.size > n // 2  # not the whole library's product
        np.testing.assert_array_equal(tm._data[ids], want[ids])
        assert np.all(tm._data[untouched] == -1.0)
    clear_cache()


def test_exposure_templates_table_prepares_the_rows_asked_for_only(cube):
    """Issue 14: ``table`` gives every row as kept (a read-only view, no gather), the rows
    asked for prepared and no other; the lattices' scores read their corners from it, the
    same scores as from the templates themselves."""
    from kspec_fluxcal.fit.exposure_templates import ExposureTemplates, lattice
    from kspec_fluxcal.fit.refinement import score_points

    library = _library(cube, cache_dir=False)
    wave, lsf = np.linspace(4000.0, 8000.0, 500), LineSpread.constant(8.0)
    n = library.sizes["template"]
    tm = ExposureTemplates(library, wave, lsf, [])
    table = tm.table(np.array([n - 1, 0, n - 1]))
    assert table.shape == (n, wave.size) and not table.flags.writeable
    assert np.shares_memory(table, tm.table([]))  # what is kept, not a copy
    assert np.flatnonzero(tm._have).tolist() == [0, n - 1]
    every = templates.library_spectra(library, wave, lsf).astype(templates.SPECTRA_DTYPE)
    np.testing.assert_array_equal(table[[0, n - 1]], every[[0, n - 1]])
    # score_points on the table: the scores of the templates given as an array
    axes, index = lattice(library)
    arrays = library_arrays(library)
    start = np.array([[arrays[f"template_{p}"][n // 2] for p in PARAMS]])
    points = start[:, None, :] + np.linspace(0.0, 0.4, 5)[None, :, None] * np.array(
        [[[np.ptp(axes[p]) / max(len(axes[p]) - 1, 1) for p in PARAMS]]])
    star = every[n // 2][None].astype(float)
    args = (star, np.ones_like(star), None, index, axes, points, np.zeros(1), wave)
    fresh = ExposureTemplates(library, wave, lsf, [])
    got = score_points(*args[:2], fresh, *args[3:])
    want = score_points(*args[:2], every, *args[3:])
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    assert 0 < fresh._have.sum() < n  # the corners only


def _trial_models(library, wave, lsf, ids, weights, factors):
    """What the width fit's trials were: each template at each width, then combined."""
    return np.stack([weights @ templates.library_spectra(library, wave, lsf.scaled(f), ids)
                     for f in factors])


@pytest.mark.parametrize("lsf", [LineSpread.constant(8.0), LineSpread((-1.0, 3.0), "test")])
def test_library_models_are_the_templates_combined_at_each_width(cube, lsf):
    """Issue 14: the width fit's trial models (a few stars' interpolated models at 0.9 and
    1.1 x the line spread) are the combination of their templates at each width (within
    float32's rounding: kernels and sums in float32, the narrower width's kernels reaching
    further into their 1e-6 tails), each model convolved once, on one set of entries; a line
    spread sharper than the library at a width warns as the library's templates do."""
    library = _library(cube, cache_dir=False)
    wave = np.linspace(4000.0, 8000.0, 500)
    n = library.sizes["template"]
    ids = np.array([0, n // 2, n - 1])
    weights = np.array([[0.25, 0.75, 0.0], [0.5, -0.25, 0.75]])  # a response's negative one
    factors = np.array([0.9, 1.1])
    with warnings.catch_warnings(record=True) as got_warnings:
        warnings.simplefilter("always")
        got = templates.library_models(library, wave, lsf, ids, weights, factors)
    with warnings.catch_warnings(record=True) as want_warnings:
        warnings.simplefilter("always")
        want = _trial_models(library, wave, lsf, ids, weights, factors)
    assert got.shape == want.shape == (2, 2, wave.size) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    assert [str(w.message) for w in got_warnings] == [str(w.message) for w in want_warnings]
    assert bool(got_warnings) == (lsf.coeffs[0] < 0)  # the test line spread is sharp in the blue
    assert all(w.filename == __file__ for w in got_warnings)


def test_gaussian_widths_are_the_operators_of_each_width(cube):
    """Each width of ``gaussian_widths`` is the product of ``gaussian_rows``' operator at that
    width (float32's rounding apart), its ``sharper`` the operator's."""
    wave_in = np.exp(np.arange(np.log(3000.0), np.log(9500.0), 1.0 / (2.3 * R_GRID)))
    log_in = convolution.log_sampling(wave_in)
    ln_out = np.log(np.linspace(3600.0, 9000.0, 700))
    spectra = np.stack([1.0 - 0.5 * np.exp(-0.5 * ((wave_in - c) / 2.0) ** 2)
                        for c in LINES], axis=1)  # (nin, 3)
    sig = 1.0 / (np.exp(ln_out) / 2.0 * FWHM_PER_SIGMA)
    excesses = np.stack([(f * sig) ** 2 - (1.0 / (R_GRID * FWHM_PER_SIGMA)) ** 2
                         for f in (0.2, 0.9, 1.1)])  # 0.2: sharper than the input in the red
    out, sharper = convolution.gaussian_widths(log_in, ln_out, excesses, spectra)
    assert out.shape == (3, ln_out.size, 3)
    for k, excess in enumerate(excesses):
        vals, cols, indptr, frac = convolution.gaussian_rows(log_in, ln_out, excess)
        matrix = scipy.sparse.csr_matrix((vals, cols, indptr),
                                         shape=(ln_out.size, wave_in.size))
        assert sharper[k] == frac
        np.testing.assert_allclose(out[k], matrix @ spectra, rtol=1e-6, atol=0)
    assert sharper[0] > 0 == sharper[2]
    # entries made for a wider width (the trials', taken by the final model's width): the
    # same products; made for the widest, what gaussian_widths makes itself
    wider = convolution.width_entries(log_in, ln_out, (1.2 * sig) ** 2)
    again, again_sharper = convolution.gaussian_widths(log_in, ln_out, excesses, spectra, wider)
    np.testing.assert_allclose(again, out, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(again_sharper, sharper)
    counts, cols, indptr, _ = convolution.width_entries(log_in, ln_out, excesses[2])
    want = convolution.gaussian_rows(log_in, ln_out, excesses[2])
    np.testing.assert_array_equal(cols, want[1])
    np.testing.assert_array_equal(indptr, want[2])
    np.testing.assert_array_equal(counts, np.diff(want[2]))


@pytest.mark.parametrize("count", [1, 3, 6])
def test_gaussian_widths_of_a_few_spectra_one_by_one_to_the_last_bit(count, monkeypatch):
    """A few spectra multiplied one by one give what scipy's several-vector product gives
    them (the same sums in the same order), bit for bit."""
    rng = np.random.default_rng(3)
    wave_in = np.exp(np.arange(np.log(3000.0), np.log(9500.0), 1.0 / (2.3 * R_GRID)))
    log_in = convolution.log_sampling(wave_in)
    ln_out = np.log(np.linspace(3600.0, 9000.0, 700))
    spectra = (1.0 - 0.5 * rng.random((count, wave_in.size))).astype(np.float32).T
    sig = 1.0 / (np.exp(ln_out) / 2.0 * FWHM_PER_SIGMA)
    excesses = np.stack([(f * sig) ** 2 for f in (0.9, 1.1)])
    mine = convolution.gaussian_widths(log_in, ln_out, excesses, spectra)
    monkeypatch.setattr(convolution, "_ONE_BY_ONE", 0)
    several = convolution.gaussian_widths(log_in, ln_out, excesses, spectra)
    assert mine[0].shape == (2, ln_out.size, count)
    assert np.array_equal(mine[0], several[0]) and np.array_equal(mine[1], several[1])


def test_library_cache_off_and_explicit_directory(cube, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "off")
    clear_cache()
    _library(cube)
    clear_cache()
    _library(cube, cache_dir=tmp_path / "given")
    assert [p.name[:8] for p in (tmp_path / "given").iterdir()] == ["library-"]
    clear_cache()
    monkeypatch.setattr(templates, "_build_library", _no_build)
    with pytest.raises(AssertionError, match="prepared again"):
        _library(cube, cache_dir=False)  # in memory only: nothing read from disk


def test_default_cache_location(tmp_path, monkeypatch):
    store = tmp_path / "grids" / "grid.zarr"
    store.mkdir(parents=True)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir(store) == tmp_path / "mine"
    for off in ("off", "", "none"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert default_cache_dir(store) is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(store) == tmp_path / "grids" / ".kspec-cache"
    assert default_cache_dir(None) == tmp_path / "xdg" / "kspec-fluxcal"
    monkeypatch.setattr(template_cache.os, "access", lambda path, mode: False)  # a read-only grid
    assert default_cache_dir(store) == tmp_path / "xdg" / "kspec-fluxcal"


@pytest.mark.parametrize("damage", ["missing", "garbage", "other"])
def test_damaged_library_store_is_rebuilt_with_a_note(cube, tmp_path, damage):
    clear_cache()
    fresh = _library(cube, cache_dir=tmp_path)
    (store,) = tmp_path.glob("library-*.zarr")
    chunk = next(p for p in sorted((store / "norm").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    if damage == "missing":
        chunk.unlink()
        problem = r"variable norm chunk c/.*missing"
    elif damage == "garbage":
        chunk.write_bytes(b"garbage")
        problem = r"variable norm chunk c/.*unreadable"
    else:  # another library's store under this name (a copied cache directory)
        import zarr

        zarr.open_group(store, mode="r+").attrs["library_key"] = "0123456789abcdef"
        problem = "not the template library"
    clear_cache()
    with pytest.warns(FluxCalWarning, match=rf"{store.name}: damaged template-library cache "
                                            rf"\({problem}.*\); rebuilt"):
        again = _library(cube, cache_dir=tmp_path)
    xr.testing.assert_identical(again.drop_attrs(), fresh.drop_attrs())
    clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FluxCalWarning)  # the rebuilt store is whole
        xr.testing.assert_identical(_library(cube, cache_dir=tmp_path).drop_attrs(),
                                    fresh.drop_attrs())


def test_a_writer_whose_store_another_published_first_leaves_nothing_behind(tmp_path,
                                                                          monkeypatch):
    """The race behind concurrent cache writers, made certain: writer A moves the old store
    aside, writer B publishes its own, then A's rename finds the place taken. B's complete
    store stands, A's and the old one are removed, nothing half-written stays."""
    import os
    from pathlib import Path

    from kspec_fluxcal._atomic import TEMP_PREFIX, atomic_directory

    path = tmp_path / "store"
    path.mkdir()
    (path / "v").write_text("old")
    real_replace = os.replace

    def racing(src, dst):
        if Path(src).name.startswith(TEMP_PREFIX + "store.") and not path.exists():
            other = tmp_path / "other"
            other.mkdir()
            (other / "v").write_text("B")
            real_replace(other, path)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing)
    with atomic_directory(path, overwrite=True) as tmp:
        (tmp / "v").write_text("A")
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    assert (path / "v").read_text() == "B"


def test_concurrent_cache_writers_publish_one_whole_store(cube, tmp_path):
    """Jobs sharing a cache may prepare the same library at once: each writes its own
    temporary store and renames it into place; whichever wins, the store is whole."""
    clear_cache()
    library = _library(cube, cache_dir=False)
    path = tmp_path / f"library-{library.attrs['library_key']}.zarr"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: templates._write_cached(library, path), range(8)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    back = templates._read_cached(path, templates.LIBRARY_VARIABLES)
    xr.testing.assert_identical(back.drop_attrs(), library.drop_attrs())


def test_unwritable_cache_costs_a_note_not_the_calibration(cube, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    clear_cache()
    with pytest.warns(FluxCalWarning, match="cannot keep a template cache there"):
        library = _library(cube, cache_dir=blocker / "cache")
    assert library.sizes["template"] > 0


# ----------------------------------------------------------------------------- pre-blurred

#: An IsoPlane-320-like exposure: 1340 pixels of 3.7 A, a line spread of 10 A (~6 x the small
#: grid's lambda / R).
ISO_WAVE = np.linspace(3500.0, 8500.0, 1340)
ISO_LSF = LineSpread.constant(10.0)


def _iso_libraries(cube, line_spreads=(ISO_LSF,), config=None):
    """The library serving ISO_WAVE, and the same pre-blurred for ``line_spreads``."""
    grid, wave_range = open_grid(cube), library_range(ISO_WAVE, ISO_LSF)
    return (prepare_library(grid, wave_range, config, cache_dir=False),
            prepare_library(grid, wave_range, config, cache_dir=False,
                            line_spreads=line_spreads))


def test_preblurred_templates_equal_the_unblurred_and_narrow_asks_fall_back(cube):
    """Issue 14: a library pre-blurred for the IsoPlane's line spread (a fifth of the samples
    or fewer, the library's own arrays shared) gives the unblurred library's templates within
    1e-4 (relative, each pixel) at the widths the fit asks, 0.9-1.1 x the header's and up to
    the 1.25 x a width fit may give; asks below the rungs' margin (a width fitted at 0.75 or
    0.85 x) are served by the unblurred library, bit for bit."""
    clear_cache()
    base, blurred = _iso_libraries(cube)
    rungs = ".".join(str(n) for n in blurred.attrs["blur_rungs"])
    assert blurred.attrs["library_key"] == f"{base.attrs['library_key']}-blur{rungs}"
    assert blurred.sizes["blurred_wavelength"] < 0.25 * base.sizes["wavelength"]
    assert np.shares_memory(blurred["norm"].values, base["norm"].values)

    def both(lsf, kind):
        return [templates.library_columns(library, ISO_WAVE, lsf, kind=kind)
                for library in (blurred, base)]

    for factor in (0.9, 1.0, 1.1, 1.25):
        lsf = ISO_LSF.scaled(factor)
        assert templates._library_operator(blurred, ISO_WAVE, lsf)[2] == "blurred_"
        for kind in ("norm", "flux"):
            got, want = both(lsf, kind)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=0, err_msg=f"{factor}")
    for factor in (0.75, 0.85):
        lsf = ISO_LSF.scaled(factor)
        assert templates._library_operator(blurred, ISO_WAVE, lsf)[2] == ""
        np.testing.assert_array_equal(*both(lsf, "norm"))


def test_exposure_templates_models_are_their_templates_combined(cube):
    """Issue 14: the final models (a few stars' combinations of their corners, flux and
    norm) are the combination of the templates at the exposure's line spread within
    float32's rounding: at a line spread whose operator is not kept (a fitted width) no
    operator is built for them, and where it is kept, its product gives them."""
    from kspec_fluxcal.fit.exposure_templates import ExposureTemplates, corner_combination

    library = _library(cube, cache_dir=False)
    wave, lsf = np.linspace(4000.0, 8000.0, 500), LineSpread.constant(7.0)
    n = library.sizes["template"]
    corners = np.array([[0, n // 2, 0], [n // 2, n - 1, n - 1]])
    ids, weights = corner_combination(corners, np.array([[0.2, 0.3, 0.5], [0.1, 0.4, 0.5]]))
    np.testing.assert_array_equal(ids, [0, n // 2, n - 1])
    np.testing.assert_allclose(weights, [[0.7, 0.3, 0.0], [0.0, 0.1, 0.9]], rtol=1e-15)
    tm = ExposureTemplates(library, wave, lsf, [])
    clear_cache()
    got = tm.models(ids, weights, ("flux", "norm"))
    assert len(templates._OPERATORS) == 0
    want = np.concatenate([weights @ tm.flux(ids), weights @ tm.fetch(ids)])
    assert got.shape == (4, wave.size) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    assert len(templates._OPERATORS) == 1
    np.testing.assert_allclose(tm.models(ids, weights, ("norm",)), want[2:], rtol=1e-6, atol=0)
    # at a width within the width fit's trials, on their kernel entries (kept, not made again)
    trials = templates.library_models(library, wave, lsf, ids, weights, [0.9, 1.1])
    kept = templates._WIDTH_ENTRIES.get(templates._operator_key(library, np.round(wave, 6), None))
    fitted = ExposureTemplates(library, wave, lsf.scaled(1.04), [])
    got = fitted.models(ids, weights)
    assert templates._WIDTH_ENTRIES.get(
        templates._operator_key(library, np.round(wave, 6), None)) is kept
    assert len(templates._OPERATORS) == 1 and trials.shape == (2, 2, wave.size)
    np.testing.assert_allclose(got, weights @ fitted.fetch(ids), rtol=2e-6, atol=0)


def test_library_models_of_a_preblurred_library_are_its_templates_combined(cube):
    """Issue 14: the width fit's trial models from a pre-blurred library are its templates
    (blurred samples where they serve the width) combined, to float32's rounding."""
    clear_cache()
    _, blurred = _iso_libraries(cube)
    ids, weights = np.array([1, 0]), np.array([[0.4, 0.6]])
    factors = np.array([0.85, 0.9, 1.1])  # 0.85: the unblurred library serves it
    np.testing.assert_allclose(
        templates.library_models(blurred, ISO_WAVE, ISO_LSF, ids, weights, factors),
        _trial_models(blurred, ISO_WAVE, ISO_LSF, ids, weights, factors), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["4096 pixels", "coarse grid"])
def test_no_preblur_where_it_does_not_pay(cube, case):
    """At 4096 pixels (a K-SPEC exposure's line spread, 1.7 x the grid's lambda / R at the red
    end) and with a grid as coarse as the line spread (CK04: R = 500, sampled every 20 A) the
    library serving an exposure is the unblurred one, as before pre-blurring existed."""
    clear_cache()
    grid, lsf = open_grid(cube), ISO_LSF
    if case == "4096 pixels":
        lsf = LineSpread((5.35, -9.77, 8.13), "FWHMPC")
    else:
        grid = grid.isel(wavelength=slice(None, None, 16)).assign_attrs(
            resolving_power=500.0, build_plan="coarse")
        assert np.median(np.diff(grid["wavelength"].values)) > 5.0
    wave_range = library_range(ISO_WAVE, lsf)
    base = prepare_library(grid, wave_range, cache_dir=False)
    assert prepare_library(grid, wave_range, cache_dir=False, line_spreads=[lsf]) is base


def test_preblur_rungs_follow_the_narrowest_line_spread_served(cube):
    """A configuration's library (the survey's library task) is pre-blurred for the narrowest
    of its exposures' line spreads; with [instrument] fwhm, for that one (what every
    exposure's fit then asks for)."""
    from kspec_fluxcal.config import Config

    clear_cache()
    wide = LineSpread.constant(14.0)
    rungs = {name: _iso_libraries(cube, spreads, config)[1].attrs["blur_rungs"]
             for name, spreads, config in (
                 ("narrow", [ISO_LSF], None), ("both", [wide, ISO_LSF], None),
                 ("wide", [wide], None),
                 ("configured", [ISO_LSF], Config().replace(instrument__fwhm=14.0)))}
    assert rungs["both"] == rungs["narrow"] != rungs["wide"] == rungs["configured"]


def test_reference_templates_nearest_to_teff_or_the_median_without_one(cube):
    """Issue 14: a star's reference is the template nearest (Teff, 4.5, 0, 0), a star
    without Teff the one at the library's median Teff (taken only then), the same either way
    the stars come."""
    from kspec_fluxcal.fit.exposure_templates import reference_templates

    library = _library(cube, cache_dir=False)
    arrays = library_arrays(library)
    t, g, m, a = (arrays[f"template_{p}"] for p in PARAMS)

    def nearest(teff):
        return np.argmin(((t - teff) / 250.0) ** 2 + ((g - 4.5) / 0.5) ** 2 + (m / 0.25) ** 2
                         + (a / 0.25) ** 2)

    teff = np.array([t.min(), t.max(), np.nan])
    want = [nearest(t.min()), nearest(t.max()), nearest(np.median(t))]
    assert reference_templates(library, teff).tolist() == want
    assert reference_templates(library, teff[:2]).tolist() == want[:2]
    assert reference_templates(library, [float(t.max())]).tolist() == want[1:2]
