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
