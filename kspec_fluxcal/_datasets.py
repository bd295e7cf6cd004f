"""Datasets built from their variables without the constructor's merge.

``xr.Dataset(data_vars, coords)`` merges and aligns its variables (each checked against the
others' dimensions and indexes: ~60 us a variable); the per-exposure results, built from
arrays already of one shape, do not need it. :class:`xarray.Coordinates` builds its variables
and default indexes as the constructor does, without the merge; the data variables are then
reset from coordinates, which copies nothing.
"""

from __future__ import annotations

import xarray as xr

__all__ = ["dataset"]


def dataset(data_vars, coords, attrs=None, indexes=None):
    """``xr.Dataset(data_vars, coords=coords, attrs=attrs)``, the same Dataset, built
    without the constructor's merge.

    Parameters
    ----------
    data_vars, coords : dict
        Name: :class:`xarray.Variable` or tuple (dims, data[, attrs]), as the constructor
        takes them; each data variable's dims among the coordinates' or the others' with the
        same sizes (not checked); no data variable named after its own dimension.
    attrs : dict, optional
    indexes : dict, optional
        Name: :class:`xarray.Index` of coordinates (already built: e.g. a selection's
        ``xindexes``); given, no other index is built.

    Returns
    -------
    xarray.Dataset
    """
    result = xr.Coordinates({**data_vars, **coords}, indexes=indexes).to_dataset()
    result = result.reset_coords(list(data_vars))
    result.attrs = dict(attrs or {})
    return result
