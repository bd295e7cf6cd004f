"""The stellar template grid: a labelled Zarr v3 cube with dims (teff, logg, feh, alpha,
wavelength), built once from BOSZ 2024 files (:mod:`kspec_fluxcal.grid.build`) and read back
lazily here, with look-ups and interpolation in its parameters.

Store layout
------------
``flux``, ``continuum`` (float32, erg/s/cm^2/A surface flux, NaN where the grid point does not
exist), ``exists`` (bool), ``synth_mag`` (teff, logg, feh, alpha, band: AB magnitudes of the
surface flux, computed on the full wavelength range before trimming) and ``ext_coeff``
(..., law, band: A_band / E(B-V) of each template's own spectrum, so photometric fits with
reddening never re-integrate spectra) with ``ext_slope``, its change with E(B-V) (stores
built before it was added have none: reddening is then linear in E(B-V)).

Chunks: one Teff value per chunk, every (logg, feh, alpha), and 8192 wavelengths. A Teff
window of the template search reads only its slabs; a wavelength window (an exposure's range)
reads only the chunks it overlaps; a chunk of the reference subgrid is ~1.8 MB, in the range
where Zarr reads and Dask task overheads are both small.

Consolidated metadata is not written: it is not part of the Zarr v3 specification yet, and a
grid has few arrays, so opening costs a handful of small reads.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import xarray as xr

from .._recent import Recent
from .._zarr import strings_as_unicode
from ..errors import GridError

__all__ = [
    "open_grid",
    "TemplateGrid",
    "PARAMS",
    "interpolation_weights",
    "alpha_response_weights",
    "check_chunks",
    "open_checked_store",
    "load_checked_store",
    "STORE_VARIABLES",
]

#: The grid's parameter dims, in storage order.
PARAMS = ("teff", "logg", "feh", "alpha")


#: Variables of a template store whose every chunk must be present: Zarr reads a missing
#: chunk as its fill value, i.e. as NaN spectra or templates that do not exist.
STORE_VARIABLES = ("flux", "continuum", "exists", "synth_mag", "ext_coeff", "ext_slope")
REBUILD_HINT = "rebuild with `kspec-fluxcal grid build`"


class _CheckedChunks:
    """A Zarr array read chunk by chunk (by Dask, or xarray's lazy indexing); a chunk that
    does not decode is a GridError naming the store, the variable and the chunk (not a
    codec's bare message)."""

    def __init__(self, array, store, name, hint):
        self.array, self.store, self.name, self.hint = array, str(store), name, hint
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        try:
            return self.array[key]
        except Exception as err:  # codecs raise RuntimeError, ValueError, TypeError...
            chunk = self.array.metadata.encode_chunk_key(self._bad_chunk(key))
            raise GridError(self.store, f"variable {self.name} chunk {chunk}",
                            f"unreadable ({type(err).__name__}: {err})"
                            + (f"; {self.hint}" if self.hint else "")) from None

    def _bad_chunk(self, key):
        """The first chunk under ``key`` (a tuple of slices and integers) that does not
        decode: read one by one, only once a read of several has failed."""
        key = tuple(key) + (slice(None),) * (self.ndim - len(tuple(key)))
        spans = []
        for k, size, c in zip(key, self.shape, self.array.chunks, strict=True):
            lo, hi = (k.indices(size)[:2] if isinstance(k, slice) else (int(k), int(k) + 1))
            spans.append(range(lo // c, max(hi - 1, lo) // c + 1))
        for coords in itertools.product(*spans):
            try:
                self.array[tuple(slice(i * c, (i + 1) * c)
                                 for i, c in zip(coords, self.array.chunks, strict=True))]
            except Exception:
                return coords
        return tuple(s[0] for s in spans)


def check_chunks(path, names=STORE_VARIABLES, hint=REBUILD_HINT, *, group=None):
    """Raise :class:`GridError` unless every chunk of ``names`` is stored in the Zarr store
    ``path`` (a listing of keys; nothing is read), naming the first missing chunk.

    Parameters
    ----------
    path : path-like
        A local Zarr v3 store (a directory).
    names : sequence of str
        Variables to check (absent ones are skipped).
    hint : str
        How to repair the store, appended to the message ('' for none).
    group : zarr.Group, optional
        The store's root group, when the caller has it open already.
    """
    if group is None:
        import zarr

        group = zarr.open_group(path, mode="r")
    for name in names:
        if name not in group:
            continue
        array = group[name]
        stored = _stored_keys(Path(path) / name)
        for coords in np.ndindex(*array.cdata_shape):
            key = array.metadata.encode_chunk_key(coords)
            if key not in stored:
                raise GridError(path, f"variable {name} chunk {key}",
                                "missing (a damaged or partly copied store)"
                                + (f"; {hint}" if hint else ""))


def _stored_keys(folder):
    """The files under ``folder`` (through symbolic links, as rglob), as '/'-separated paths
    relative to it: os.walk takes a fifth of rglob's time, part of every command's start-up."""
    keys, skip = set(), len(str(folder)) + 1
    for root, _, files in os.walk(folder, followlinks=True):
        prefix = root[skip:].replace(os.sep, "/")
        keys.update(f"{prefix}/{f}" if prefix else f for f in files)
    return keys


def open_checked_store(path, names=STORE_VARIABLES, *, chunks=None, hint=REBUILD_HINT):
    """Open a Zarr store of templates lazily, ``names`` read through :class:`_CheckedChunks`
    (see also :func:`check_chunks`).

    Parameters
    ----------
    path : path-like
        A local Zarr v3 store (a directory).
    names : sequence of str
        Variables to check.
    chunks : dict or False, optional
        Dask chunks (default: the store's own); False: no Dask, the variables read when
        their values are asked for (xarray's lazy indexing).
    hint : str
        How to repair the store, appended to error messages.

    Returns
    -------
    ds : xarray.Dataset
    group : zarr.Group
        The store's root group (for :func:`check_chunks`, without opening it again).

    Raises
    ------
    GridError
        When the store cannot be opened, or (when it is read) a chunk does not decode.
    """
    import zarr

    try:
        ds = xr.open_zarr(path, consolidated=False,
                          chunks=None if chunks is False else {} if chunks is None else chunks)
        group = zarr.open_group(path, mode="r")
    except Exception as err:
        raise GridError(path, None, f"not a readable Zarr store ({err})") from None
    checked = {name: ds[name].copy(data=_lazily_indexed(reader) if chunks is False else
                                   _dask_array(reader, ds[name], path))
               for name in names if name in ds
               for reader in [_CheckedChunks(group[name], path, name, hint)]}
    return ds.assign(checked), group  # one merge, not one per variable


def _dask_array(reader, var, path):
    import dask.array as da
    from dask.base import tokenize

    return da.from_array(reader, chunks=var.chunks, asarray=True, lock=False, fancy=False,
                         meta=np.empty((0,) * reader.ndim, reader.dtype),
                         name=f"store-{var.name}-{tokenize(str(path), var.chunks)}")


def _lazily_indexed(reader):
    from xarray.backends import BackendArray
    from xarray.core import indexing

    class Checked(BackendArray):
        # xarray's protocol for a backend's arrays: basic (slice) indexing, lazily composed
        shape, dtype = reader.shape, reader.dtype

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(
                key, self.shape, indexing.IndexingSupport.BASIC, reader.__getitem__)

    return indexing.LazilyIndexedArray(Checked())


def load_checked_store(path, names=STORE_VARIABLES, *, hint=REBUILD_HINT):
    """Read a Zarr store of templates whole into memory, straight through Zarr (no Dask: a
    compute would also import distributed to look for a client).

    Raises
    ------
    GridError
        When a chunk of ``names`` does not decode, naming it (found by reading the
        variables chunk by chunk, only then).
    """
    ds = xr.open_zarr(path, consolidated=False, chunks=None)
    try:
        return ds.load()
    except Exception:
        import zarr

        group = zarr.open_group(path, mode="r")
        for name in (n for n in names if n in group):
            _CheckedChunks(group[name], path, name, hint)[(slice(None),) * group[name].ndim]
        raise


def open_grid(path, *, chunks=None):
    """Open a template cube written by :func:`build_grid`, lazily.

    Parameters
    ----------
    path : path-like
        The Zarr store.
    chunks : dict or False, optional
        Dask chunks (default: the store's own). False: no Dask (nor its import, a third of
        a command's start-up); values are read when asked for, as xarray's ``chunks=None``.
        For a calibration whose template library is cached, which reads no template.

    Returns
    -------
    xarray.Dataset
        Dask-backed (unless ``chunks=False``); see the module docstring for its variables.

    Raises
    ------
    GridError
        Not a complete template store, or a chunk of one of :data:`STORE_VARIABLES` missing
        (checked here, by listing keys); when the data are read, a chunk that does not decode.
    """
    path = Path(path)
    if not path.exists():
        raise GridError(path, None, "no such template grid store (build it with "
                        "'kspec-fluxcal grid build')")
    if path.is_dir() and any(path.glob("bosz2024_wave_*.txt")):
        # The commonest mistake: the BOSZ directory itself instead of the cube built from it.
        raise GridError(path, None, "is a BOSZ-layout directory, not a template grid store; "
                        f"convert it once with 'kspec-fluxcal grid build {path} --out STORE' "
                        "and pass STORE")
    ds, group = open_checked_store(path, chunks=chunks)
    missing = [v for v in ("flux", "exists", "synth_mag") if v not in ds]
    if missing:
        raise GridError(path, None, f"not a template grid (missing {', '.join(missing)})")
    if not ds.attrs.get("complete"):
        raise GridError(path, None, "incomplete template grid (an interrupted build?); rebuild it")
    check_chunks(path, group=group)
    ds = strings_as_unicode(ds)
    ds.attrs["store"] = str(path)
    return ds


@xr.register_dataset_accessor("templates")
class TemplateGrid:
    """Grid look-ups on a template cube: ``grid.templates.nearest(...)`` etc.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube from :func:`open_grid` (or a prepared cube with the same parameter dims).
    """

    def __init__(self, ds):
        self._ds = ds

    @property
    def resolving_power(self):
        """Resolving power of the grid's spectra (FWHM = lambda / R)."""
        return float(self._ds.attrs["resolving_power"])

    @property
    def axes(self):
        """The parameter axes, as a dict of numpy arrays."""
        return {p: self._ds[p].values for p in PARAMS}

    def existing(self):
        """The existing grid points stacked along ``template`` (NaN holes dropped)."""
        stacked = self._ds.stack(template=PARAMS)
        return stacked.isel(template=np.flatnonzero(stacked["exists"].values))

    def nearest(self, teff, logg, feh, alpha=None):
        """The nearest existing grid point (distance in grid steps).

        Parameters
        ----------
        teff, logg, feh : float
            Parameters.
        alpha : float, optional
            [alpha/M]; default: any (nearest in the other parameters, then lowest |alpha|).
        """
        axes = self.axes
        exists = self._ds["exists"].values
        idx = np.array(np.nonzero(exists)).T
        steps = {p: np.median(np.diff(axes[p])) if axes[p].size > 1 else 1.0 for p in PARAMS}
        target = {"teff": teff, "logg": logg, "feh": feh, "alpha": 0.0 if alpha is None else alpha}
        dist = sum(((axes[p][idx[:, k]] - target[p]) / steps[p]) ** 2
                   for k, p in enumerate(PARAMS) if p != "alpha" or alpha is not None)
        if alpha is None:
            dist = dist + 1e-6 * np.abs(axes["alpha"][idx[:, 3]])
        best = idx[int(np.argmin(dist))]
        return self._ds.isel({p: int(best[k]) for k, p in enumerate(PARAMS)})

    def box(self, **ranges):
        """The sub-grid with parameters inside ranges, e.g. ``box(teff=(5500, 6500))``."""
        unknown = [k for k in ranges if k not in PARAMS]
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; valid: {', '.join(PARAMS)}")
        sel = {}
        for p, (lo, hi) in ranges.items():
            values = self._ds[p].values
            sel[p] = np.flatnonzero((values >= lo) & (values <= hi))
        return self._ds.isel(sel)

    def interpolation_weights(self, teff, logg, feh, alpha=None):
        """Corners and weights of multilinear interpolation; see :func:`interpolation_weights`."""
        return interpolation_weights(self.axes, self._ds["exists"].values, teff, logg, feh, alpha)

    def interpolate(self, teff, logg, feh, alpha=None,
                    variables=("flux", "continuum", "synth_mag")):
        """Spectra (and magnitudes) interpolated multilinearly in (teff, logg, feh).

        Returns
        -------
        xarray.Dataset
            The requested variables with a leading ``point`` dim (one per input point), and
            coordinates with the requested parameters.
        """
        index, weight = self.interpolation_weights(teff, logg, feh, alpha)
        out = {}
        for name in variables:
            if name not in self._ds:
                continue
            var = self._ds[name]
            rest = [d for d in var.dims if d not in PARAMS]
            picked = var.isel({p: xr.DataArray(index[..., k], dims=("point", "corner"))
                               for k, p in enumerate(PARAMS)})
            w = xr.DataArray(weight, dims=("point", "corner"))
            # Zero-weight corners may be NaN holes: drop them before summing. Magnitudes are
            # interpolated as fluxes, consistently with the spectra.
            if name == "synth_mag":
                picked = 10.0 ** (-0.4 * picked)
            values = xr.where(w > 0, picked, 0.0).astype(np.float64)
            out[name] = (values * w).sum("corner").transpose("point", *rest)
            if name == "synth_mag":
                out[name] = -2.5 * np.log10(out[name])
            out[name].attrs = dict(var.attrs)
        ds = xr.Dataset(out)
        t, g, m, a = np.broadcast_arrays(teff, logg, feh, 0.0 if alpha is None else alpha)
        return ds.assign_coords(teff=("point", np.atleast_1d(t).astype(float)),
                                logg=("point", np.atleast_1d(g).astype(float)),
                                feh=("point", np.atleast_1d(m).astype(float)),
                                alpha=("point", np.atleast_1d(a).astype(float)))


#: The 16 corners of a cell in (teff, logg, feh, alpha): 0 the lower node, 1 the upper.
_CORNERS = np.array([(i, j, k, m) for i in (0, 1) for j in (0, 1) for k in (0, 1)
                     for m in (0, 1)])


def interpolation_weights(axes, exists, teff, logg, feh, alpha=None):
    """Corners and weights of multilinear interpolation in (teff, logg, feh, alpha).

    Vectorised over points (arrays broadcast together). Missing corners get zero weight and
    the others are renormalised; points outside the grid are clipped to its edge. A point on
    a node of an axis takes that node only, so grids with one [alpha/M] (or points given at
    its nodes) interpolate in (teff, logg, feh) alone.

    Parameters
    ----------
    axes : dict
        Grid axes by parameter name (:data:`PARAMS`).
    exists : numpy.ndarray of bool
        Which grid points exist, shape of the axes.
    teff, logg, feh : array_like
        Parameters of the points.
    alpha : array_like, optional
        [alpha/M] of the points (default 0).

    Returns
    -------
    index : numpy.ndarray, int, shape (npoint, 16, 4)
        Grid indices (teff, logg, feh, alpha) of the corners.
    weight : numpy.ndarray, shape (npoint, 16)
        Weights summing to 1 (NaN for a point with no existing corner).
    """
    index, raw = _cell(axes, teff, logg, feh, alpha)
    return index, _renormalised(raw, np.asarray(exists)[tuple(np.moveaxis(index, -1, 0))])


def _cell(axes, teff, logg, feh, alpha=None):
    """Corners (npoint, 16, 4) of each point's cell and their multilinear weights, before
    missing corners are dropped."""
    a = 0.0 if alpha is None else alpha
    values = [np.atleast_1d(np.asarray(v, dtype=np.float64))
              for v in np.broadcast_arrays(teff, logg, feh, a)]
    return _corners(axes, [_position(axes[p], x) for p, x in zip(PARAMS, values, strict=True)])


def _position(axis, x):
    """Lower node index along one axis and the fraction of the step to the next (points
    outside are clipped to the edge)."""
    ax = np.asarray(axis, dtype=np.float64)
    if ax.size == 1:
        return np.zeros(x.shape, int), np.zeros(x.shape)
    xc = np.minimum(np.maximum(x, ax[0]), ax[-1])  # np.clip costs more on a few points
    # xc >= ax[0] (or NaN, sorted last): the node found is never below the first.
    lo = np.minimum(ax.searchsorted(xc, side="right") - 1, ax.size - 2)
    return lo, (xc - ax[lo]) / (ax[1:] - ax[:-1])[lo]


def _corners(axes, positions):
    """Corners and raw weights of a cell from each axis' :func:`_position`."""
    return _with_alpha(axes, *_cell3(axes, positions[:3]), positions[3])


#: Each of the 16 corners' (teff, logg, feh) corner among the 8 of :func:`_cell3` (the
#: [alpha/M] node is the innermost of :data:`_CORNERS`).
_CORNER3 = np.arange(_CORNERS.shape[0]) // 2
_CORNERS3 = _CORNERS[::2, :3]
#: The two [alpha/M] nodes of a cell, from its lower one.
_PAIR = np.array([0, 1])


def _cell3(axes, positions):
    """The (teff, logg, [M/H]) part of :func:`_corners`: indices (npoint, 8, 3) of the 8
    corners and the products of their first three factors (npoint, 8), formed as
    :func:`_corners` forms them (left to right), so that one [alpha/M] factor more gives its
    weights to the last bit (:func:`_with_alpha`)."""
    # Columns filled one by one (np.stack's Python costs more than the values, a few points),
    # each axis' two factors (lower node, upper node) side by side.
    n = positions[0][0].shape[0]
    lo = np.empty((n, 3), dtype=np.intp)
    factor = np.empty((n, 3, 2))
    last = np.empty(3, dtype=np.intp)
    for d, (p, (node, frac)) in enumerate(zip(PARAMS[:3], positions, strict=True)):
        lo[:, d], last[d] = node, len(axes[p]) - 1
        factor[:, d, 0], factor[:, d, 1] = 1.0 - frac, frac
    index = np.minimum(lo[:, None, :] + _CORNERS3, last)
    # The 8 products by broadcasting (teff bit outermost, as in _CORNERS3), left to right.
    raw = factor[:, 0, :, None, None] * factor[:, 1, None, :, None] * factor[:, 2, None, None, :]
    return index, raw.reshape(n, 8)


def _with_alpha(axes, index3, raw3, position):
    """Corners (npoint, 16, 4) and raw weights of the cells of :func:`_cell3` with the
    [alpha/M] axis at ``position`` (:func:`_position`)."""
    lo, frac = position
    n = index3.shape[0]
    # Built as (point, 8, 2) and flattened (the [alpha/M] bit innermost): broadcasting each
    # (teff, logg, [M/H]) corner over its two [alpha/M] nodes costs less than gathering the
    # 16 (74 against 86 us for 162 points; the same values, the same products).
    index = np.empty((n, 8, 2, 4), dtype=index3.dtype)
    index[..., :3] = index3[:, :, None, :]
    index[..., 3] = np.minimum(lo[:, None] + _PAIR, len(axes["alpha"]) - 1)[:, None, :]
    factor = np.empty(frac.shape + (2,))
    factor[:, 0], factor[:, 1] = 1.0 - frac, frac
    return index.reshape(n, 16, 4), (raw3[:, :, None] * factor[:, None, :]).reshape(n, 16)


def _renormalised(raw, present):
    """Weights of the corners that exist, summing to 1 (NaN where none does)."""
    weight = np.where(present, raw, 0.0)
    total = weight.sum(axis=1, keepdims=True)
    # No np.errstate (a fifth of the cost on a few points): a quiet NaN divides silently.
    return weight / np.where(total > 0, total, np.nan)


def alpha_response_weights(axes, exists, teff, logg, feh, alpha, *, keep=True):
    """Corners and weights of models with [alpha/M] as a response: linear between the
    grid's [alpha/M] nodes, and beyond them, also where the grid lacks a node at the
    point's [M/H].

    A point between or beyond two [alpha/M] nodes ``lo`` < ``hi`` (the two outermost beyond
    the range) is the model at ``lo`` plus ``f = (alpha - lo) / (hi - lo)`` times the
    response ``model(hi) - model(lo)``. The response is interpolated over the grid points
    that have both nodes, at the point's [M/H] clipped to the range where they exist (none
    anywhere: no response, the model at ``lo``): grids such as MARCS, or this package's
    synthetic one, are alpha-enhanced only at low [M/H], and without the transfer an
    enhanced metal-rich star would be fitted as [alpha/M] = 0, its enhancement taken up by
    Teff and E(B-V). Where the grid has every node the result is multilinear
    interpolation; points at a node that every corner of their cell has, and grids with
    one [alpha/M], get :func:`interpolation_weights` itself. [alpha/M] is not clipped:
    callers bound it.

    Parameters
    ----------
    axes, exists, teff, logg, feh, alpha
        As for :func:`interpolation_weights` (``alpha`` required).
    keep : bool
        Keep the result for points asked for again (False: points asked for once, e.g. a
        lattice of trial points, neither looked up nor kept).

    Returns
    -------
    index : numpy.ndarray, int, shape (npoint, C, 4)
        Grid indices of the corners (C = 16, or 48 when a point needs the response).
    weight : numpy.ndarray, shape (npoint, C)
        Weights summing to 1, negative for the response's lower node (NaN for a point with
        no existing corner).
    """
    t, g, m, a = (np.atleast_1d(np.asarray(v, dtype=np.float64))
                  for v in np.broadcast_arrays(teff, logg, feh, alpha))
    exists = np.asarray(exists, dtype=bool)
    if not keep:  # no key made of the points' bytes, nor a copy of the result
        return _alpha_response_weights(axes, exists, t, g, m, a)
    # The fit asks for its chosen parameters' corners twice (the line-spread width's fit
    # and the final model, 2 of 3 exposures the same points): the last few kept.
    key = (exists.shape, exists.tobytes(), t.shape,
           *(np.asarray(v, dtype=np.float64).tobytes() for v in (*(axes[p] for p in PARAMS),
                                                                 t, g, m, a)))
    known = _RECENT_WEIGHTS.get(key)
    if known is None:
        known = _alpha_response_weights(axes, exists, t, g, m, a)
        _RECENT_WEIGHTS.put(key, known)
    return tuple(v.copy() for v in known)


#: :func:`alpha_response_weights` of the last few points asked for.
_RECENT_WEIGHTS = Recent(4)


def _alpha_response_weights(axes, exists, t, g, m, a):
    nodes = np.asarray(axes["alpha"], dtype=np.float64)
    if nodes.size < 2:
        return interpolation_weights(axes, exists, t, g, m, a)
    at_alpha = _position(nodes, a)
    k = at_alpha[0]  # the lower node of a, as of a clipped to the nodes
    f = (a - nodes[k]) / (nodes[k + 1] - nodes[k])
    at = [_position(axes[p], x) for p, x in zip(PARAMS[:3], (t, g, m), strict=True)]
    # The (teff, logg, [M/H]) cells once: the base model and the response's two nodes
    # differ only in their [alpha/M] corners.
    index3, raw3 = _cell3(axes, at)
    index, raw = _with_alpha(axes, index3, raw3, at_alpha)
    present = exists[index[..., 0], index[..., 1], index[..., 2], index[..., 3]]
    weight = _renormalised(raw, present)
    # Between nodes, beyond them, or at an upper node that a corner of the point's cell
    # lacks (renormalising would move the point to the corners that have it).
    need = ((f != 0.0) & (f != 1.0)) | ((f == 1.0) & ((raw > 0) & ~present).any(axis=1))
    if not need.any():
        return index, weight
    rows = np.flatnonzero(need)
    # The base model: the point's cell at its lower node k (the corners it has already, with
    # the weights of a point at that node, fraction 0: _with_alpha's products by 1 and 0, the
    # (teff, logg, [M/H]) products themselves and zeros, formed directly: ~35 us a call).
    raw = np.zeros((rows.size, 8, 2))
    raw[:, :, 0] = raw3[rows]
    raw = raw.reshape(rows.size, 16)
    weight[rows] = _renormalised(raw, present[rows])
    n = weight.shape[1]
    index = np.concatenate([index] * 3, axis=1)
    weight = np.concatenate([weight, np.zeros((weight.shape[0], 2 * n))], axis=1)
    lower = k[rows]
    for j in range(nodes.size - 1):  # the few intervals (not np.unique's calls)
        sub = np.flatnonzero(lower == j)
        if not sub.size:
            continue
        both, fehs = _alpha_pairs(exists, axes["feh"], j)
        if not fehs.size:
            continue
        mine = rows[sub]
        here = [(lo[mine], fr[mine]) for lo, fr in at[:2]]
        here.append(_position(axes["feh"], np.minimum(np.maximum(m[mine], fehs[0]), fehs[-1])))
        here3, here_raw = _cell3(axes, here)
        has = both[here3[..., 0], here3[..., 1], here3[..., 2]][:, _CORNER3]
        # The upper node's cells and the lower's in one pass (each row's values its own: ~25
        # numpy calls fewer), at the nodes' positions as _position gives them (fraction 0,
        # 1 at the last node).
        top = nodes.size - 2
        at_nodes = (np.repeat([min(j + 1, top), j], mine.size),
                    np.repeat([float(j + 1 > top), 0.0], mine.size))
        i, w = _with_alpha(axes, np.concatenate([here3, here3]),
                           np.concatenate([here_raw, here_raw]), at_nodes)
        w = _renormalised(w, np.concatenate([has, has]))
        index[mine, n:] = _side_by_side(i.reshape((2, mine.size) + i.shape[1:]))
        # NaN (no corner has both nodes) to 0: np.nan_to_num's values (no infinity here)
        weight[mine, n:] = _side_by_side(_RESPONSE_SIGNS * f[mine, None] * np.where(
            np.isnan(w), 0.0, w).reshape(2, mine.size, n))
    return index, weight


#: The signs of the response's upper and lower node (:func:`_alpha_response_weights`).
_RESPONSE_SIGNS = np.array([1.0, -1.0])[:, None, None]


def _side_by_side(parts):
    """Two blocks (2, n, C, ...) side by side (n, 2 C, ...)."""
    return np.concatenate([parts[0], parts[1]], axis=1)


def _alpha_pairs(exists, fehs, j):
    """Which (teff, logg, [M/H]) have both [alpha/M] nodes ``j`` and ``j + 1``, and the
    [M/H] values where any does."""
    both = exists[..., j] & exists[..., j + 1]
    return both, np.asarray(fehs, dtype=np.float64)[both.any(axis=(0, 1))]
