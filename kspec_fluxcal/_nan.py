"""``np.nan_to_num`` in fewer NumPy calls.

NumPy's finds NaN, +inf and -inf by a pass each (``isposinf`` and ``isneginf`` are each two
ufuncs and an ``&``) and writes each by ``copyto``: ~10 calls, 9-17 us on the fit's rows of
1-3 x 4096 pixels and its per-star arrays of 1-3 values, ~55 calls an exposure. Infinities
are rare there: :func:`nan_to_num` writes NaN's value in one ``copyto`` and runs NumPy's
function only when an infinity is left (3-5 us).
"""

from __future__ import annotations

import numpy as np

__all__ = ["nan_to_num"]


def nan_to_num(values, nan=0.0):
    """``np.nan_to_num(values, nan=nan)``: the same values, dtype and memory layout, in a copy.

    Parameters
    ----------
    values : array_like
    nan : float
        The value of NaN; +inf and -inf become the dtype's largest finite values.

    Returns
    -------
    numpy.ndarray or scalar
        As :func:`numpy.nan_to_num` returns it.
    """
    out = np.array(values, subok=True, copy=True)
    if out.dtype.kind != "f" or not out.ndim:  # integers, complex numbers, scalars: NumPy's
        return np.nan_to_num(out, copy=False, nan=nan)
    np.copyto(out, nan, where=np.isnan(out))
    if np.isinf(out).any():
        np.nan_to_num(out, copy=False)
    return out
