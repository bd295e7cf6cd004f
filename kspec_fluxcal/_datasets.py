"""Datasets built from their variables without the constructor's merge.

``xr.Dataset(data_vars, coords)`` merges and aligns its variables (each checked against the
others' dimensions and indexes: ~60 us a variable); the per-exposure results, built from
arrays already of one shape, do not need it. :class:`xarray.Coordinates` builds its variables
and default indexes as the constructor does, without the merge; the data variables are then
reset from coordinates, which copies nothing.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["applied", "dataset", "index_coordinate", "string_variables", "with_variables"]


def applied(func, dims, *variables):
    """``xr.apply_ufunc(func, *variables, dask="parallelized", ...)``'s outputs when every
    variable is a Variable on ``dims`` (in that order) that is not Dask-backed: ``func``
    called on their arrays, its outputs Variables on ``dims`` with the first's attrs, as
    apply_ufunc makes them (its ~120 us a call are its checks, broadcasting and dispatch);
    None for anything else (DataArrays, other dims, Dask arrays), which apply_ufunc serves.

    Parameters
    ----------
    func : callable
        Arrays in, a tuple of arrays of the same shape out.
    dims : tuple of str
    *variables : xarray.Variable or xarray.DataArray

    Returns
    -------
    tuple of xarray.Variable or None
    """
    if not all(type(v) is xr.Variable and v.dims == dims for v in variables):
        return None
    # The arrays apply_ufunc would pass (``Variable.chunks`` asks a runtime Protocol: ~15 us)
    arrays = [v.data for v in variables]
    if not all(isinstance(array, np.ndarray) for array in arrays):
        return None
    attrs = variables[0].attrs
    return tuple(xr.Variable(dims, out, attrs) for out in func(*arrays))


def string_variables(dim, columns):
    """``{name: xr.Variable(dim, np.asarray(values, dtype=object), attrs)}`` for columns of
    one length, the same Variables; those of strings only are converted by xarray in one pass.

    xarray passes every object array through a pandas Series (its datetime inference, string
    inference under pandas 3): ~90 us for a column of 1-3 strings, most of it per call; one
    2-D array of the string columns is converted once and each Variable is a row of it
    (~16 us). Other objects (a datetime, None) would be inferred over the whole table: their
    columns are converted on their own.

    Parameters
    ----------
    dim : str
    columns : dict
        Name: (values, attrs): a 1-D sequence (e.g. per-star strings) and the attrs.

    Returns
    -------
    dict
        Name: :class:`xarray.Variable` on ``(dim,)`` of dtype object (unless xarray converts
        a column of other objects, as it would on its own).
    """
    strings = [name for name, (values, _) in columns.items()
               if all(isinstance(value, str) for value in values)]
    table = np.empty((len(strings), len(columns[strings[0]][0]) if strings else 0), dtype=object)
    for row, name in zip(table, strings, strict=True):
        row[:] = columns[name][0]
    table = xr.Variable(("_column", dim), table)
    rows = dict(zip(strings, range(len(strings)), strict=True))
    result = {}
    for name, (values, attrs) in columns.items():
        if name in rows:
            result[name] = table[rows[name]]
            result[name].attrs = dict(attrs)
        else:
            result[name] = xr.Variable(dim, np.asarray(values, dtype=object), attrs)
    return result


def index_coordinate(like, values, attrs=None):
    """The dimension coordinate ``(like.dims, values, attrs)`` for :func:`dataset`; ``like``
    itself (a copy with these attrs) when it is an index coordinate of the same values:
    its pandas index is reused, not built again from the values (~0.1 ms).

    Parameters
    ----------
    like : xarray.Variable
        A 1-D coordinate, e.g. of the Dataset the values were taken from.
    values : numpy.ndarray
    attrs : dict, optional

    Returns
    -------
    xarray.IndexVariable or tuple
    """
    if (isinstance(like, xr.IndexVariable) and like.dtype == values.dtype
            and like.shape == values.shape and np.array_equal(like.values, values)):
        like = like.copy(deep=False)
        like.attrs, like.encoding = dict(attrs or {}), {}
        return like
    return (like.dims, values) if attrs is None else (like.dims, values, attrs)


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
    return _built({**data_vars, **coords}, data_vars, attrs, indexes)


def with_variables(ds, variables):
    """``ds.assign(variables)`` for new data variables, the same Dataset, built without the
    merge (1.46 -> 1.09 ms of CPU for three per-star variables on a fit's ~60).

    Parameters
    ----------
    ds : xarray.Dataset
    variables : dict
        Name: :class:`xarray.Variable` or tuple (dims, data[, attrs]) on dimensions of
        ``ds`` with its sizes (not checked); none of ``ds``'s names.

    Returns
    -------
    xarray.Dataset
        ``ds``'s variables, in their order, then ``variables``; ``ds``'s indexes and a copy of
        its attrs.
    """
    return _built({**ds.variables, **variables}, [*ds.data_vars, *variables], ds.attrs,
                  dict(ds.xindexes))


def _built(variables, data_names, attrs, indexes):
    """The Dataset of ``variables`` (in their order), ``data_names`` its data variables and
    the others its coordinates: one Coordinates object made into a Dataset (no merge)."""
    result = xr.Coordinates(variables, indexes=indexes).to_dataset()
    result = result.reset_coords(list(data_names))
    result.attrs = dict(attrs or {})
    return result
