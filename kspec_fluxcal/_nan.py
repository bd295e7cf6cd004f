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


def nan_to_num(values, nan=None):
    """``np.nan_to_num(values, nan=nan)``: the same values, dtype and memory layout, in a copy.

    Parameters
    ----------
    values : array_like
    nan : float, optional
        The value of NaN (NumPy's default 0); +inf and -inf become the dtype's largest
        finite values.

    Returns
    -------
    numpy.ndarray or scalar
        As :func:`numpy.nan_to_num` returns it.
    """
    given = {} if nan is None else {"nan": nan}  # Dask's nan_to_num takes no nan
    if type(values) is not np.ndarray and not isinstance(values, list):
        # Scalars, subclasses and other arrays (Dask's stays lazy): NumPy's, which dispatches
        return np.nan_to_num(values, **given)
    out = np.array(values, copy=True)
    if out.dtype.kind != "f" or not out.ndim:  # integers, complex numbers: NumPy's
        return np.nan_to_num(out, copy=False, **given)
    np.copyto(out, 0.0 if nan is None else nan, where=np.isnan(out))
    if np.isinf(out).any():
        np.nan_to_num(out, copy=False)
    return out
