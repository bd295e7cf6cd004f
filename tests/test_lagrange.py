"""Lagrange interpolation from uniform nodes as a sparse matrix."""

import numpy as np
import pytest

from kspec_fluxcal._lagrange import lagrange_matrix


@pytest.mark.parametrize("order", [2, 4, 6, 8])
def test_polynomials_of_the_order_are_exact(order):
    """A polynomial of degree order - 1 at the nodes is interpolated exactly anywhere the
    nodes reach (up to both ends); each row's weights sum to 1 and sit on the point's
    order nearest nodes; a node's own position takes its value alone."""
    size = 40
    lo, hi = order // 2 - 1, size - order // 2
    position = np.concatenate([np.random.default_rng(order).uniform(lo, hi, 500),
                               [lo, 10.0, np.nextafter(hi, 0)]])
    matrix = lagrange_matrix(position, size, order)
    nodes = np.arange(size) / size
    coeffs = np.random.default_rng(1).normal(size=order)
    got = matrix @ np.polynomial.polynomial.polyval(nodes, coeffs)
    want = np.polynomial.polynomial.polyval(position / size, coeffs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(coeffs).sum())
    np.testing.assert_allclose(matrix.sum(axis=1).A1, 1.0, rtol=0, atol=1e-12)
    assert np.all(np.diff(matrix.indptr) == order)
    columns = matrix.indices.reshape(-1, order)
    assert columns.min() == 0 and columns.max() == size - 1
    assert np.all(np.abs(columns - position[:, None]) < order / 2 + 1)
    np.testing.assert_allclose(matrix[-2].toarray()[0], np.eye(size)[10], atol=1e-15)


def test_a_smooth_function_converges_with_the_order():
    """A Gaussian three nodes wide: the error falls with every two nodes more."""
    nodes = np.arange(60.0)
    position = np.linspace(10.0, 50.0, 777)
    errors = [np.abs(lagrange_matrix(position, 60, order) @ np.exp(-0.5 * ((nodes - 30) / 3) ** 2)
                     - np.exp(-0.5 * ((position - 30) / 3) ** 2)).max() for order in (4, 6, 8)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2]
    assert errors[2] < 1e-4
