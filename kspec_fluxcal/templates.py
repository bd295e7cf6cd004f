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

import hashlib
import json
import types
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse
import xarray as xr

from ._recent import Recent, per_library, read_only
from .config import Config, continuum_options
from .continuum import sparse_products
from .convolution import (
    NSIGMA,
    convolution_entries,
    convolution_matrix,
    excess_variance,
    gaussian_widths,
    log_sampling,
    width_entries,
)
from .errors import FluxCalWarning, GridError
from .exposure import setup_key
from .grid import PARAMS
from .lsf import LineSpread
from .preblur import blur_plan, blurred_entries, with_blurred
from .template_cache import (
    CACHE_ENV,
    _cache_dir,
    _read_cached,
    _write_cached,
    default_cache_dir,
)
from .wavelength import keyed_wavelengths, wavelength_key

__all__ = ["convolution_matrix", "prepare_templates", "prepared_templates", "clear_cache",
           "prepare_library", "library_spectra", "library_columns", "library_bands",
           "library_models", "library_arrays", "library_range", "is_library", "check_coverage",
           "default_cache_dir", "CACHE_ENV", "SPECTRA_DTYPE"]

#: dtype of the template spectra: a library's ``flux`` and ``norm``, its operators to an
#: exposure's pixels, the templates they give, which the fit keeps and interpolates between
#: grid points (:class:`~kspec_fluxcal.fit.exposure_templates.ExposureTemplates`). Seven
#: digits are far more than any template's accuracy and halve the memory and memory traffic
#: of the largest arrays; sums over pixels (chi^2, normal equations) and the final model are
#: float64 (float32 chi^2 sums picked another best template for 3-4 % of stars: HISTORY.md).
SPECTRA_DTYPE = np.float32


def _apply(block, matrix):
    flat = block.reshape(-1, block.shape[-1]).astype(np.float64)
    out = (matrix @ flat.T).T
    return out.reshape(block.shape[:-1] + (matrix.shape[0],)).astype(SPECTRA_DTYPE)


def check_coverage(templates, wavelength, lsf, what="grid"):
    """The range (Angstrom) an exposure needs of templates: its own plus the LSF's wings.

    Raises
    ------
    GridError
        When ``templates`` (a grid or a library) do not cover it.
    """
    wave_in = templates.variables["wavelength"].values  # no DataArray (~40 us)
    wave = np.asarray(wavelength, dtype=np.float64)
    margin = NSIGMA * np.max(_as_lsf(lsf).sigma(wave[[0, -1]]))
    need = (wave[0] - margin, wave[-1] + margin)
    if wave_in[0] > need[0] or wave_in[-1] < need[1]:
        lo, hi = 10 * np.floor(min(need[0], wave_in[0]) / 10), 10 * np.ceil(
            max(need[1], wave_in[-1]) / 10)
        raise GridError(templates.attrs.get("store"), "wavelength",
                        f"the {what} covers {wave_in[0]:.0f}-{wave_in[-1]:.0f} A but the exposure "
                        f"needs {need[0]:.0f}-{need[1]:.0f} A (its range plus the LSF wings); "
                        f"build the grid with --wave-min {lo:.0f} --wave-max {hi:.0f} (within "
                        "what its source files cover)")
    return need


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
    need = check_coverage(grid, wave_out, lsf)
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
            exclude_dims={"wavelength"}, dask="parallelized", output_dtypes=[SPECTRA_DTYPE],
            dask_gufunc_kwargs={"output_sizes": {"wavelength": wave_out.size}},
        )
        out[name] = res.assign_attrs(var.attrs)
    ds = xr.Dataset(out).assign_coords(wavelength=("wavelength", wave_out,
                                                   {"units": "Angstrom", "medium": "air"}))
    for name in ("exists", "synth_mag", "ext_coeff", "ext_slope"):
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


#: Prepared cubes, by grid and setup (also as Zarr stores with a cache directory).
_PREPARED = Recent(4)


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
    variables = tuple(variables)
    lsf = _as_lsf(lsf)
    wave = np.asarray(wavelength, dtype=np.float64)
    ident = str(grid.attrs.get("build_plan") or id(grid)) + str(grid.attrs.get("store", ""))
    key = hashlib.sha1(f"{ident}|{setup_key(wave, lsf)}|{variables}".encode()).hexdigest()[:16]
    ds = _PREPARED.get(key)
    if ds is not None:
        return ds
    path = None if cache_dir is None else Path(cache_dir) / f"prepared-{key}.zarr"
    ds = _read_cached(path) if path is not None and path.exists() else None
    if ds is None:
        ds = prepare_templates(grid, wave, lsf, variables=variables).load()
        if path is not None:
            _write_cached(ds, path)
    _PREPARED.put(key, ds)
    return ds


def clear_cache():
    """Forget the prepared cubes, template libraries and operators held in memory (the disk
    cache stays)."""
    _PREPARED.clear()
    _LIBRARIES.clear()
    _OPERATORS.clear()
    _WIDTH_ENTRIES.clear()
    _ARRAYS.clear()
    _TRANSPOSED.clear()


# ----------------------------------------------------------------------------- libraries
#
# A template library is the grid prepared once for a wavelength range (an instrument
# configuration), independently of any exposure's wavelength solution and line spread: the
# existing templates, stacked along ``template``, on the grid's own sampling (pre-convolved
# when the grid is much sharper than any K-SPEC setup needs), with their pseudo-continua
# fitted once. An exposure then costs one sparse product for the templates it can select:
# convolution to its own LSF (times a fitted width correction) and sampling at its pixels,
# the operator built once per (pixels, LSF) and cached.

#: Grids sharper than this are pre-convolved to it when a library is prepared: K-SPEC setups
#: are far coarser (lambda/FWHM ~ 3000 at 4096 pixels, ~ 600 for the IsoPlane-320), and the
#: library's memory grows with the grid's sampling.
LIBRARY_MAX_RESOLVING_POWER = 20000.0
#: Samples per FWHM of a pre-convolved library (band-limited sampling, with margin).
_SAMPLES_PER_FWHM = 2.5
#: Library ranges are rounded outward to multiples of this (Angstrom), so that exposures of
#: one configuration, whose wavelength solutions differ a little, share one library.
LIBRARY_RANGE_STEP = 500.0
#: Largest LSF width correction a library's range allows for (wings of 5 sigma at this scale).
LIBRARY_MAX_LSF_SCALE = 1.5
#: Templates whose continuum is fitted at once (bounds the fit's temporary memory).
_CONTINUUM_BLOCK = 64


def _wing(wavelength, lsf, scale=LIBRARY_MAX_LSF_SCALE):
    return NSIGMA * scale * float(np.max(lsf.sigma(np.asarray(wavelength)[[0, -1]])))


def library_range(wavelength, lsf):
    """The wavelength range (Angstrom) of the library serving an exposure.

    The exposure's range plus the LSF's wings (at up to :data:`LIBRARY_MAX_LSF_SCALE` times
    its width), rounded outward to :data:`LIBRARY_RANGE_STEP`.
    """
    wave = np.asarray(wavelength, dtype=np.float64)
    wing = _wing([np.min(wave), np.max(wave)], _as_lsf(lsf)) + 10.0
    step = LIBRARY_RANGE_STEP
    return (float(np.floor((np.min(wave) - wing) / step) * step),
            float(np.ceil((np.max(wave) + wing) / step) * step))


def is_library(obj):
    """True for a Dataset made by :func:`prepare_library`."""
    return isinstance(obj, xr.Dataset) and obj.attrs.get("kind") == "template library"


#: Libraries kept in memory per process (each ~10-100 MB).
_LIBRARIES = Recent(3)
_ARRAYS = Recent(8)  # library_arrays of the libraries met so far (a few KB each)


def library_arrays(library):
    """A library's template parameters, grid axes and template index as numpy arrays, looked
    up once per library (the fit reads them ~50 times per exposure, ~15 us each in xarray).

    Parameters
    ----------
    library : xarray.Dataset
        From :func:`prepare_library` (one without a ``library_key`` is read each time).

    Returns
    -------
    types.MappingProxyType
        ``template_<p>`` (along ``template``) and ``<p>`` (the grid's axis) for each
        parameter ``p``, and ``template_index``; read-only views of the library's arrays.
    """
    return per_library(_ARRAYS, _library_arrays, library)


def _library_arrays(library):
    names = (*PARAMS, *(f"template_{p}" for p in PARAMS), "template_index")
    return types.MappingProxyType({name: read_only(library[name].values) for name in names})


def prepare_library(grid, wave_range, config=None, *, cache_dir=None,
                    max_resolving_power=LIBRARY_MAX_RESOLVING_POWER, line_spreads=None):
    """The template library of a grid for a wavelength range, computed once.

    Kept in memory (the last few, per process) and on disk, as a Zarr store
    ``library-<key>.zarr`` named by a hash of the grid build, the range and the options, so
    that later commands and other processes load it (a fraction of a second) instead of
    fitting every template's continuum again (seconds). A damaged store is rebuilt with a
    note; stores are published atomically, so concurrent jobs may share a cache.

    Parameters
    ----------
    grid : xarray.Dataset
        A cube from :func:`kspec_fluxcal.open_grid`.
    wave_range : (float, float)
        Range to cover, Angstrom (see :func:`library_range`), increasing; clipped to the
        grid's.
    config : Config, optional
        Continuum options ([continuum]) are taken from it.
    cache_dir : path-like, False or None
        Where libraries are kept on disk; None: :func:`default_cache_dir` (next to the grid
        store, or the user's cache; the environment variable ``KSPEC_FLUXCAL_CACHE``
        overrides it); False or ``'off'``: in memory only.
    max_resolving_power : float
        Sharper grids are pre-convolved to this resolving power first.
    line_spreads : iterable of LineSpread, optional
        The line spreads of the exposures it will serve (with config's [instrument] fwhm,
        that one): the library is then pre-blurred for them where that pays
        (:mod:`kspec_fluxcal.preblur`; in memory only, its ``library_key`` naming the rungs).

    Returns
    -------
    xarray.Dataset
        In memory. Dims (``template``, ``wavelength``): ``flux`` (surface flux,
        erg/s/cm^2/A) and ``norm`` (flux over its pseudo-continuum, fitted as observed
        spectra are), float32; per template ``synth_mag``, ``ext_coeff``, ``ext_slope`` (0
        for a grid built without it) and coordinates
        ``template_teff`` ... ``template_alpha`` (existing grid points only, in the grid's
        order: Teff slowest); ``template_index`` (teff, logg, feh, alpha): position along
        ``template``, -1 where the grid has a hole. Attrs: ``resolving_power`` of the library
        and the grid's identity.

    Raises
    ------
    GridError
        When the range has no part in the grid's (reversed, or outside it).
    """
    config = Config() if config is None else config
    options = continuum_options(config)
    wave_in = grid["wavelength"].values
    lo, hi = max(float(wave_range[0]), float(wave_in[0])), min(float(wave_range[1]),
                                                               float(wave_in[-1]))
    if not hi - lo > 0:  # reversed, or outside the grid: no template pixel to keep
        raise GridError(grid.attrs.get("store"), None, f"wavelength range {wave_range[0]:g}-"
                        f"{wave_range[1]:g} A has no part in the grid's {wave_in[0]:g}-"
                        f"{wave_in[-1]:g} A (an increasing range inside it is needed)")
    ident = f"{grid.attrs.get('build_plan') or id(grid)}|{grid.attrs.get('store', '')}"
    key = hashlib.sha1(f"{ident}|{lo:.1f}|{hi:.1f}|{sorted(options.items())}|"
                       f"{max_resolving_power}|{LIBRARY_LAYOUT}".encode()).hexdigest()[:16]
    library = _LIBRARIES.get(key)
    if library is None:
        library = _stored_library(grid, key, (lo, hi), options, max_resolving_power, cache_dir)
        _LIBRARIES.put(key, library)
    if line_spreads is None:
        return library
    if config.instrument.fwhm > 0:  # what exposure_lsf gives every exposure
        line_spreads = [LineSpread.constant(config.instrument.fwhm)]
    plan = blur_plan(library, [_as_lsf(s) for s in line_spreads], LIBRARY_MAX_LSF_SCALE)
    if plan is None:
        return library
    blurred = _LIBRARIES.get(plan.key)
    if blurred is None:
        blurred = with_blurred(library, plan)
        _LIBRARIES.put(plan.key, blurred)
    return blurred


def _stored_library(grid, key, wave_range, options, max_resolving_power, cache_dir):
    """Library ``key`` read from the disk cache, or built (and kept there)."""
    library = None
    # A grid not opened from a store (id() in its identity) has nothing to share on disk.
    folder = _cache_dir(cache_dir, grid) if grid.attrs.get("build_plan") else None
    path = None if folder is None else folder / f"library-{key}.zarr"
    if path is not None and path.exists():
        library = _read_cached(path, LIBRARY_VARIABLES, "template-library",
                               check=lambda ds: _library_problem(ds, key))
    if library is None:
        library = _build_library(grid, *wave_range, options, max_resolving_power)
        library.attrs["library_key"] = key
        if path is not None:
            _write_cached(library, path)
    return library


#: Variables of a library store whose every chunk must be present.
LIBRARY_VARIABLES = ("flux", "norm", "synth_mag", "ext_coeff", "ext_slope", "template_index")
#: Version of a library's variables, part of its key: libraries cached by a version without
#: ``ext_slope`` are not found (and are made again), not reported as damaged.
LIBRARY_LAYOUT = 2


def _library_problem(ds, key):
    """What makes a cached store unfit as library ``key`` (None when it is fit)."""
    if not is_library(ds) or ds.attrs.get("library_key") != key:
        return f"not the template library {key}"
    missing = [v for v in LIBRARY_VARIABLES if v not in ds]
    return f"missing {', '.join(missing)}" if missing else None


def _build_library(grid, lo, hi, options, max_resolving_power):
    from .continuum import fit_continuum

    wave_in = grid["wavelength"].values
    keep = np.flatnonzero((wave_in >= lo) & (wave_in <= hi))
    keep = slice(max(int(keep[0]) - 1, 0), int(keep[-1]) + 2)
    # (only what is used: a grid opened without Dask is read whole when stacked)
    used = grid[["flux", "exists", "synth_mag", "ext_coeff"]]
    # A grid built before ext_slope existed: reddening linear in E(B-V), as it was then.
    used["ext_slope"] = grid["ext_slope"] if "ext_slope" in grid else xr.zeros_like(
        grid["ext_coeff"])
    stacked = used.isel(wavelength=keep).stack(template=PARAMS)
    exists = grid["exists"].values
    present = np.flatnonzero(stacked["exists"].values)
    stacked = stacked.isel(template=present)
    wave = stacked["wavelength"].values
    flux = stacked["flux"].transpose("template", "wavelength").values.astype(np.float64)
    resolving_power = float(grid.attrs.get("resolving_power", np.inf))
    if resolving_power > max_resolving_power:
        # Pre-convolved to max_resolving_power (FWHM = lambda / R) on a uniform ln grid.
        step = 1.0 / (max_resolving_power * _SAMPLES_PER_FWHM)
        new = np.exp(np.arange(np.log(wave[0]) + 6 * step, np.log(wave[-1]) - 6 * step, step))
        matrix, _ = convolution_matrix(
            wave, new, LineSpread((0.0, 1e4 / max_resolving_power), "library"),
            None if not np.isfinite(resolving_power) else resolving_power)
        flux = np.asarray((matrix @ flux.T).T)
        wave, resolving_power = new, max_resolving_power
    norm = np.empty(flux.shape, dtype=SPECTRA_DTYPE)
    for start in range(0, flux.shape[0], _CONTINUUM_BLOCK):
        block = flux[start:start + _CONTINUUM_BLOCK]
        with np.errstate(invalid="ignore", divide="ignore"):
            norm[start:start + _CONTINUUM_BLOCK] = block / fit_continuum(block, wave, **options)
    template_index = np.full(exists.shape, -1, dtype=np.int64)
    template_index[exists] = np.arange(present.size)
    return xr.Dataset(
        {
            "flux": (("template", "wavelength"), flux.astype(SPECTRA_DTYPE),
                     {"units": "erg/(s cm2 Angstrom)", "description": "surface flux"}),
            "norm": (("template", "wavelength"), norm,
                     {"units": "1", "description": "flux / pseudo-continuum"}),
            "synth_mag": (("template", "band"),
                          stacked["synth_mag"].transpose("template", "band").values,
                          {"units": "mag", "system": "AB"}),
            **{name: (("template", "law", "band"),
                      stacked[name].transpose("template", "law", "band").values)
               for name in ("ext_coeff", "ext_slope")},
            "template_index": (PARAMS, template_index),
        },
        coords={
            "wavelength": ("wavelength", wave, {"units": "Angstrom", "medium": "air"}),
            "band": ("band", np.asarray(grid["band"].values).astype(str)),
            "law": ("law", np.asarray(grid["law"].values).astype(str)),
            **{p: (p, grid[p].values) for p in PARAMS},
            **{f"template_{p}": ("template", stacked[p].values) for p in PARAMS},
        },
        attrs={**{k: v for k, v in grid.attrs.items() if k != "complete"},
               "kind": "template library", "resolving_power": resolving_power,
               "continuum": json.dumps(options), "wave_min": float(wave[0]),
               "wave_max": float(wave[-1])},
    )


#: Library-to-exposure operators, by (library, pixels, LSF): a few, with their memory.
_OPERATORS = Recent(6)  # an exposure uses 2-4 (a pre-blurred library's width trials), ~1 MB each
_LOG_SAMPLINGS = Recent(3)  # the libraries' log_sampling (~200 KB each)


def _library_log_sampling(library):
    return tuple(read_only(a) for a in log_sampling(library["wavelength"].values))


def _operator_key(library, wavelength, lsf):
    return (library.attrs.get("library_key", id(library)), wavelength_key(wavelength),
            None if lsf is None else lsf.key())


def _library_operator(library, wavelength, lsf):
    """The library-to-exposure operator (CSR, SPECTRA_DTYPE) for pixels ``wavelength`` and line
    spread ``lsf``, whether the library is sharper than the LSF, and the prefix of the spectra
    it applies to ('blurred_' for a pre-blurred library's, when they serve ``lsf``: see
    :mod:`kspec_fluxcal.preblur`); built once, kept."""
    key = _operator_key(library, wavelength, lsf)
    item = _OPERATORS.get(key)
    if item is not None:
        return item
    wave = keyed_wavelengths(wavelength)
    entries, prefix = blurred_entries(library, wave, lsf), "blurred_"
    if entries is None:  # the library's own spectra
        check_coverage(library, wave, lsf, "library")
        log_in = per_library(_LOG_SAMPLINGS, _library_log_sampling, library)
        entries = convolution_entries(log_in, wave, lsf, float(library.attrs["resolving_power"]),
                                      SPECTRA_DTYPE)
        prefix = ""
    vals, cols, indptr, sharper = entries
    # The library's dtype and int32 given (the entries' own): no matrix converted and copied
    matrix = scipy.sparse.csr_matrix(
        (vals.astype(SPECTRA_DTYPE, copy=False), cols.astype(np.int32, copy=False),
         indptr.astype(np.int32, copy=False)),
        shape=(wave.size, library.sizes[prefix + "wavelength"]))
    item = (matrix, sharper, prefix)
    _OPERATORS.put(key, item)
    return item


def library_spectra(library, wavelength, lsf, templates=None, *, kind="norm"):
    """Templates of a library convolved to an LSF and sampled at an exposure's pixels.

    Parameters
    ----------
    library : xarray.Dataset
        From :func:`prepare_library`.
    wavelength : array_like
        Pixel centres, Angstrom (air), increasing.
    lsf : LineSpread
        The line spread to convolve to (the library's own resolution is removed in
        quadrature; where the instrument is sharper, the templates are only interpolated and
        a :class:`FluxCalWarning` says so).
    templates : array_like of int or slice, optional
        Positions along ``template`` (default: all).
    kind : {'norm', 'flux'}
        Normalised spectra or surface fluxes.

    Returns
    -------
    numpy.ndarray, shape (ntemplate, npix)
        float64.
    """
    return np.asarray(library_columns(library, wavelength, lsf, templates, kind=kind,
                                      stacklevel=3), dtype=np.float64).T


def library_columns(library, wavelength, lsf, templates=None, *, kind="norm", stacklevel=2):
    """:func:`library_spectra` as the operator gives them, for a caller that stores them its
    own way (one conversion and copy instead of two).

    Parameters
    ----------
    library, wavelength, lsf, templates, kind
        As for :func:`library_spectra`.
    stacklevel : int
        Where the warning of a sharp line spread points, as for :func:`warnings.warn`.

    Returns
    -------
    numpy.ndarray, shape (npix, ntemplate)
        :data:`SPECTRA_DTYPE`, one column per template.
    """
    matrix, operand = _operands(library, wavelength, lsf, templates, kind, stacklevel + 1)
    return matrix @ operand


def library_bands(library, wavelength, lsf, templates=None, *, kind="norm", stacklevel=2):
    """:func:`library_columns` a band of pixels at a time, for a caller that copies them into
    rows (a transposing copy): each band's columns are still in the cache (for 225 templates
    at 4096 pixels, the product and the copy took ~4.1 instead of ~4.6 ms). Yields pairs
    ``(pixels, columns)``: a slice of the pixels and those rows of :func:`library_columns`'
    product, to the last bit (each pixel's sums are its own); a few templates in one band.

    Takes the arguments of :func:`library_columns`."""
    matrix, operand = _operands(library, wavelength, lsf, templates, kind, stacklevel + 1)
    if operand.shape[1] < _TRANSPOSED_FROM:  # a small product: its copy is cheap
        yield slice(None), matrix @ operand
        return
    for pixels, band in _pixel_bands(matrix, _PIXEL_BAND):
        yield pixels, band @ operand


#: Pixels of an operator multiplied at a time by :func:`library_bands` (225 templates:
#: ~0.45 MB of float32 columns a band, about the L2 cache of this machine's cores).
_PIXEL_BAND = 512


def _pixel_bands(matrix, size):
    """The rows of a CSR ``matrix`` by bands of ``size``: pairs (slice, CSR matrix), a band's
    matrix valid until the next is asked for (one per band size, its arrays replaced: scipy's
    checks of a new one take ~35 us; an exposure's 8 bands ~0.27 against ~0.02 ms)."""
    indptr, band = matrix.indptr, None
    for start in range(0, matrix.shape[0], size):
        stop = min(start + size, matrix.shape[0])
        first, last = indptr[start], indptr[stop]
        arrays = (matrix.data[first:last], matrix.indices[first:last],
                  indptr[start:stop + 1] - first)
        if band is None or band.shape[0] != stop - start:
            band = scipy.sparse.csr_matrix(arrays, shape=(stop - start, matrix.shape[1]))
        else:
            band.data, band.indices, band.indptr = arrays
        yield slice(start, stop), band


def _operands(library, wavelength, lsf, templates, kind, stacklevel):
    """The operator of :func:`library_columns`, the library's spectra it multiplies (C order,
    one column per template)."""
    lsf = _as_lsf(lsf)
    matrix, sharper, prefix = _library_operator(library, wavelength, lsf)
    _warn_sharper(library, sharper, stacklevel + 1)
    kind = prefix + kind
    data = library.variables[kind].values
    templates = slice(None) if templates is None else templates
    count = len(range(*templates.indices(len(data)))) if isinstance(templates, slice) else \
        np.size(templates)
    if count < _TRANSPOSED_FROM:  # a few corners: gathering rows is cheaper
        return matrix, np.ascontiguousarray(data[templates].T)
    # Many templates (an exposure's candidates): columns of the library kept transposed,
    # one gather instead of a gather and a transposing copy (~3 of ~8 ms for 200).
    columns = per_library(_TRANSPOSED, _transposed, library, kind)
    if isinstance(templates, slice):
        if templates.indices(columns.shape[1]) == (0, columns.shape[1], 1):
            return matrix, columns
        templates = np.arange(*templates.indices(columns.shape[1]))
    # take, not columns[:, templates]: that returns an F-ordered array (and a slice a
    # strided view), which scipy's product first copies to C order.
    return matrix, np.take(columns, templates, axis=1)


def _warn_sharper(library, sharper, stacklevel):
    """The warning of a line spread sharper than the library on a fraction ``sharper`` > 0."""
    if sharper > 0:
        step = np.median(np.diff(library["wavelength"].values))
        warnings.warn(f"the templates (R = {library.attrs['resolving_power']:g}, sampled "
                      f"every ~{step:.2g} A) are coarser than the line spread on "
                      f"{10 * round(10 * sharper):.0f}% of the pixels: there they are "
                      "interpolated, not convolved", FluxCalWarning, stacklevel=stacklevel)


def library_models(library, wavelength, lsf, templates, weights, factors, kinds=("norm",)):
    """Models ``weights`` (M, len(templates)) ``@`` the ``templates``' spectra of each of
    ``kinds`` ('norm', 'flux') as :func:`library_spectra` gives them at ``lsf`` scaled by each
    of ``factors`` (the width fit's trials, the final model's width), each model convolved
    once (combined first, in float32), the widths on one set of kernel entries
    (:func:`~kspec_fluxcal.convolution.gaussian_widths`), or by their operators where each is
    kept already (a product of a few columns) or the library is pre-blurred (samples differ).
    Returns (len(factors), len(kinds) * M, P), float64: the kinds' M models in turn."""
    lsf, scaled = _as_lsf(lsf), [_as_lsf(lsf).scaled(f) for f in factors]
    # Sparse: the templates' rows read in place, not gathered; its CSR arrays given (scipy's
    # matrix of the (row, template) pairs, for increasing ids, without their sort: ~60 us)
    nonzero = weights != 0
    combine = scipy.sparse.csr_matrix(
        (weights[nonzero].astype(np.float32), np.broadcast_to(templates, nonzero.shape)[nonzero],
         np.append(0, np.cumsum(nonzero.sum(axis=1)))),
        shape=(len(weights), library.sizes["template"]))

    def models(prefix):  # in float32, as the kernels' products take them
        return np.concatenate([combine @ library.variables[prefix + kind].values for kind in kinds])

    if "blurred_norm" in library or all(_OPERATORS.get(_operator_key(library, wavelength, one))
                                        for one in scaled):
        out = []
        for one in scaled:
            matrix, sharper, prefix = _library_operator(library, wavelength, one)
            _warn_sharper(library, sharper, 3)
            # a few models one by one: 2 in ~0.12 instead of ~0.32 ms (alone; fit: -15 %)
            out.append(sparse_products(matrix, models(prefix), SPECTRA_DTYPE, few=4))
        return np.stack(out, dtype=np.float64)
    wave = keyed_wavelengths(wavelength)
    check_coverage(library, wave, scaled[int(np.argmax(factors))], "library")
    excess = [excess_variance(wave, one, float(library.attrs["resolving_power"]))
              for one in scaled]
    log_in, ln_out = per_library(_LOG_SAMPLINGS, _library_log_sampling, library), np.log(wave)
    out, sharper = gaussian_widths(log_in, ln_out, excess, models("").T,
                                   _width_entries(library, wave, log_in, ln_out, excess))
    for fraction in sharper:
        _warn_sharper(library, fraction, 3)
    return out.transpose(0, 2, 1)


#: The width fit's kernel entries by (library, pixels): the final model's width, within its
#: trials' in most exposures, takes them too (~1.3 of ~2 ms of its models, without them).
_WIDTH_ENTRIES = Recent(2)


def _width_entries(library, wave, log_in, ln_out, excess):
    """The kept kernel entries for pixels ``wave`` when they reach as far as the widest of
    ``excess`` needs, else those made for it (and kept)."""
    key, widest = _operator_key(library, wave, None), np.max(excess, axis=0)
    kept = _WIDTH_ENTRIES.get(key)
    if kept is None or np.any(widest > kept[0]):
        kept = (widest, tuple(read_only(a) for a in width_entries(log_in, ln_out, widest)))
        _WIDTH_ENTRIES.put(key, kept)
    return kept[1]


#: Gathers of at least this many templates take columns of the transposed library.
_TRANSPOSED_FROM = 64
#: (wavelength, template) copies of the libraries' spectra (``norm``, the fit's), ~10-50 MB
#: each: as many as libraries are kept (_LIBRARIES), so that a survey interleaving
#: configurations does not remake them.
_TRANSPOSED = Recent(3)


def _transposed(library, kind):
    return read_only(np.ascontiguousarray(library[kind].values.T))
