"""Our B-spline design matrix equals scipy's (which the pipeline no longer imports)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.interpolate
import scipy.sparse

from kspec_fluxcal._bspline import (
    basis_values,
    cached_design_matrix,
    cached_normal_matrix,
    design_matrix,
)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_design_matrix_equals_scipy_on_a_clamped_basis(degree):
    rng = np.random.default_rng(degree)
    inner = np.linspace(0.0, 1.0, 9)
    knots = np.concatenate([[0.0] * degree, inner, [1.0] * degree])
    # Random points, both ends and every knot (interval boundaries are the delicate case).
    x = np.concatenate([[0.0, 1.0], inner, rng.uniform(0.0, 1.0, 300)])
    ours = design_matrix(x, knots, degree)
    theirs = scipy.interpolate.BSpline.design_matrix(x, knots, degree)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), rtol=0, atol=0)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-13)


def test_design_matrix_with_dropped_knots_in_ln_wavelength():
    # As the calibration's response: knots in ln(lambda), some dropped (telluric bands).
    x = np.log(np.linspace(3600.0, 9000.0, 2000))
    inner = np.delete(np.linspace(x[0], x[-1], 25), [8, 9, 17])
    knots = np.concatenate([[x[0]] * 3, inner, [x[-1]] * 3])
    np.testing.assert_allclose(design_matrix(x, knots).toarray(),
                               scipy.interpolate.BSpline.design_matrix(x, knots, 3).toarray(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_cached_normal_matrix_is_the_sparse_product(order):
    # The response's normal matrix, summed over runs of points on the same B-splines: the
    # sparse product's values to rounding (also when the runs come back: unsorted points).
    rng = np.random.default_rng(5)
    x = np.log(np.linspace(3600.0, 9000.0, 3000))
    x = x if order == "sorted" else rng.permutation(x)
    inner = np.delete(np.linspace(x.min(), x.max(), 40), [10, 11, 25])
    knots = np.concatenate([[x.min()] * 3, inner, [x.max()] * 3])
    weights = np.where(rng.uniform(size=x.size) < 0.1, 0.0, rng.lognormal(0.0, 2.0, x.size))
    basis = cached_design_matrix(x, knots)
    expected = (basis.T @ basis.multiply(weights[:, None])).toarray()
    got = cached_normal_matrix(x, knots, weights)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15 * np.abs(expected).max())
    assert np.count_nonzero(expected) == np.count_nonzero(got) > 4 * expected.shape[0]


@pytest.mark.parametrize("method", ["bspline", "polynomial"])
def test_continuum_basis_and_outer_products_are_the_plain_sparse_ones(method):
    """The continuum's basis, built directly in CSR order, and its row-wise outer products
    equal those built from dense arrays (every entry, zeros dropped, columns in order), also
    with points on the knots, where B-splines are exactly zero."""
    from kspec_fluxcal.continuum import _basis, _key

    rng = np.random.default_rng(7)
    x = np.sort(np.concatenate([[0.0, 1.0], np.linspace(0.0, 1.0, 11), rng.uniform(0, 1, 400)]))
    x = np.round(x, 12)  # as the cache key has them
    basis, outer_t, basis_t, _ = _basis(x.size, _key(x), method, 10, 3 if method == "bspline"
                                        else 5)
    dense = basis.toarray()
    if method == "bspline":
        knots = np.concatenate([[0.0] * 3, np.linspace(0.0, 1.0, 11), [1.0] * 3])
        np.testing.assert_array_equal(
            dense, scipy.interpolate.BSpline.design_matrix(x, knots, 3).toarray())
        assert (dense == 0).sum(axis=1).max() > dense.shape[1] - 4  # zeros at the knots
    else:
        np.testing.assert_allclose(dense, np.polynomial.legendre.legvander(2 * x - 1, 5),
                                   rtol=0, atol=0)
    for matrix in (basis, basis_t, outer_t):
        assert matrix.has_sorted_indices and not np.any(matrix.data == 0)
    np.testing.assert_array_equal(basis_t.toarray(), dense.T)
    outer = (dense[:, :, None] * dense[:, None, :]).reshape(x.size, -1)
    upper = np.triu(np.ones((dense.shape[1],) * 2, bool)).ravel()  # (a, b) with a <= b
    np.testing.assert_array_equal(outer_t.toarray(), np.where(upper[:, None], outer.T, 0.0))


@pytest.mark.parametrize("ncol", [2, 5])
@pytest.mark.parametrize("method", ["bspline", "polynomial"])
def test_normal_matrices_are_the_full_outer_products_to_the_last_bit(method, ncol):
    """The normal matrices from the upper outer products, mirrored, are those of the full
    outer products (the lower triangle's own sums), bit for bit, for columns of weights
    (a few: one by one; more: at once)."""
    from kspec_fluxcal.continuum import _basis, _key, normal_matrices

    rng = np.random.default_rng(11)
    x = np.round(np.sort(rng.uniform(0.0, 1.0, 3000)), 12)
    basis, outer_t, _, _ = _basis(x.size, _key(x), method, 14, 3 if method == "bspline"
                                  else 5)
    dense = basis.toarray()
    nb = dense.shape[1]
    full = (dense[:, :, None] * dense[:, None, :]).reshape(x.size, -1)
    full_t = scipy.sparse.csr_matrix(full).T.tocsr()
    columns = (rng.lognormal(0.0, 2.0, (x.size, ncol))
               * (rng.uniform(size=(x.size, ncol)) > 0.2))
    expected = (full_t @ columns).T.reshape(-1, nb, nb)
    normal = normal_matrices(outer_t, columns)
    assert normal.shape == (ncol, nb, nb)
    assert normal.tobytes() == expected.tobytes()
    assert normal_matrices(outer_t, np.ascontiguousarray(columns.T).T).tobytes() == \
        expected.tobytes()  # the transpose of rows


def test_sparse_products_are_scipys_to_the_last_bit():
    """Issue 14: a sparse matrix's products with a few rows, one by one, and with more, at
    once, are scipy's product with all of them, bit for bit (wide and tall matrices)."""
    from kspec_fluxcal.continuum import _ONE_BY_ONE, sparse_products, spline_basis

    rng = np.random.default_rng(12)
    wave = np.linspace(3600.0, 9000.0, 3000)
    basis, outer_t, basis_t, _ = spline_basis(wave, 300.0)
    for matrix in (outer_t, basis_t, basis):
        for nrow in range(1, _ONE_BY_ONE + 3):
            rows = rng.lognormal(0.0, 2.0, (nrow, matrix.shape[1])) * (
                rng.uniform(size=(nrow, matrix.shape[1])) > 0.2)
            expected = (matrix @ np.ascontiguousarray(rows.T)).T
            got = sparse_products(matrix, rows)
            assert got.shape == (nrow, matrix.shape[0])
            assert got.tobytes() == np.ascontiguousarray(expected).tobytes()


def test_sparse_products_keep_float32_to_the_last_bit():
    """Issue 14: a float32 operator's products with float32 rows (a library's operator and
    a few models), one by one up to ``few`` and at once beyond, are scipy's float32 product
    with all of them, bit for bit."""
    from kspec_fluxcal.continuum import sparse_products

    rng = np.random.default_rng(13)
    matrix = scipy.sparse.random(400, 1500, density=0.02, format="csr", random_state=rng,
                                 dtype=np.float32)
    for nrow in range(1, 7):
        rows = rng.lognormal(0.0, 2.0, (nrow, matrix.shape[1])).astype(np.float32)
        expected = np.ascontiguousarray((matrix @ np.ascontiguousarray(rows.T)).T)
        got = sparse_products(matrix, rows, np.float32, few=4)
        assert got.dtype == expected.dtype == np.float32
        assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("size", [1, 2, 7, 64, 1023, 1024, 1025, 4096, 4097])
def test_median_of_one_partition_is_numpys(size):
    """Issue 14: the median from one partition and the largest value below it (many
    values; fewer: two partitions) is the mean of the middle values of the sorted ones (odd
    and even counts, ties, infinities; to the last bit but for the sign of a zero, which a
    partition and a sort may pick either)."""
    from kspec_fluxcal.continuum import _ONE_PARTITION, _median

    assert 64 < _ONE_PARTITION <= 4096  # both ways among the sizes

    rng = np.random.default_rng(size)
    for trial in range(20):
        values = rng.normal(size=size) * 10.0 ** rng.uniform(-3, 3)
        if trial % 2:
            values = np.round(values, 1)  # ties
        if trial % 5 == 0:
            values[rng.random(size) < 0.1] = rng.choice([np.inf, -np.inf])
        ordered = np.sort(values)
        want = 0.5 * (ordered[(size - 1) // 2] + ordered[size // 2])
        assert _median(values.copy()) == want


@pytest.mark.parametrize("on_knots", [False, True])
def test_cached_curve_variance_is_the_sparse_product_to_the_last_bit(on_knots):
    # The response's variance diag(B cov B^T), from B's band: the same sums in the same
    # order as scipy's B.multiply(B @ cov).sum(axis=1); points on knots have zero values.
    from kspec_fluxcal._bspline import cached_curve_variance

    rng = np.random.default_rng(6)
    x = np.log(np.sort(rng.uniform(3600.0, 9000.0, 2500)))
    inner = np.delete(np.linspace(x[0], x[-1], 40), [10, 11, 25])
    if on_knots:
        x = np.sort(np.concatenate([x, inner]))
    knots = np.concatenate([[x[0]] * 3, inner, [x[-1]] * 3])
    basis = cached_design_matrix(x, knots)
    root = rng.normal(size=(basis.shape[1],) * 2)
    cov = root @ root.T
    expected = np.asarray(basis.multiply(basis @ cov).sum(axis=1)).ravel()
    assert cached_curve_variance(x, knots, cov).tobytes() == expected.tobytes()


def test_design_matrix_arrays_are_those_of_the_coo_conversion():
    # Built directly in CSR order: the arrays (zeros at knots kept, columns in order) that
    # scipy's COO -> CSR conversion gives, on which the sums' order of the products rests.
    x = np.log(np.linspace(3600.0, 9000.0, 1500))
    inner = np.delete(np.linspace(x[0], x[-1], 30), [8, 9, 17])
    x = np.sort(np.concatenate([x, inner[3:6]]))
    knots = np.concatenate([[x[0]] * 3, inner, [x[-1]] * 3])
    ours = design_matrix(x, knots)
    first, values, n = basis_values(x, knots)
    cols = (first[:, None] + np.arange(4)[None, :]).ravel()
    coo = scipy.sparse.csr_matrix((values.ravel(), (np.repeat(np.arange(x.size), 4), cols)),
                                  shape=(x.size, n))
    assert np.any(ours.data == 0)
    for name in ("data", "indices", "indptr"):
        got, want = getattr(ours, name), getattr(coo, name)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_spline_basis_is_shared_by_ranges_of_the_same_normalised_pixels():
    """Two exposures whose pixels are the same up to a stretch and shift (knots every 400 A
    give 12 intervals over each range) share one basis, as fit_continuum's fits do; a range
    that needs another number of intervals has its own."""
    from kspec_fluxcal.continuum import fit_continuum, spline_basis

    wave = np.exp(np.linspace(np.log(3600.0), np.log(8500.0), 2000))
    other = 3610.0 + (wave - wave[0]) * 1.002  # 12 intervals of 400 A, as wave's 4900 A
    assert spline_basis(other, 400.0) is spline_basis(wave, 400.0)
    assert spline_basis(other, 400.0)[0].shape[1] == 15
    assert spline_basis(wave[:1000], 400.0) is not spline_basis(wave, 400.0)
    flux = np.random.default_rng(3).lognormal(0.0, 0.1, (2, wave.size))
    assert fit_continuum(flux, other).tobytes() == fit_continuum(flux, wave).tobytes()


def test_continuum_robust_scale_is_the_mad_of_the_used_residuals():
    """Issue 14: the clipping's scale, row by row from partial sorts, is 1.4826 times
    np.nanmedian's MAD of the used residuals to the last bit (odd and even counts, ties),
    inf for a row without used pixels, of NaN residuals (no fit) or of zero scatter."""
    from kspec_fluxcal.continuum import _robust_scale

    rng = np.random.default_rng(5)
    finite = 0
    for trial in range(200):
        resid = rng.normal(size=(4, int(rng.integers(1, 60)))) * 10.0 ** rng.uniform(-3, 3)
        if trial % 3 == 0:
            resid = np.round(resid, 1)  # ties
        use = rng.random(resid.shape) < 0.7
        resid[1] = np.nan  # a spectrum without a fit
        use[2] = False
        resid[3] = 2.5  # no scatter
        kept = np.where(use, resid, np.nan)
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
            mad = np.nanmedian(np.abs(kept - np.nanmedian(kept, axis=1, keepdims=True)),
                               axis=1)
        want = np.where(np.isfinite(mad) & (mad > 0), 1.4826 * mad, np.inf)
        got = _robust_scale(resid, use)
        assert got.shape == (4, 1)
        np.testing.assert_array_equal(got[:, 0], want)
        assert np.isinf(got[1:, 0]).all()
        finite += np.isfinite(got[0, 0])
    assert finite > 100


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_nanmedian_of_a_few_values_is_numpys(axis):
    """Issue 14: medians over 1-3 values (a few stars at every pixel), by a sorting network,
    are np.nanmedian's to the last bit: NaN anywhere (every count), infinities, ties, signed
    zeros; longer axes by the sort."""
    from kspec_fluxcal.continuum import nanmedian

    rng = np.random.default_rng(8)
    for size in (1, 2, 3, 4, 7):
        shape = [5, 300]
        shape[axis] = size
        values = np.round(rng.normal(size=shape), 1)  # ties
        special = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0], size=values.shape)
        values = np.where(rng.random(values.shape) < 0.3, special, values)
        np.moveaxis(values, axis, -1)[0] = np.nan  # a median of none
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
            want = np.nanmedian(values, axis=axis, keepdims=True)
        got = nanmedian(values, axis=axis)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert np.isfinite(want).any() and np.isnan(want).any()


def test_nanmedian_of_a_few_rows_is_the_sorted_one():
    """Issue 14: nanmedian of a few rows, by partial sorts row by row, gives the values and
    dtype of its sort of many rows and of np.nanmedian (odd and even counts, ties,
    infinities, rows without a value: NaN)."""
    from kspec_fluxcal.continuum import _PARTITIONED_ROWS, nanmedian

    rng = np.random.default_rng(11)
    for trial in range(300):
        values = rng.normal(size=(int(rng.integers(0, 6)), int(rng.integers(1, 40))))
        if trial % 3 == 0:
            values = np.round(values, 1)  # ties
        for share, fill in ((0.3, np.nan), (0.05, np.inf), (0.05, -np.inf)):
            values[rng.random(values.shape) < share] = fill
        if len(values) > 1:
            values[1] = np.nan
        for dtype in (np.float64, np.float32):
            few = values.astype(dtype)
            many = np.concatenate([few] * (_PARTITIONED_ROWS + 1))  # sorted all at once
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                want = np.nanmedian(few, axis=1, keepdims=True)
                sorted_all = nanmedian(many)[:len(few)]
            got = nanmedian(few)
            assert got.dtype == dtype and got.shape == (len(few), 1)
            np.testing.assert_array_equal(got, sorted_all)
            np.testing.assert_array_equal(got, want.astype(dtype))


def test_arrays_seen_recently_keep_their_cache_key():
    """The caches' key of arrays seen recently is the same object again (its bytes' hash
    kept); an array whose values changed (a view whose base changed) gets its own key, and
    so its own design."""
    from kspec_fluxcal._bspline import _key

    x = np.linspace(0.0, 1.0, 50)
    knots = np.concatenate([[0.0] * 3, np.linspace(0, 1, 6), [1.0] * 3])
    key = _key(x, knots, 3)
    assert _key(x.copy(), knots.copy(), 3) == key
    assert all(a is b for a, b in zip(_key(x.copy(), knots, 3)[:2], key[:2], strict=True))
    assert _key(x, knots, 2) != key
    base = x.copy()
    view = base[:]
    assert _key(view, knots, 3) == key
    base[0] = -0.5
    assert _key(view, knots, 3) != key
    np.testing.assert_array_equal(cached_design_matrix(view, knots).toarray()[1:],
                                  cached_design_matrix(x, knots).toarray()[1:])
    assert not np.array_equal(cached_design_matrix(view, knots).toarray()[0],
                              cached_design_matrix(x, knots).toarray()[0])
