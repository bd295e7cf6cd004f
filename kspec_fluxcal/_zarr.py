"""Small helpers for writing Zarr v3 stores with xarray."""

from __future__ import annotations

import numpy as np

__all__ = ["strings_as_object", "strings_as_unicode"]


def strings_as_object(ds):
    """Turn fixed-width string variables into object dtype.

    Zarr v3 stores object strings with its variable-length 'string' data type, which has a
    specification; numpy's fixed-width '<U' types have none and warn on every write.
    """
    out = ds.copy()
    for name, var in {**ds.coords, **ds.data_vars}.items():
        if var.dtype.kind == "U":
            out[name] = var.astype(object)
    return out


def strings_as_unicode(ds):
    """Turn the strings Zarr gives back (numpy StringDType or object) into '<U' arrays.

    Fixed-width unicode behaves the same under every numpy operation and in FITS tables.
    """
    out = ds.copy()
    for name, var in {**ds.coords, **ds.data_vars}.items():
        if var.dtype.kind in "TO" and var.chunks is None:
            out[name] = var.copy(data=np.array(var.values.tolist(), dtype=str).reshape(var.shape))
    return out
