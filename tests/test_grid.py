import gzip
import re
import shutil

import numpy as np
import psutil
import pytest
import xarray as xr
from conftest import SHARED_REAL, requires_shared

from kspec_fluxcal.constants import BANDS
from kspec_fluxcal.errors import FluxCalWarning, GridError
from kspec_fluxcal.grid import (
    PARAMS,
    STORE_VARIABLES,
    alpha_response_weights,
    interpolation_weights,
    open_grid,
)
from kspec_fluxcal.grid.build import (
    build_grid,
    parse_bosz_filename,
    read_bosz_spectrum,
    scan_bosz,
)
from kspec_fluxcal.photometry import synthetic_mag
from kspec_fluxcal.sim import write_synthetic_grid


@pytest.fixture(scope="module")
def bosz_dir(tmp_path_factory):
    return write_synthetic_grid(tmp_path_factory.mktemp("bosz") / "bosz", small=True, workers=2)


@pytest.fixture(scope="module")
def cube(bosz_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cube") / "grid.zarr"
    build_grid(bosz_dir, out, wave_min=3000, wave_max=11000, progress=False)
    return out


def test_parse_names():
    p = parse_bosz_filename("bosz2024_mp_t6000_g+4.0_m-0.25_a+0.25_c+0.00_v1_r10000_resam.txt.gz")
    assert p == {"teff": 6000.0, "logg": 4.0, "feh": -0.25, "alpha": 0.25, "carbon": 0.0,
                 "vmicro": 1.0, "atmos": "mp", "resolution": "r10000"}
    name = "bosz2024_ap_t7500_g+4.5_m+0.00_a+0.00_c+0.00_v2_rorig_resam.txt.gz"
    assert parse_bosz_filename(name)["resolution"] == "rorig"
    assert parse_bosz_filename("bosz2024_mp_t6000_g4.0_m+0.00.txt.gz") is None


def test_cube_layout_holes_policy_and_provenance(cube, bosz_dir):
    ds = open_grid(cube)
    assert ds["flux"].dims == ("teff", "logg", "feh", "alpha", "wavelength")
    assert ds["flux"].dtype == np.float32 and ds["flux"].chunks is not None
    assert ds["flux"].attrs["units"] == "erg/(s cm2 Angstrom)"
    assert list(ds["teff"].values) == [5500, 6000, 6500, 7000, 7500]
    exists = ds["exists"].values
    assert exists.sum() == 16 and not exists.all()  # the synthetic grid leaves holes
    hole = np.argwhere(~exists)[0]
    assert np.isnan(ds["flux"].values[tuple(hole)]).all()
    assert np.isnan(ds["synth_mag"].values[tuple(hole)]).all()
    assert list(ds["band"].values) == list(BANDS)
    assert ds["wavelength"].values[0] >= 3000 and ds["wavelength"].values[-1] <= 11000
    attrs = ds.attrs
    assert attrs["synthetic"] == 1 and "SYNTHETIC" in attrs["title"]
    assert attrs["n_files"] == 16 and attrs["resolution"] == "r5000"
    assert attrs["resolving_power"] == 5000.0 and attrs["kspec_fluxcal_version"]
    assert "MARCS" in attrs["policy"] and attrs["chosen_atmospheres"] == '["mp"]'
    # 7500 K has both 'mp' and 'ap' files: the MARCS one was chosen.
    scan = scan_bosz(bosz_dir)
    assert any("not chosen" in reason and "_ap_" in str(path) for path, reason in scan["skipped"])


def test_synthetic_mags_equal_direct_computation(cube, bosz_dir):
    ds = open_grid(cube)
    point = dict(teff=6000.0, logg=4.5, feh=-0.5, alpha=0.0)
    scan = scan_bosz(bosz_dir)
    model = next(m for m in scan["models"] if all(m[k] == v for k, v in point.items()))
    wave = np.array(scan["wave_file"].read_bytes().split(), dtype=float)
    flux, _ = read_bosz_spectrum(model["path"], wave.size)
    direct = synthetic_mag(xr.DataArray(flux, dims="wavelength", coords={"wavelength": wave}),
                           list(BANDS))
    stored = ds["synth_mag"].sel(**point)
    np.testing.assert_allclose(stored.values, direct.values, atol=1e-10)
    assert np.isfinite(stored.sel(band="twomass-Ks"))  # from the untrimmed range
    # Reddening coefficients: larger in the blue than in the infrared, of the usual size.
    coeff = ds["ext_coeff"].sel(**point, law="F99")
    assert 3.0 < float(coeff.sel(band="panstarrs-g")) < 4.0
    assert 0.2 < float(coeff.sel(band="twomass-Ks")) < 0.5


def test_rebuild_is_idempotent_and_resumes(bosz_dir, tmp_path, capsys):
    out = tmp_path / "g.zarr"
    build_grid(bosz_dir, out, progress=True)
    first = open_grid(out)["flux"].values
    build_grid(bosz_dir, out, progress=True)
    assert "up to date" in capsys.readouterr().out
    # An interrupted build: the partial store and its state survive, the final store is absent.
    out2 = tmp_path / "h.zarr"
    calls = {"n": 0}
    import kspec_fluxcal.grid.build as gridmod

    original = gridmod._save_state

    def crash_after_two(partial, state):
        original(partial, state)
        calls["n"] += 1
        if calls["n"] == 3:  # the initial state, then two slabs
            raise KeyboardInterrupt

    gridmod._save_state = crash_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            build_grid(bosz_dir, out2, progress=False)
    finally:
        gridmod._save_state = original
    assert not out2.exists()
    with pytest.raises(GridError, match="no such template grid"):
        open_grid(out2)
    build_grid(bosz_dir, out2, progress=True)
    assert "resuming an interrupted build: 2/5" in capsys.readouterr().err
    np.testing.assert_array_equal(open_grid(out2)["flux"].values, first)


def test_pool_build_equals_the_in_process_one(bosz_dir, cube, tmp_path):
    out = build_grid(bosz_dir, tmp_path / "pool.zarr", wave_min=3000, wave_max=11000,
                     workers=2, progress=False)
    xr.testing.assert_identical(open_grid(out).drop_attrs(), open_grid(cube).drop_attrs())
    assert _pool_processes() == []  # the pool ended with the build


def test_bad_file_in_a_pool_build_is_named_and_the_pool_ends(bosz_dir, tmp_path):
    copy = tmp_path / "bosz"
    shutil.copytree(bosz_dir, copy)
    bad = sorted(copy.rglob("*_mp_*.txt.gz"))[3]
    bad.write_bytes(b"not gzip")
    with pytest.raises(GridError, match=rf"{re.escape(bad.name)}: not a readable gzip file"):
        build_grid(copy, tmp_path / "g.zarr", workers=2, progress=False)
    assert _pool_processes() == []


def test_a_bad_file_says_where_the_partial_build_is_kept(bosz_dir, tmp_path):
    copy = tmp_path / "bosz"
    shutil.copytree(bosz_dir, copy)
    sorted(copy.rglob("*_mp_*.txt.gz"))[-1].write_bytes(b"not gzip")
    with pytest.raises(GridError, match=r"kept in .*g\.zarr\.partial for the next build to "
                       r"resume once the file is fixed; delete it to start over"):
        build_grid(copy, tmp_path / "g.zarr", progress=False)


def _one_point_grid(bosz_dir, tmp_path, keep):
    """``bosz_dir`` with only the template files ``keep`` selects (names of the small grid)."""
    copy = tmp_path / "sparse"
    shutil.copytree(bosz_dir, copy)
    for path in copy.rglob("*.txt.gz"):
        if not keep(path.name):
            path.unlink()
    return copy


def test_a_grid_too_sparse_to_fit_with_says_so(bosz_dir, tmp_path):
    one = _one_point_grid(bosz_dir, tmp_path, lambda n: "_t6000_g+4.5_m+0.00_a+0.00" in n)
    with pytest.warns(FluxCalWarning, match="one teff and one logg only"):
        build_grid(one, tmp_path / "one.zarr", progress=False)


def _pool_processes():
    """Child processes of this one, but multiprocessing's resource tracker (it lives as long
    as the process that started it)."""
    children = psutil.Process().children(recursive=True)
    return [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def test_other_inputs_need_overwrite(bosz_dir, cube, tmp_path):
    with pytest.raises(GridError, match="built from other inputs"):
        build_grid(bosz_dir, cube, wave_min=3500, wave_max=9000, progress=False)


def test_malformed_names_skipped_with_warning(bosz_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bosz_dir, copy)
    bad = copy / "r5000" / "m+0.00" / "bosz2024_mp_t6000_gX_broken.txt.gz"
    bad.write_bytes(b"")
    with pytest.warns(FluxCalWarning, match="does not follow the BOSZ 2024 pattern"):
        build_grid(copy, tmp_path / "g.zarr", progress=False)


@pytest.mark.parametrize("damage, match", [
    ("three_columns", r"row 1: has 3 columns, expected 2"),
    ("nan", r"row 5: non-finite value"),
    ("short", r"has 9 rows, the wavelength file has 10"),
    ("garbage", "not a readable gzip file"),
])
def test_bad_spectrum_files(tmp_path, damage, match):
    path = tmp_path / "f.txt.gz"
    rows = ["1.0e+00 2.0e+00"] * 10
    if damage == "three_columns":
        rows[0] = "1 2 3"
    elif damage == "nan":
        rows[4] = "nan 1.0"
    elif damage == "short":
        rows = rows[:9]
    if damage == "garbage":
        path.write_bytes(b"not gzip")
    else:
        path.write_bytes(gzip.compress("\n".join(rows).encode()))
    with pytest.raises(GridError, match=match):
        read_bosz_spectrum(path, 10)


def test_bad_directories(tmp_path):
    with pytest.raises(GridError, match="no such directory"):
        scan_bosz(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GridError, match="no wavelength file"):
        scan_bosz(tmp_path / "empty")
    only_wave = tmp_path / "only"
    only_wave.mkdir()
    (only_wave / "bosz2024_wave_r5000.txt").write_text("1000\n2000\n")
    with pytest.raises(GridError, match="no BOSZ 2024 spectrum files for r5000"):
        scan_bosz(only_wave)


def test_template_grid_accessor(cube):
    ds = open_grid(cube)
    near = ds.templates.nearest(6120, 4.4, -0.4)
    assert (float(near.teff), float(near.logg), float(near.feh)) == (6000.0, 4.5, -0.5)
    box = ds.templates.box(teff=(5900, 7100), logg=(4.5, 4.5))
    assert list(box.teff.values) == [6000, 6500, 7000] and box.sizes["logg"] == 1
    # Linear interpolation: halfway in Teff is the mean of the two spectra.
    mid = ds.templates.interpolate(6250.0, 4.5, 0.0).compute()
    a = ds["flux"].sel(teff=6000, logg=4.5, feh=0.0, alpha=0.0).values.astype(float)
    b = ds["flux"].sel(teff=6500, logg=4.5, feh=0.0, alpha=0.0).values.astype(float)
    np.testing.assert_allclose(mid["flux"].values[0], 0.5 * (a + b), rtol=1e-6)
    assert mid["synth_mag"].dims == ("point", "band")
    with pytest.raises(ValueError, match="unknown parameter"):
        ds.templates.box(mass=(1, 2))


@requires_shared
def test_real_bosz_files_read_exactly(tmp_path):
    real = SHARED_REAL / "bosz2024_r5000"
    scan = scan_bosz(real)
    assert scan["resolution"] == "r5000" and len(scan["models"]) == 2
    wave = np.array(scan["wave_file"].read_bytes().split(), dtype=float)
    assert wave.size == 75000
    model = next(m for m in scan["models"] if m["teff"] == 6000)
    flux, cont = read_bosz_spectrum(model["path"], wave.size)
    with gzip.open(model["path"], "rt") as fh:
        first = fh.readline().split()
    assert flux[0] == 0.0 and cont[0] == pytest.approx(4 * np.pi * float(first[1]))
    assert cont[0] == pytest.approx(4 * np.pi)  # continuum column 1.0 where the flux is 0
    # Energy: 4 pi integral H = sigma T^4 within 1 % (real BOSZ).
    sigma_t4 = 5.670374419e-5 * 6000.0**4
    assert np.trapezoid(flux, wave) == pytest.approx(sigma_t4, rel=0.01)
    with pytest.warns(FluxCalWarning, match="2 of its 4 grid points are missing"):
        out = build_grid(real, tmp_path / "real.zarr", progress=False)
    ds = open_grid(out)
    assert ds.attrs["synthetic"] == 0 and ds.attrs["chosen_vmicro"] == "[2.0]"
    assert int(ds["exists"].sum()) == 2


def test_build_into_an_empty_directory(bosz_dir, tmp_path):
    """An empty directory as the output is as good as none (it was refused as 'built from
    other inputs' without --overwrite)."""
    out = tmp_path / "empty.zarr"
    out.mkdir()
    build_grid(bosz_dir, out, wave_min=3000, wave_max=11000, progress=False)
    assert open_grid(out)["exists"].any()


def _damaged_copy(cube, tmp_path, variable, chunk, damage):
    store = tmp_path / "grid.zarr"
    shutil.copytree(cube, store)
    path = store / variable / chunk
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x28\xb5\x2f\xfd garbage, not a compressed chunk")
    return store


@pytest.mark.parametrize("variable, chunk", [
    ("flux", "c/2/0/0/0/1"), ("exists", "c/3/0/0/0"), ("synth_mag", "c/0/0/0/0/0"),
    ("ext_coeff", "c/4/0/0/0/0/0"), ("continuum", "c/1/0/0/0/0"),
])
def test_missing_chunk_is_named_at_open(cube, tmp_path, variable, chunk):
    """Issue 16: a store missing a chunk read as NaN templates (or non-existing ones) and the
    fit silently moved to other templates. Checked when opening, by listing keys only."""
    store = _damaged_copy(cube, tmp_path, variable, chunk, "missing")
    with pytest.raises(GridError, match=rf"grid\.zarr: variable {variable} chunk {chunk}: "
                                        r"missing .*rebuild with `kspec-fluxcal grid build`"):
        open_grid(store)


@pytest.mark.parametrize("chunks", [None, False], ids=["dask", "no-dask"])
@pytest.mark.parametrize("variable, chunk, select", [
    ("flux", "c/2/0/0/0/1", {"teff": 2}), ("exists", "c/3/0/0/0", {"teff": 3}),
])
def test_corrupt_chunk_is_named_where_it_is_read(cube, tmp_path, variable, chunk, select,
                                                 chunks):
    """A chunk that does not decode: GridError naming store, variable and chunk (it was
    'internal error (Zstd decompression error)'), when the data are read, with or without
    Dask."""
    store = _damaged_copy(cube, tmp_path, variable, chunk, "garbage")
    grid = open_grid(store, chunks=chunks)
    with pytest.raises(GridError, match=rf"grid\.zarr: variable {variable} chunk {chunk}: "
                                        r"unreadable \(.*\); rebuild with `kspec-fluxcal grid "
                                        r"build`"):
        grid[variable].isel(select).values  # noqa: B018
    # Reading what is intact still works.
    assert np.isfinite(grid["flux"].isel(teff=0, wavelength=slice(0, 10)).values).any()


def test_extinction_slope_gives_the_band_extinction_at_any_reddening(cube):
    """A template's band extinction at E(B-V) = 0.3 from the store's ``ext_coeff`` and
    ``ext_slope`` (:func:`band_extinction`) is that of its spectrum reddened exactly (bands
    inside the cube's range, where its flux gives them); linear in E(B-V) it is not."""
    from kspec_fluxcal.photometric_fit import band_extinction
    from kspec_fluxcal.reddening import extinction_per_ebv

    grid = open_grid(cube)
    point = {p: int(np.argwhere(grid["exists"].values)[0][i]) for i, p in enumerate(PARAMS)}
    flux = grid["flux"].isel(point).load()
    bands = ["panstarrs-g", "panstarrs-r", "panstarrs-i"]
    a_lambda = extinction_per_ebv(flux["wavelength"].values, "F99")
    exact = (synthetic_mag(flux * 10.0 ** (-0.4 * 0.3 * a_lambda), bands)
             - synthetic_mag(flux, bands)).values
    coeff, slope = (grid[name].isel(point).sel(law="F99", band=bands).values
                    for name in ("ext_coeff", "ext_slope"))
    np.testing.assert_allclose(band_extinction(0.3, coeff, slope), exact, atol=5e-4)
    assert np.all(slope < 0)
    assert np.max(np.abs(band_extinction(0.3, coeff) - exact)) > 2e-3


def test_open_without_dask_reads_the_same_values(cube):
    """``chunks=False`` (the calibrate command's opening: no Dask import) reads, lazily, what
    the Dask-backed cube holds."""
    lazy, dasked = open_grid(cube, chunks=False), open_grid(cube)
    assert lazy["flux"].chunks is None and dasked["flux"].chunks is not None
    part = {"teff": slice(1, 3), "wavelength": slice(100, 900, 7)}
    for name in STORE_VARIABLES:
        np.testing.assert_array_equal(lazy[name].isel({k: v for k, v in part.items()
                                                       if k in lazy[name].dims}).values,
                                      dasked[name].isel({k: v for k, v in part.items()
                                                         if k in dasked[name].dims}).values)
    assert lazy.attrs == dasked.attrs and lazy.coords.to_dataset().identical(
        dasked.coords.to_dataset())


# ----------------------------------------------------------------------------- [alpha/M]

ALPHA_AXES = {"teff": np.array([5000.0, 5500.0, 6000.0]), "logg": np.array([4.0, 4.5]),
              "feh": np.array([-1.0, -0.5, 0.0]), "alpha": np.array([0.0, 0.25])}


def _evaluate(index, weight, values):
    return np.sum(np.where(weight != 0, weight * values[tuple(np.moveaxis(index, -1, 0))], 0.0),
                  axis=1)


def test_alpha_response_is_multilinear_where_the_grid_is_complete():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 2, 3, 2))
    exists = np.ones(values.shape, bool)
    points = (rng.uniform(5000, 6000, 50), rng.uniform(4, 4.5, 50), rng.uniform(-1, 0, 50),
              rng.choice([0.0, 0.25, 0.1, 0.2], 50))
    expected = _evaluate(*interpolation_weights(ALPHA_AXES, exists, *points), values)
    np.testing.assert_allclose(_evaluate(*alpha_response_weights(ALPHA_AXES, exists, *points),
                                         values), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.4, 0.5])
@pytest.mark.parametrize("feh", [-0.2, 0.0, -0.7])
def test_alpha_response_is_transferred_into_holes_and_extrapolated(alpha, feh):
    """The synthetic grid (like MARCS) has [alpha/M] +0.25 only for [M/H] <= -0.5: a model
    linear in every parameter is recovered at any [alpha/M] and [M/H] (interpolation_weights
    fell back to [alpha/M] 0 there, and clips beyond +0.25)."""
    values = np.fromfunction(lambda i, j, k, m: 1.0 + i + 2.0 * j + 3.0 * k + 4.0 * m,
                             (3, 2, 3, 2))
    exists = np.ones(values.shape, bool)
    exists[:, :, 2, 1] = False  # no +0.25 at [M/H] 0
    index, weight = alpha_response_weights(ALPHA_AXES, exists, 5200.0, 4.2, feh, alpha)
    expected = 1.0 + 0.4 + 2 * 0.4 + 3 * (feh + 1) / 0.5 + 4 * alpha / 0.25
    assert _evaluate(index, weight, values)[0] == pytest.approx(expected, abs=1e-12)
    assert weight.sum() == pytest.approx(1.0)
    assert exists[tuple(np.moveaxis(index[weight != 0], -1, 0))].all()
    old = _evaluate(*interpolation_weights(ALPHA_AXES, exists, 5200.0, 4.2, feh, alpha), values)
    assert (old[0] == pytest.approx(expected)) == (feh < -0.5 and alpha <= 0.25)


def test_alpha_response_at_nodes_and_single_alpha_grids_is_plain_interpolation():
    exists = np.ones((3, 2, 3, 2), bool)
    exists[0, 0, 0, 0] = False  # a hole: renormalised, as before
    args = (np.array([5100.0, 5600.0]), np.array([4.1, 4.4]), np.array([-0.9, -0.2]))
    for alpha in (0.0, 0.25):
        for a, b in zip(interpolation_weights(ALPHA_AXES, exists, *args, alpha),
                        alpha_response_weights(ALPHA_AXES, exists, *args, alpha), strict=True):
            np.testing.assert_array_equal(a, b)
    single = {**ALPHA_AXES, "alpha": np.array([0.0])}
    for a, b in zip(interpolation_weights(single, exists[..., :1], *args, 0.3),
                    alpha_response_weights(single, exists[..., :1], *args, 0.3), strict=True):
        np.testing.assert_array_equal(a, b)


def _two_points_with_holes():
    """A grid without [alpha/M] 0.25 at its largest [M/H], and two points (the first in a
    cell with that hole)."""
    exists = np.ones((3, 2, 3, 2), bool)
    exists[:, :, 2, 1] = False
    points = (np.array([5200.0, 5700.0]), np.array([4.2, 4.3]), np.array([-0.2, -0.8]),
              np.array([0.1, 0.3]))
    return exists, points


def test_alpha_response_of_points_asked_again_is_the_same_and_the_callers_own():
    """Points asked for again (the fit's chosen parameters, twice) get what they got, as
    arrays of their own (changing one changes no later answer); another grid, other
    points, other nodes get their own answer."""
    from kspec_fluxcal.grid import _RECENT_WEIGHTS

    exists, points = _two_points_with_holes()
    _RECENT_WEIGHTS.clear()
    first = alpha_response_weights(ALPHA_AXES, exists, *points)
    for a in first:
        a[...] = 0
    again = alpha_response_weights(ALPHA_AXES, exists, *points)
    _RECENT_WEIGHTS.clear()
    fresh = alpha_response_weights(ALPHA_AXES, exists, *points)
    for a, b in zip(again, fresh, strict=True):
        assert a.tobytes() == b.tobytes() and a.dtype == b.dtype and a.shape == b.shape
    holes = exists.copy()
    holes[1, 0, 0, 0] = False  # a corner of the second point's cell
    other = alpha_response_weights(ALPHA_AXES, holes, *points)
    assert not np.array_equal(other[1], fresh[1])
    moved = alpha_response_weights(ALPHA_AXES, exists, *points[:3], np.array([0.1, 0.2]))
    assert not np.array_equal(moved[1], fresh[1])
    shifted = {**ALPHA_AXES, "teff": ALPHA_AXES["teff"] + 100.0}
    assert not np.array_equal(alpha_response_weights(shifted, exists, *points)[1], fresh[1])


def test_alpha_response_not_kept_is_the_same_and_neither_looked_up_nor_kept():
    """keep=False (trial points asked for once): the same answer, the cache untouched."""
    from kspec_fluxcal.grid import _RECENT_WEIGHTS

    exists, points = _two_points_with_holes()
    _RECENT_WEIGHTS.clear()
    kept = alpha_response_weights(ALPHA_AXES, exists, *points)
    assert len(_RECENT_WEIGHTS) == 1
    for a in kept:  # a kept answer changed by its caller ...
        a[...] = 0
    fresh = alpha_response_weights(ALPHA_AXES, exists, *points, keep=False)
    assert len(_RECENT_WEIGHTS) == 1  # ... is not what keep=False gives (nor looked up)
    _RECENT_WEIGHTS.clear()
    again = alpha_response_weights(ALPHA_AXES, exists, *points)
    for a, b in zip(again, fresh, strict=True):
        assert a.tobytes() == b.tobytes() and a.dtype == b.dtype and a.shape == b.shape
    alpha_response_weights(ALPHA_AXES, exists, *points[:3], np.array([0.1, 0.2]), keep=False)
    assert len(_RECENT_WEIGHTS) == 1


def test_cell_corners_are_the_product_of_four_factors_to_the_last_bit():
    """_corners (the [alpha/M] corners added to a (teff, logg, [M/H]) cell formed once, as
    alpha_response_weights shares it between the base model and the response's nodes):
    each corner's weight the product of its four factors left to right, its indices the
    lower node plus the corner's bits, clipped to the axes."""
    from kspec_fluxcal.grid import _CORNERS, PARAMS, _corners, _position

    rng = np.random.default_rng(4)
    axes = dict(ALPHA_AXES, logg=np.array([4.5]))  # an axis of one node too
    values = [rng.uniform(axes[p][0] - 0.1, axes[p][-1] + 0.1, 50) for p in PARAMS]
    values[0][:3] = axes["teff"][[0, 1, 2]]  # on nodes, the last included
    values[3][:3] = [0.0, 0.25, 0.1]
    positions = [_position(axes[p], x) for p, x in zip(PARAMS, values, strict=True)]
    index, raw = _corners(axes, positions)
    lo = np.stack([p[0] for p in positions], axis=-1)
    frac = np.stack([p[1] for p in positions], axis=-1)[:, None, :]
    factor = np.where(_CORNERS.astype(bool), frac, 1.0 - frac)
    expected = ((factor[..., 0] * factor[..., 1]) * factor[..., 2]) * factor[..., 3]
    sizes = np.array([len(axes[p]) for p in PARAMS])
    assert raw.tobytes() == expected.tobytes()
    assert np.array_equal(index, np.minimum(lo[:, None, :] + _CORNERS, sizes - 1))
