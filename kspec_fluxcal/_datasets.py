"""Datasets built from their variables without the constructor's merge.

``xr.Dataset(data_vars, coords)`` merges and aligns its variables (each checked against the
others' dimensions and indexes: ~60 us a variable); the per-exposure results, built from
arrays already of one shape, do not need it. :class:`xarray.Coordinates` builds its variables
and default indexes as the constructor does, without the merge; the data variables are then
reset from coordinates, which copies nothing.

Their variables from NumPy arrays are made by :func:`variable` (``xr.Variable`` without the
checks such an array needs none of): ~400 Variables are made per exposure.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["applied", "dataset", "index_coordinate", "variable", "with_variables"]


def variable(dims, data, attrs=None, encoding=None):
    """``xr.Variable(dims, data, attrs, encoding)``, the same Variable, made faster for a NumPy
    array that xarray keeps as it is.

    xarray's checks of the data (pandas, masked, Dask arrays; datetimes) cost 2.3 of 3.6 us
    a Variable, and an object array (the fit's per-star texts) goes through a pandas Series
    and back: ~90 us. A ``numpy.ndarray`` itself (not a subclass) of numbers, bools or
    fixed-width strings, or of Python ``str`` objects only, comes out of them as it went in
    (the Series of strings gives the same strings, in a copy): it is given as it is
    (``xr.Variable``'s ``fastpath``). Any other data is checked as ``xr.Variable`` checks
    it.

    Parameters
    ----------
    dims : str or sequence of str
    data : array_like
    attrs, encoding : dict, optional

    Returns
    -------
    xarray.Variable
    """
    if type(data) is np.ndarray and (
            data.dtype.kind not in "OMm"
            or data.dtype.kind == "O" and all(type(item) is str for item in data.flat)):
        return xr.Variable(dims, data, attrs, encoding, fastpath=True)
    return xr.Variable(dims, data, attrs, encoding)


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
    return tuple(variable(dims, out, attrs) for out in func(*arrays))


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
    the others its coordinates: one Coordinates object made into a Dataset (no merge). A
    tuple of a NumPy array is made a Variable here (:func:`variable`); xarray makes the
    others (its errors name the variable)."""
    variables = {name: variable(*value) if type(value) is tuple and len(value) in (2, 3, 4)
                 and type(value[1]) is np.ndarray else value for name, value in variables.items()}
    result = xr.Coordinates(variables, indexes=indexes).to_dataset()
    result = result.reset_coords(list(data_names))
    result.attrs = dict(attrs or {})
    return result
