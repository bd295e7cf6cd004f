"""Lagrange interpolation from uniform nodes to any points, as a sparse matrix."""

from __future__ import annotations

import functools

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
    offset = position - first
    factors = [offset - n for n in range(order)]  # position - node n
    # Node m's basis polynomial is the product of (position - node n) over the other nodes
    # (those before m times those after), over its value at m: 3 order passes, not order^2.
    # Per node on contiguous rows, written once into the (points, order) weights: they and
    # the nodes are the matrix's data and indices as they are (its transposed copy, and the
    # fresh memory of (order, points) temporaries: 7251 points of order 8, 1.2 -> 0.95 ms).
    before = [np.ones(position.size)]
    for m in range(1, order):
        before.append(before[-1] * factors[m - 1])
    weights = np.empty((position.size, order))
    after = np.ones(position.size)
    for m in range(order - 1, -1, -1):
        np.divide(before[m] * after, _denominators(order)[m], out=weights[:, m])
        after *= factors[m]
    nodes = first[:, None] + np.arange(order, dtype=itype)
    return scipy.sparse.csr_matrix(
        (weights.ravel(), nodes.ravel(),
         np.arange(0, (position.size + 1) * order, order, dtype=itype)),
        shape=(position.size, size))


@functools.cache
def _denominators(order):
    """Each node's basis polynomial at the node itself: prod over n != m of (m - n)."""
    return tuple(np.prod(np.delete(m - np.arange(order), m)) for m in range(order))
