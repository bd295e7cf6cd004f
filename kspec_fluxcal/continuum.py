"""Pseudo-continuum normalisation, vectorised over spectra.

Observed and template spectra are normalised the same way: a B-spline (or a Legendre
polynomial) in normalised wavelength fitted by weighted least squares with iterative
asymmetric sigma clipping (pixels far below the fit are absorption lines and are dropped),
or a running median. Masked and non-positive pixels get zero weight: they are never divided
by. Thousands of spectra are fitted at once: the normal equations of every spectrum are
built with one sparse matrix product and solved as a batch.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.sparse
import xarray as xr

from ._bspline import basis_values
from ._nan import nan_to_num
from ._recent import RecentKeys

__all__ = ["fit_continuum", "normalize_continuum", "spline_basis", "normal_matrices",
           "sparse_products", "nanmedian", "fill_gaps"]

# Smoothness penalty (second differences of the coefficients) relative to the mean diagonal
# of the normal matrix: it only matters where knot intervals are empty (masked bands).
_PENALTY = 1e-4


def _normalised_key(wave):
    """Cache key of wavelengths ``wave`` (float64) normalised to [0, 1]: rounded, so that
    exposures of one setup, whose wavelengths differ by ~1e-11 A after unit and air/vacuum
    conversions, share entries."""
    x = (wave - wave[0]) / (wave[-1] - wave[0])
    return np.ascontiguousarray(np.round(x, 12)).tobytes()


#: :func:`_normalised_key` of wavelengths, the same key object for wavelengths seen recently
#: (~4 look-ups an exposure, each normalising, rounding and hashing a 32 kB row: ~27 us).
_key = RecentKeys(_normalised_key)


def _segments(spacing):
    """Knot intervals of a B-spline over [0, 1] with knots about every ``spacing``."""
    return max(1, int(round(1.0 / spacing)))


# Keyed by the knot intervals, not the spacing in Angstrom (each exposure's range differs):
# exposures whose normalised pixels agree share one basis.
@functools.lru_cache(maxsize=8)  # 1-3 per set of normalised pixels, ~1 MB each
def _basis(npix, x_bytes, method, nseg, degree):
    """Sparse design matrix (npix, nbasis), and the transposes of its row-wise outer products
    (nbasis^2, npix; upper triangles only, see :func:`normal_matrices`) and of itself, ready
    for sparse @ dense products. ``nseg``: knot intervals (:func:`_segments`) of a B-spline,
    unused by the polynomial."""
    x = np.frombuffer(x_bytes, dtype=np.float64)
    if method == "bspline":
        inner = np.linspace(0.0, 1.0, nseg + 1)
        knots = np.concatenate([[0.0] * degree, inner, [1.0] * degree])
        first, band, nb = basis_values(np.clip(x, 0.0, 1.0), knots, degree)
        cols = first[:, None] + np.arange(degree + 1)[None, :]
    else:  # Legendre polynomial of the given degree on [-1, 1]
        band = np.polynomial.legendre.legvander(2 * x - 1, degree)
        nb = band.shape[1]
        cols = np.broadcast_to(np.arange(nb), band.shape)
    # Only the non-zero products of each row (a B-spline row has degree + 1 values):
    # through a dense (npix, nb^2) array this was 10 ms per new set of wavelengths.
    basis = _rows_matrix(band, cols, nb)
    # The outer products b_i b_j with i <= j only (10 of a B-spline row's 16): b_j b_i is the
    # same number, so normal_matrices mirrors the upper triangles, to the last bit.
    i, j = np.triu_indices(band.shape[1])
    outer = _rows_matrix(band[:, i] * band[:, j], cols[:, i] * nb + cols[:, j], nb * nb)
    diff = np.diff(np.eye(nb), n=2, axis=0) if nb > 2 else np.zeros((1, nb))
    return basis, outer.T.tocsr(), basis.T.tocsr(), diff.T @ diff


@functools.lru_cache(maxsize=8)  # one per basis of :func:`_basis`' cache, ~0.7 MB each
def _normal_system(npix, x_bytes, method, nseg, degree):
    """``outer_t`` and ``basis_t`` of :func:`_basis` side by side, (nb^2 + nb, 2 npix): its
    product with a spectrum's weights followed by its weighted flux gives the normal matrix's
    upper triangle and the right-hand side in one sparse product, each row's sum the same
    (its own values in the same order). :func:`fit_continuum` makes ~5 such pairs of
    products a clipping pass (one pair a star); scipy's cost per call is ~7-10 us."""
    _, outer_t, basis_t, _ = _basis(npix, x_bytes, method, nseg, degree)
    return scipy.sparse.csr_matrix(
        (np.concatenate([outer_t.data, basis_t.data]),
         np.concatenate([outer_t.indices, basis_t.indices + npix]),
         np.concatenate([outer_t.indptr, basis_t.indptr[1:] + outer_t.nnz])),
        shape=(outer_t.shape[0] + basis_t.shape[0], 2 * npix))


def _rows_matrix(values, cols, ncol):
    """CSR matrix whose row i holds ``values[i]`` at columns ``cols[i]`` (increasing along
    each row, as a basis's consecutive functions and their outer products are); zeros
    dropped. The arrays are given in CSR order, so nothing is sorted (from (row, column)
    pairs, scipy's conversion took half of a new basis's ~5 ms)."""
    values = values.reshape(values.shape[0], -1)
    cols = np.broadcast_to(cols.reshape(cols.shape[0], -1), values.shape)
    keep = values != 0.0
    indptr = np.concatenate([[0], np.cumsum(np.count_nonzero(keep, axis=1))])
    return scipy.sparse.csr_matrix(
        (values[keep], cols[keep].astype(np.int32), indptr.astype(np.int32)),
        shape=(values.shape[0], ncol))


def normal_matrices(outer_t, columns):
    """The normal matrices sum_p c[p, n] b_p b_p^T, shape (N, nb, nb), of the columns
    ``columns`` (P, N) (weights, or weights times squared templates) from a basis's
    ``outer_t`` (:func:`spline_basis`): one sparse product gives each upper triangle, whose
    entries are the lower triangle's (the same terms summed in the same order). ``columns``
    may be the transpose of (N, P) rows, not copied (:func:`sparse_products`)."""
    nb = math.isqrt(outer_t.shape[0])
    return _mirrored(sparse_products(outer_t, np.transpose(columns)), nb)


def _mirrored(upper, nb):
    """The (N, nb, nb) matrices whose upper triangles are the first nb^2 columns of ``upper``
    (N, >= nb^2) (np.take: ~4 against ~9 us for the same copy by indexing)."""
    return np.take(upper, _mirror(nb), axis=1).reshape(-1, nb, nb)


#: Rows up to this many: :func:`sparse_products` multiplies them one by one. scipy's kernel
#: for several vectors costs ~4 ns per stored value of a wide matrix (``outer_t``: 41k
#: values, ~160 us) whatever their number up to 12, its one-vector kernel ~1 ns: 2 rows
#: ~1.7x, 3 ~1.2x faster one by one; from 4 on, or for a tall matrix (``basis``: one
#: vector ~16 us, three ~45 us at once, ~60 one by one), the several-vector kernel wins.
_ONE_BY_ONE = 3


def sparse_products(matrix, rows, dtype=np.float64, few=_ONE_BY_ONE):
    """``(matrix @ rows.T).T``, shape (N, M), of a sparse ``matrix`` (M, P) and dense
    ``rows`` (N, P) (for a wide matrix): the same sums in the same order (scipy's kernels
    add each row's products in turn from 0, for one vector or several), the rows one by one
    while they are ``few`` or fewer (:data:`_ONE_BY_ONE`, measured for ``outer_t``), in
    ``dtype`` (the rows converted to it, as the matrix's values are)."""
    rows = np.asarray(rows, dtype=dtype)
    if rows.shape[0] <= few:  # (np.promote_types: ~0.1 us, np.result_type ~0.8; ~36 calls a fit)
        out = np.empty((rows.shape[0], matrix.shape[0]), np.promote_types(matrix.dtype, dtype))
        for target, row in zip(out, rows, strict=True):
            target[:] = matrix @ row
        return out
    return (matrix @ np.ascontiguousarray(rows.T)).T


@functools.cache
def _mirror(nb):
    """For each entry (a, b) of an nb x nb matrix, flattened, the upper one (a <= b) equal
    to it."""
    a, b = np.divmod(np.arange(nb * nb), nb)
    return np.minimum(a, b) * nb + np.maximum(a, b)


def spline_basis(wavelength, knot_spacing, degree=3):
    """Cubic B-spline basis over a wavelength axis, with knots every ``knot_spacing`` A.

    Returns
    -------
    basis : scipy.sparse.csr_matrix, shape (npix, nbasis)
    outer_t : scipy.sparse.csr_matrix, shape (nbasis^2, npix)
        Row-wise outer products b_i b_j of the basis for i <= j (the rows of i > j are
        empty), transposed: normal matrices in one product (:func:`normal_matrices`).
    basis_t : scipy.sparse.csr_matrix, shape (nbasis, npix)
    penalty : numpy.ndarray, shape (nbasis, nbasis)
        Second-difference smoothness penalty.
    """
    wave = np.asarray(wavelength, dtype=np.float64)
    return _basis(wave.size, _key(wave), "bspline",
                  _segments(knot_spacing / (wave[-1] - wave[0])), degree)


#: Rows (along the last axis) up to this many: :func:`nanmedian` takes them one by one by
#: partial sorts (the fit's three stars' 4096 pixels: ~4x faster than one sort of all).
_PARTITIONED_ROWS = 16


def nanmedian(values, axis=-1):
    """Median along ``axis`` ignoring NaN, the axis kept (length 1); NaN where there is no
    value. By one sort: np.nanmedian's values, without its Python loop over long axes or
    its masked arrays for short ones (3-7x slower); a few rows by partial sorts (the same
    order statistics, so the same values)."""
    values = np.asarray(values)
    if (values.ndim == 2 and axis in (-1, 1) and values.dtype.kind == "f"
            and values.shape[0] <= _PARTITIONED_ROWS):
        return _row_medians(values)
    # NaN sort last; axes of up to 3 values (a few stars at every pixel) by compare-exchanges
    # over all of them at once, not a sort of every pixel's few (10x slower).
    few = np.shape(values)[axis] in _NETWORKS
    ordered = _sorted_few(values, axis) if few else np.sort(values, axis=axis)
    n = np.sum(~np.isnan(values), axis=axis, keepdims=True)
    lo = np.take_along_axis(ordered, np.clip((n - 1) // 2, 0, None), axis=axis)
    hi = np.take_along_axis(ordered, np.clip(n // 2, 0, None), axis=axis)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as np.nanmedian
        return np.where(n > 0, 0.5 * (lo + hi), np.nan)


#: Sorting networks (the compare-exchanges in turn) of 1, 2 and 3 values.
_NETWORKS = {1: (), 2: ((0, 1),), 3: ((0, 1), (1, 2), (0, 1))}


def _sorted_few(values, axis):
    """``values`` sorted along an ``axis`` of 1-3 (NaN last, as np.sort puts them) by a
    sorting network: each compare-exchange's lower np.fmin (which passes over NaN), its
    upper np.maximum (which keeps it)."""
    rows = list(np.moveaxis(np.asarray(values), axis, 0))
    for i, j in _NETWORKS[len(rows)]:
        rows[i], rows[j] = np.fmin(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    return np.moveaxis(np.stack(rows), 0, axis)


def _row_medians(values):
    """:func:`nanmedian` of each row of ``values`` (rows, P), float."""
    out = np.full((values.shape[0], 1), np.nan, dtype=values.dtype)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as np.nanmedian
        for out_row, row in zip(out, values, strict=True):
            kept = row[~np.isnan(row)]
            if kept.size:
                out_row[0] = _median(kept)
    return out


def _robust_scale(resid, use):
    """Per-spectrum 1.4826 * MAD of the residuals over the used pixels, (N, 1); inf where
    there is none or it is 0.

    Spectrum by spectrum, the medians by partial sorts of the used values: the order
    statistics of :func:`nanmedian`'s sorts of every pixel (so the same values), at a
    fraction of the cost (the fit's three stars: ~0.4 -> ~0.3 ms per clipping pass)."""
    mad = np.full(resid.shape[0], np.nan)
    for s, (row, used) in enumerate(zip(resid, use, strict=True)):
        values = row[used]
        if values.size and np.isfinite(values).all():
            values -= _median(values)
            mad[s] = _median(np.abs(values, out=values))
        elif values.size:  # NaN (no fit) or inf among them: dropped as nanmedian drops NaN
            kept = np.where(used, row, np.nan)
            mad[s] = nanmedian(np.abs(kept - nanmedian(kept)))[0]
    return np.where(np.isfinite(mad) & (mad > 0), 1.4826 * mad, np.inf)[:, None]


#: Values from which :func:`_median` partitions about one index, not two.
_ONE_PARTITION = 1024


def _median(values):
    """The median of ``values`` (1-D, at least one, no NaN), as :func:`nanmedian` gives it;
    ``values`` are reordered.

    Many values by one partition, the lower middle value of an even count the largest below
    it: numpy partitions about one index faster than about two (3700 values, the continuum's
    clipping passes: ~7-11 against ~15-21 us) and the maximum costs ~1.5 us (more than it
    saves below ~1000 values); the same order statistics."""
    n = values.size
    half = n // 2
    if n < _ONE_PARTITION:
        values.partition(((n - 1) // 2, half))
        return 0.5 * (values[(n - 1) // 2] + values[half])
    values.partition(half)
    lower = values[:half].max() if n % 2 == 0 else values[half]
    return 0.5 * (lower + values[half])


def fit_continuum(flux, wavelength, mask=None, *, method="bspline", knot_spacing=200.0,
                  degree=3, poly_degree=8, window=151, sigma_low=1.5, sigma_high=4.0,
                  iterations=5):
    """Fit pseudo-continua of spectra (numpy), vectorised over all leading axes.

    Parameters
    ----------
    flux : numpy.ndarray, shape (..., npix)
        Spectra.
    wavelength : numpy.ndarray, shape (npix,)
        Increasing wavelengths, Angstrom.
    mask : numpy.ndarray of bool, shape (..., npix), optional
        True = usable pixel. Non-finite and non-positive pixels are never used.
    method : {'bspline', 'polynomial', 'running_median'}
    knot_spacing : float
        B-spline knot spacing, Angstrom.
    degree, poly_degree : int
        B-spline degree; polynomial degree.
    window : int
        Running-median window, pixels.
    sigma_low, sigma_high : float
        Clipping thresholds in units of the robust scatter about the fit.
    iterations : int
        Clipping passes.

    Returns
    -------
    numpy.ndarray
        Continuum, same shape as ``flux``; NaN for a spectrum with too few usable pixels.
    """
    flux = np.asarray(flux, dtype=np.float64)
    shape = flux.shape
    y = flux.reshape(-1, shape[-1])
    use = np.isfinite(y) & (y > 0)
    if mask is not None:
        use &= np.broadcast_to(mask, shape).reshape(y.shape)
    y = np.where(use, y, 0.0)
    wave = np.asarray(wavelength, dtype=np.float64)
    if method == "running_median":
        cont = _running_median(y, use, window, sigma_low, sigma_high, iterations)
    else:
        bspline = method == "bspline"
        nseg = _segments(knot_spacing / (wave[-1] - wave[0])) if bspline else 0
        key = (wave.size, _key(wave), method, nseg, degree if bspline else poly_degree)
        basis, _, _, penalty = _basis(*key)
        cont = _clipped_fit(y, use, basis, _normal_system(*key), penalty,
                            sigma_low, sigma_high, iterations)
    cont = np.where(cont > 0, cont, np.nan)
    return cont.reshape(shape)


def _clipped_fit(y, use, basis, system, penalty, sigma_low, sigma_high, iterations):
    """:func:`fit_continuum`'s least-squares fits of rows ``y`` (zero where not ``use``d)
    with asymmetric clipping, from a basis (:func:`_basis`) and its :func:`_normal_system`."""
    nb, npix = basis.shape[1], y.shape[1]
    # Each row's weights, then its weighted flux: the columns of the system's product.
    columns = np.empty((y.shape[0], 2 * npix))
    weights, weighted = columns[:, :npix], columns[:, npix:]
    active = use.copy()
    for it in range(iterations + 1):
        np.copyto(weights, active)
        np.multiply(weights, y, out=weighted)
        sums = sparse_products(system, columns)
        normal = _mirrored(sums, nb)  # a new array: added to in place
        # (np.trace's sums, not np.trace's ~5 us of wrapping)
        diag = normal.diagonal(0, 1, 2).sum(-1) / nb
        normal += (_PENALTY * np.where(diag > 0, diag, 1.0))[:, None, None] * penalty
        rhs = sums[:, nb * nb:]
        ok = _counts(active) > nb
        every = ok.all()
        if every:  # the usual case: no copies of the systems (each solved alone)
            coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
        else:
            coef = np.zeros((y.shape[0], nb))
            if ok.any():
                coef[ok] = np.linalg.solve(normal[ok], rhs[ok][..., None])[..., 0]
        cont = np.asarray((basis @ coef.T).T)
        if not every:
            cont[~ok] = np.nan
        if it == iterations:
            break
        resid = y - cont
        scale = _robust_scale(resid, active)
        new = resid > -sigma_low * scale
        new &= resid < sigma_high * scale
        new &= use
        if np.array_equal(new, active):
            break
        active = new
    return cont


def _counts(active):
    """Each row's count of True: a few rows one by one (np.count_nonzero with an axis costs
    ~14 us, without ~1 a row), many at once (a library's blocks of templates)."""
    if active.shape[0] <= _ONE_BY_ONE:
        return np.array([np.count_nonzero(row) for row in active], dtype=np.intp)
    return np.count_nonzero(active, axis=1)


def _running_median(y, use, window, sigma_low, sigma_high, iterations):
    import scipy.ndimage  # only for this method, not the default: 0.1 s of start-up

    filled = fill_gaps(y, use)
    cont = scipy.ndimage.median_filter(filled, size=(1, window), mode="nearest")
    for _ in range(iterations):
        resid = y - cont
        scale = _robust_scale(resid, use)
        keep = use & (resid > -sigma_low * scale) & (resid < sigma_high * scale)
        filled = fill_gaps(y, keep)
        cont = scipy.ndimage.median_filter(filled, size=(1, window), mode="nearest")
    return cont


def fill_gaps(y, use):
    """Linear interpolation over unusable pixels, row by row, without a Python loop: each
    unusable pixel on the line between its row's nearest usable neighbours (the one there is
    at an end; 0 without any).

    Computed at the unusable pixels only where they are fewer than a third of all (a program
    star's cosmic rays: ~1 against ~3.6 ms for 14 x 4096 pixels), else along whole rows
    (at 95 % unusable, 2.9 against 5.2 ms); the same values either way."""
    if 3 * np.count_nonzero(~use) < use.size:
        return _fill_at_gaps(y, use)
    return _fill_rows(y, use)


def _fill_rows(y, use):
    """:func:`fill_gaps` along whole rows: each pixel's neighbours by running extremes."""
    n = y.shape[1]
    idx = np.where(use, np.arange(n)[None, :], -1)
    left = np.maximum.accumulate(idx, axis=1)
    right = np.flip(np.minimum.accumulate(np.flip(np.where(use, np.arange(n), n), axis=1),
                                          axis=1), axis=1)
    return np.where(use, y, _bridged(y, np.arange(y.shape[0])[:, None], np.arange(n)[None, :],
                                     left, right))


def _fill_at_gaps(y, use):
    """:func:`fill_gaps` at the unusable pixels only: their neighbours by a search of the
    usable ones."""
    n = y.shape[1]
    rows, cols = np.nonzero(~use)
    usable = np.flatnonzero(use)  # flat indices, increasing
    at = np.searchsorted(usable, rows * n + cols)
    before = usable[np.maximum(at - 1, 0)] - rows * n if usable.size else np.full(at.size, -1)
    after = usable[np.minimum(at, usable.size - 1)] - rows * n if usable.size else at + n
    # Neighbours in the same row only, else none (-1, n), as _fill_rows' running extremes.
    left = np.where((at > 0) & (before >= 0), before, -1)
    right = np.where((at < usable.size) & (after < n), after, n)
    values = _bridged(y, rows, cols, left, right)
    filled = np.array(y, dtype=np.result_type(y, values))
    filled[rows, cols] = values
    return filled


def _bridged(y, rows, cols, left, right):
    """The values at pixels (``rows``, ``cols``) of ``y`` between their usable neighbours
    ``left`` (-1: none) and ``right`` (the row's length: none) in their rows."""
    n = y.shape[1]
    lv = np.where(left >= 0, y[rows, np.clip(left, 0, n - 1)], np.nan)
    rv = np.where(right < n, y[rows, np.clip(right, 0, n - 1)], np.nan)
    t = np.where((left >= 0) & (right < n) & (right > left),
                 (cols - left) / np.maximum(right - left, 1), 0.0)
    out = np.where(np.isfinite(lv) & np.isfinite(rv), lv + t * (rv - lv),
                   np.where(np.isfinite(lv), lv, rv))
    return nan_to_num(out)


def normalize_continuum(flux, mask=None, *, dim="wavelength", **options):
    """Continuum-normalise spectra (xarray, lazy with Dask input).

    Parameters
    ----------
    flux : xarray.DataArray
        Spectra with a ``dim`` coordinate in Angstrom; ``dim`` must be one chunk.
    mask : xarray.DataArray of bool, optional
        True = usable pixel (e.g. good and outside telluric bands).
    dim : str
        Wavelength dimension.
    **options
        Passed to :func:`fit_continuum` (method, knot_spacing, sigma_low, ...).

    Returns
    -------
    normalized, continuum : xarray.DataArray
        ``flux / continuum`` (NaN where the continuum is not positive) and the continuum.
    """
    wave = flux[dim].values
    args = [flux] if mask is None else [flux, mask]

    def kernel(f, m=None):
        cont = fit_continuum(f, wave, m, **options)
        with np.errstate(invalid="ignore", divide="ignore"):
            return f / cont, cont

    norm, cont = xr.apply_ufunc(
        kernel, *args, input_core_dims=[[dim]] * len(args), output_core_dims=[[dim], [dim]],
        dask="parallelized", output_dtypes=[np.float64, np.float64],
    )
    norm.attrs = {"units": "1", "description": "continuum-normalised flux"}
    cont.attrs = dict(flux.attrs)
    return norm, cont
