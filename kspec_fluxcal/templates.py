"""Templates prepared for an instrument setup: the grid convolved to the instrument's
line-spread function and sampled on the exposure's wavelengths, computed once per setup.

Method
------
Convolution and resampling are one sparse linear operator applied to the whole cube. Row j
(an exposure pixel at lambda_j) holds a Gaussian in ln(lambda) centred on ln(lambda_j), of
width

    sigma_j^2 = (FWHM_inst(lambda_j)^2 - (lambda_j / R)^2) / (lambda_j^2 * 8 ln 2),

i.e. the instrument's FWHM with the grid's own resolution (FWHM = lambda / R, Gaussian)
removed in quadrature, sampled on the grid's wavelengths with their ln(lambda) widths as
weights and normalised to unit sum. Each output pixel has its own kernel, so a
wavelength-dependent FWHM (FWHMPCk) is applied exactly, with no piecewise approximation.
The result is the convolved spectrum evaluated at pixel centres: band-limited sampling, as the
header FWHM (measured on arc lines) already includes the pixel response and the convolved
spectrum has no structure narrower than ~2 pixels. It is not a flux-conserving rebinning.
Where the instrument is sharper than the grid, the kernel falls back to half a grid pixel
(plain interpolation) and a warning says so.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse
import xarray as xr

from ._atomic import atomic_directory
from ._zarr import strings_as_object
from .constants import FWHM_PER_SIGMA
from .errors import FluxCalWarning, GridError
from .exposure import setup_key
from .grid import PARAMS, check_chunks, open_checked_store
from .lsf import LineSpread

__all__ = ["convolution_matrix", "prepare_templates", "prepared_templates", "clear_cache"]

_NSIGMA = 5.0


def convolution_matrix(wave_in, wave_out, lsf, resolving_power=None):
    """Sparse operator convolving spectra on ``wave_in`` to ``lsf`` and sampling at ``wave_out``.

    Parameters
    ----------
    wave_in : numpy.ndarray
        Increasing input wavelengths (Angstrom), e.g. the grid's.
    wave_out : numpy.ndarray
        Increasing output pixel centres (Angstrom).
    lsf : LineSpread
        Instrument line-spread function.
    resolving_power : float, optional
        Resolving power of the input spectra (Gaussian FWHM = lambda / R), removed in
        quadrature; None for infinitely sharp input.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix, shape (len(wave_out), len(wave_in))
        Rows sum to 1.
    sharper : float
        Fraction of output pixels where the instrument is sharper than the input.
    """
    ln_in = np.log(np.asarray(wave_in, dtype=np.float64))
    wave_out = np.asarray(wave_out, dtype=np.float64)
    ln_out = np.log(wave_out)
    sig_inst = lsf.fwhm(wave_out) / wave_out / FWHM_PER_SIGMA
    sig_grid = 0.0 if resolving_power is None else 1.0 / (resolving_power * FWHM_PER_SIGMA)
    excess = sig_inst**2 - sig_grid**2
    dln = np.gradient(ln_in)
    floor = 0.5 * np.interp(ln_out, ln_in, dln)
    sharper = float(np.mean(excess <= floor**2))
    sigma = np.sqrt(np.maximum(excess, floor**2))
    lo = np.searchsorted(ln_in, ln_out - _NSIGMA * sigma, side="left")
    hi = np.searchsorted(ln_in, ln_out + _NSIGMA * sigma, side="right")
    width = int(np.max(hi - lo))
    cols = lo[:, None] + np.arange(width)[None, :]
    inside = cols < hi[:, None]
    cols = np.minimum(cols, ln_in.size - 1)
    u = (ln_in[cols] - ln_out[:, None]) / sigma[:, None]
    vals = np.where(inside, np.exp(-0.5 * u**2) * dln[cols], 0.0)
    vals /= vals.sum(axis=1, keepdims=True)
    rows = np.broadcast_to(np.arange(wave_out.size)[:, None], cols.shape)
    matrix = scipy.sparse.csr_matrix((vals[inside], (rows[inside], cols[inside])),
                                     shape=(wave_out.size, ln_in.size))
    return matrix, sharper


def _apply(block, matrix):
    flat = block.reshape(-1, block.shape[-1]).astype(np.float64)
    out = (matrix @ flat.T).T
    return out.reshape(block.shape[:-1] + (matrix.shape[0],)).astype(np.float32)


def _as_lsf(lsf):
    if isinstance(lsf, LineSpread):
        return lsf
    if isinstance(lsf, dict):
        return LineSpread.from_attrs(lsf)
    return LineSpread.constant(float(lsf), "argument")


def prepare_templates(grid, wavelength, lsf, *, variables=("flux", "continuum")):
    """Convolve the template cube to an instrument LSF and sample it on exposure wavelengths.

    Parameters
    ----------
    grid : xarray.Dataset
        A cube from :func:`kspec_fluxcal.open_grid`.
    wavelength : array_like or xarray.DataArray
        The exposure's pixel centres, Angstrom, in air (like the grid).
    lsf : LineSpread, dict of attrs, or float
        Line-spread function (a float is a constant FWHM in Angstrom).
    variables : sequence of str
        Spectral variables to prepare.

    Returns
    -------
    xarray.Dataset
        Lazy (Dask) when the grid is: dims (teff, logg, feh, alpha, wavelength) on the
        exposure's wavelengths, float32, with the grid's ``exists``, ``synth_mag`` and
        ``ext_coeff`` carried over and the LSF and setup in attrs.

    Raises
    ------
    GridError
        When the grid does not cover the wavelengths (plus the kernel's wings).
    """
    lsf = _as_lsf(lsf)
    wave_out = np.asarray(wavelength, dtype=np.float64)
    wave_in = grid["wavelength"].values
    resolving_power = float(grid.attrs.get("resolving_power", np.inf))
    margin = _NSIGMA * np.max(lsf.sigma(wave_out[[0, -1]]))
    need = (wave_out[0] - margin, wave_out[-1] + margin)
    if wave_in[0] > need[0] or wave_in[-1] < need[1]:
        raise GridError(grid.attrs.get("store"), "wavelength",
                        f"the grid covers {wave_in[0]:.0f}-{wave_in[-1]:.0f} A but the exposure "
                        f"needs {need[0]:.0f}-{need[1]:.0f} A (its range plus the LSF wings)")
    keep = np.flatnonzero((wave_in >= need[0]) & (wave_in <= need[1]))
    keep = slice(max(int(keep[0]) - 1, 0), int(keep[-1]) + 2)
    sub = grid.isel(wavelength=keep)
    matrix, sharper = convolution_matrix(sub["wavelength"].values, wave_out, lsf,
                                         resolving_power)
    if sharper > 0:
        warnings.warn(f"the instrument line-spread ({lsf.coeffs}) is sharper than the grid's "
                      f"resolution R = {resolving_power:g} on {100 * sharper:.0f}% of the "
                      "pixels: templates there are only interpolated, not convolved; use a "
                      "higher-resolution grid", FluxCalWarning, stacklevel=2)
    out = {}
    for name in variables:
        var = sub[name]
        if var.chunks is not None:
            var = var.chunk({"wavelength": -1})
        res = xr.apply_ufunc(
            _apply, var, kwargs={"matrix": matrix},
            input_core_dims=[["wavelength"]], output_core_dims=[["wavelength"]],
            exclude_dims={"wavelength"}, dask="parallelized", output_dtypes=[np.float32],
            dask_gufunc_kwargs={"output_sizes": {"wavelength": wave_out.size}},
        )
        out[name] = res.assign_attrs(var.attrs)
    ds = xr.Dataset(out).assign_coords(wavelength=("wavelength", wave_out,
                                                   {"units": "Angstrom", "medium": "air"}))
    for name in ("exists", "synth_mag", "ext_coeff"):
        if name in grid:
            ds[name] = grid[name]
    ds = ds.transpose(*PARAMS, "wavelength", ...)
    ds.attrs = {k: v for k, v in grid.attrs.items() if k != "complete"}
    ds.attrs.update({
        **lsf.to_attrs(),
        "setup": setup_key(wave_out, lsf),
        "prepared": "convolved to the instrument LSF (grid resolution removed in quadrature) "
                    "in ln(lambda), sampled at the exposure's pixel centres",
    })
    return ds


def _read_cached(path):
    """A cached prepared cube, in memory; None (with a note) when the store is damaged and
    must be prepared again: missing chunks would otherwise read as NaN templates."""
    try:
        check_chunks(path, hint="")
        return open_checked_store(path, hint="").load()
    except GridError as err:
        problem = str(err).removeprefix(f"{path}: ")
    except Exception as err:  # unreadable metadata: whatever Zarr raises
        problem = f"{type(err).__name__}: {err}"
    warnings.warn(f"{path}: damaged prepared-template cache ({problem}); rebuilt",
                  FluxCalWarning, stacklevel=4)
    return None


class _Cache:
    """Prepared cubes, by grid and setup: in memory (a few) and optionally as Zarr stores."""

    def __init__(self, size=4):
        self.size = size
        self._items = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, grid, wavelength, lsf, cache_dir=None, variables=("flux", "continuum")):
        lsf = _as_lsf(lsf)
        wave = np.asarray(wavelength, dtype=np.float64)
        ident = str(grid.attrs.get("build_plan") or id(grid)) + str(grid.attrs.get("store", ""))
        key = hashlib.sha1(f"{ident}|{setup_key(wave, lsf)}|{variables}".encode()).hexdigest()[:16]
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        self.misses += 1
        path = None if cache_dir is None else Path(cache_dir) / f"prepared-{key}.zarr"
        ds = _read_cached(path) if path is not None and path.exists() else None
        if ds is None:
            ds = prepare_templates(grid, wave, lsf, variables=variables).load()
            if path is not None:
                with atomic_directory(path, overwrite=True) as tmp:
                    # Every chunk written (also all-NaN ones): a missing one means damage.
                    strings_as_object(ds).to_zarr(tmp, mode="w", consolidated=False,
                                                  write_empty_chunks=True)
        with self._lock:
            self._items[key] = ds
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return ds

    def clear(self):
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0


_CACHE = _Cache()


def prepared_templates(grid, wavelength, lsf, *, cache_dir=None, variables=("flux", "continuum")):
    """Prepared templates for a setup, computed once and reused (see :func:`prepare_templates`).

    Cubes are kept in memory (the last few setups) and, with ``cache_dir``, as Zarr stores
    named by a hash of the grid build, the wavelength grid and the LSF, so other processes
    and later runs reuse them.

    Returns
    -------
    xarray.Dataset
        In memory (numpy-backed).
    """
    return _CACHE.get(grid, wavelength, lsf, cache_dir, tuple(variables))


def clear_cache():
    """Forget the prepared cubes held in memory."""
    _CACHE.clear()
