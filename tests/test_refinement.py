import numpy as np
import pytest
import scipy.sparse

from kspec_fluxcal.fit.refinement import canonical_weights


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_canonical_weights_are_scipys_matrix_to_the_bit(dtype):
    """Unsorted columns, duplicates (summed in ``dtype``), empty rows and a negative entry:
    the same structure and values as scipy's own construction from (row, col) pairs."""
    rng = np.random.default_rng(3)
    rows = np.sort(rng.integers(0, 7, 60))
    rows = rows[rows != 4]  # an empty row
    cols = rng.integers(0, 11, rows.size)
    values = rng.normal(size=rows.size) / 3
    expected = scipy.sparse.csr_matrix((values.astype(dtype), (rows, cols)), shape=(8, 13))
    got = canonical_weights(values, rows, cols, 8)(13, dtype)
    assert got.shape == (8, 13) and got.dtype == dtype
    assert np.array_equal(got.indptr, expected.indptr)
    assert np.array_equal(got.indices, expected.indices)
    assert got.data.tobytes() == expected.data.tobytes()
    dense = rng.normal(size=(13, 5)).astype(dtype)
    assert (got @ dense).tobytes() == (expected @ dense).tobytes()


def test_canonical_weights_without_entries():
    got = canonical_weights(np.zeros(0), np.zeros(0, int), np.zeros(0, int), 3)(4)
    assert got.shape == (3, 4) and got.nnz == 0


@pytest.mark.parametrize("axis", [[5.0], [3.5, 4.0], [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25],
                                  [5250.0, 5500.0, 5750.0, 6000.0, 6250.0],
                                  [0.1, 0.4, 0.45, 1.3, 1.31, 2.9, 3.0]])
def test_median_step_is_numpys_median_of_the_steps(axis):
    from kspec_fluxcal.fit.refinement import _median_step

    expected = np.median(np.diff(axis)) if len(axis) > 1 else 0.0
    assert np.float64(_median_step(np.array(axis))).tobytes() == np.float64(expected).tobytes()


def test_lattice_offsets():
    from kspec_fluxcal.fit.refinement import _lattice_offsets

    grid = _lattice_offsets(3, 0.5)
    assert grid.shape == (27, 3) and not grid.flags.writeable
    assert np.array_equal(grid[0], [-0.5, -0.5, -0.5]) and np.array_equal(grid[1], [-0.5, -0.5, 0])
    assert np.array_equal(grid[13], [0, 0, 0]) and np.array_equal(grid[3], [-0.5, 0, -0.5])
    assert np.array_equal(grid[9], [0, -0.5, -0.5])
    assert len({tuple(row) for row in _lattice_offsets(5, 1.0 / 3)}) == 125


def test_alpha_groups_index_each_template_and_group_it_by_alpha():
    import xarray as xr

    from kspec_fluxcal.fit.parameter_choice import _alpha_groups

    axes = {"teff": [5000.0, 5500.0, 6000.0], "logg": [4.0, 4.5], "feh": [-0.5, 0.0],
            "alpha": [0.0, 0.4]}
    # templates in an order of their own: (teff, logg, feh, alpha)
    params = np.array([(6000.0, 4.5, 0.0, 0.4), (5000.0, 4.0, -0.5, 0.0),
                       (5500.0, 4.5, -0.5, 0.4), (5500.0, 4.0, 0.0, 0.0)])
    library = xr.Dataset(
        {f"template_{p}": ("template", params[:, k]) for k, p in enumerate(axes)}
        | {"template_index": (tuple(axes), np.full((3, 2, 2, 2), -1))},
        coords={p: (p, np.array(v)) for p, v in axes.items()})
    index, groups = _alpha_groups(library)
    assert np.array_equal(index, [[2, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 1]])
    assert [list(g) for g in groups] == [[1, 3], [0, 2]]
    assert not index.flags.writeable and not any(g.flags.writeable for g in groups)
