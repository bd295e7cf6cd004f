"""Lagrange interpolation from uniform nodes to any points, as a sparse matrix."""

from __future__ import annotations

import numpy as np
import scipy.sparse


def lagrange_matrix(position, size, order):
    """Sparse (len(position), size) matrix of Lagrange interpolation from ``size`` uniform
    nodes to points between them, through the polynomial on each point's ``order`` nearest
    nodes.

    Parameters
    ----------
    position : numpy.ndarray
        The points in node units (node k at k), each in [order / 2 - 1, size - order / 2)
        so that its nodes exist (unchecked).
    size : int
        Number of nodes.
    order : int
        Nodes per point (even): the polynomial's degree plus one.

    Returns
    -------
    scipy.sparse.csr_matrix
        Row i holds the weights of nodes floor(position[i]) - order / 2 + 1 ... + order / 2.
    """
    itype = np.int32 if (position.size + 1) * order < 2**31 and size < 2**31 else np.intp
    first = np.floor(position).astype(itype) - (order // 2 - 1)
    factors = position - first
    factors = factors - np.arange(order)[:, None]  # (order, points): position - node
    # Node m's basis polynomial is the product of (position - node n) over the other nodes
    # (those before m times those after), over its value at m: 3 order passes, not order^2.
    weights = np.empty_like(factors)
    weights[0] = 1.0
    for m in range(1, order):
        np.multiply(weights[m - 1], factors[m - 1], out=weights[m])
    after = np.ones(position.size)
    for m in range(order - 1, -1, -1):
        weights[m] *= after
        weights[m] /= np.prod(np.delete(m - np.arange(order), m))
        after *= factors[m]
    return scipy.sparse.csr_matrix(
        (weights.T.ravel(), (first[:, None] + np.arange(order, dtype=itype)).ravel(),
         np.arange(0, (position.size + 1) * order, order, dtype=itype)),
        shape=(position.size, size))
