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
        The points in node units (node k at k), each in [order / 2 - 1, size - order / 2]
        so that its nodes exist.
    size : int
        Number of nodes.
    order : int
        Nodes per point (even): the polynomial's degree plus one.

    Returns
    -------
    scipy.sparse.csr_matrix
        Row i holds the weights of nodes floor(position[i]) - order / 2 + 1 ... + order / 2.
    """
    first = np.floor(position).astype(np.intp) - (order // 2 - 1)
    where = position - first
    offsets = np.arange(order)
    # Node m's basis polynomial is the product of (where - n) over the other nodes n (those
    # before m times those after), over its value at m: 4 (order - 1) passes, not order^2.
    factors = where - offsets[:, None]
    before, after = np.ones((2, order, where.size))
    for m in offsets[1:]:
        np.multiply(before[m - 1], factors[m - 1], out=before[m])
        np.multiply(after[-m], factors[-m], out=after[-m - 1])
    weights = before * after
    weights /= np.array([np.prod(np.delete(m - offsets, m)) for m in offsets])[:, None]
    return scipy.sparse.csr_matrix(
        (weights.T.ravel(), (first[:, None] + offsets).ravel(),
         np.arange(0, (where.size + 1) * order, order)), shape=(where.size, size))
