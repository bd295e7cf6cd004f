"""Template matching: radial velocities, template scores over the whole prepared cube in
one vectorised pass, and refinement of the parameters between grid points.

Observed spectra stay on their pixels; templates are moved to each star's velocity with a
Lanczos (a = 4, 8-tap windowed sinc) shift applied as a sparse matrix: the prepared templates
are band-limited (>= 2 pixels per FWHM), where a windowed sinc is nearly exact, while a
cubic (4-tap) kernel biased velocities by ~1/40 pixel (5 km/s at 3.7 A/pixel). Shifting the
noiseless templates keeps the observed noise uncorrelated.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse
import xarray as xr

from .constants import SPEED_OF_LIGHT_KMS

__all__ = [
    "shift_matrix",
    "shift_spectra",
    "cross_correlate_rv",
    "refine_rv",
    "score_templates",
    "score_star",
    "fit_corrected",
    "star_correction",
    "refine_parameters",
    "score_points",
    "quadratic_minimum",
]


# ----------------------------------------------------------------------------- shifts


_LANCZOS_A = 4
_TAPS = np.arange(-_LANCZOS_A + 1, _LANCZOS_A + 1)
_TABLE_STEPS = 2048  # kernel weights tabulated per 1/2048 pixel: interpolation errs < 1e-6


def _exact_kernel_weights(frac):
    """Lanczos weights of the taps around a position (``frac`` past the left pixel),
    normalised to unit sum so a constant stays constant."""
    t = frac[..., None] - _TAPS
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(np.abs(t) < 1e-9, 1.0, np.sinc(t) * np.sinc(t / _LANCZOS_A))
    return w / w.sum(axis=-1, keepdims=True)


_KERNEL_TABLE = _exact_kernel_weights(np.linspace(0.0, 1.0, _TABLE_STEPS + 1))


def _kernel_weights(frac):
    """:func:`_exact_kernel_weights` interpolated linearly in a table (a few times faster:
    velocity scans evaluate millions of positions)."""
    x = np.asarray(frac, dtype=np.float64) * _TABLE_STEPS
    i = np.clip(x.astype(np.intp), 0, _TABLE_STEPS - 1)
    a = (x - i)[..., None]
    lo = _KERNEL_TABLE[i]
    return lo + a * (_KERNEL_TABLE[i + 1] - lo)


def _positions(wavelength, rv, source=None):
    """Fractional pixel positions, in a rest-frame spectrum sampled on ``source`` (default:
    ``wavelength``), of the points ``wavelength`` seen at radial velocity ``rv``.

    ``wavelength`` (..., P) and ``rv`` (...) broadcast (e.g. per-star pixels and trial
    velocities); ``source`` is one 1-D grid."""
    wave = np.asarray(wavelength, dtype=np.float64)
    src = wave if source is None else np.asarray(source, dtype=np.float64)
    if src.ndim != 1:
        raise ValueError("source wavelengths must be 1-D")
    z = np.asarray(rv, dtype=np.float64)[..., None] / SPEED_OF_LIGHT_KMS
    return np.interp(wave / (1.0 + z), src, np.arange(src.size), left=-np.inf, right=np.inf)


def _key(wavelength):
    # Rounded to 1e-6 A: exposures of one setup differ by ~1e-11 A (unit and air/vacuum
    # conversions) and must share cache entries.
    return np.ascontiguousarray(np.round(np.asarray(wavelength, dtype=np.float64), 6)).tobytes()


def shift_matrix(wavelength, rv, source=None):
    """Sparse operator moving a rest-frame spectrum to radial velocity ``rv``.

    Parameters
    ----------
    wavelength : array_like, shape (P,)
        The pixels to sample (e.g. a star's own wavelength solution).
    rv : float
        km/s.
    source : array_like, shape (Q,), optional
        The rest-frame spectrum's wavelengths (default: ``wavelength``).

    Returns
    -------
    scipy.sparse.csr_matrix, shape (P, Q)
        Samples ``f(lambda / (1 + rv/c))`` at each pixel (the flux-density factor
        1/(1 + z), <= 0.2 % for |rv| <= 500 km/s, is left to the photometric scale). Rows of
        pixels whose source falls outside the spectrum are empty. Matrices are cached: a
        star's velocity is reused by every scoring pass.
    """
    source = wavelength if source is None else source
    return _shift_matrix_cached(_key(wavelength), _key(source), round(float(rv), 9))


@functools.lru_cache(maxsize=64)
def _shift_matrix_cached(wave_bytes, source_bytes, rv):
    wavelength = np.frombuffer(wave_bytes, dtype=np.float64)
    source = np.frombuffer(source_bytes, dtype=np.float64)
    pos = _positions(wavelength, rv, source)
    n = source.size
    inside = np.isfinite(pos)
    base = np.floor(np.where(inside, pos, 0.0)).astype(int)
    weights = _kernel_weights(np.where(inside, pos, 0.0) - base)
    cols = np.clip(base[:, None] + _TAPS[None, :], 0, n - 1)
    rows = np.broadcast_to(np.arange(pos.size)[:, None], cols.shape)
    # Rows whose source is off the spectrum stay empty (no stored zeros), so callers can tell.
    keep = np.broadcast_to(inside[:, None], cols.shape)
    return scipy.sparse.csr_matrix((weights[keep], (rows[keep], cols[keep])),
                                   shape=(pos.size, n))


def shift_spectra(spectra, wavelength, rv, source=None):
    """Shift spectra (..., Q) on ``source`` (default ``wavelength``) to radial velocity ``rv``
    (km/s, scalar), sampled at ``wavelength`` (P,); NaN beyond the edges."""
    matrix = shift_matrix(wavelength, rv, source)
    flat = np.asarray(spectra, dtype=np.float64).reshape(-1, matrix.shape[1])
    out = (matrix @ flat.T).T
    empty = np.asarray(matrix.getnnz(axis=1)) == 0
    out[:, empty] = np.nan
    return out.reshape(np.shape(spectra)[:-1] + (matrix.shape[0],))


def _edge_margin(wavelength, rv, source=None):
    """Pixels at each end whose shifted value leans on extrapolated taps."""
    pos = _positions(wavelength, rv, source)
    shift = np.nanmax(np.abs(np.where(np.isfinite(pos), pos - np.arange(pos.shape[-1]), np.nan)))
    return int(np.ceil(shift)) + _LANCZOS_A + 1


# ----------------------------------------------------------------------------- radial velocity


def cross_correlate_rv(obs_norm, obs_weight, template_norm, wavelength, *, rv_max=500.0,
                       oversample=4, star_wavelength=None):
    """Radial velocities by FFT cross-correlation in ln(lambda), vectorised over stars.

    Parameters
    ----------
    obs_norm : numpy.ndarray, shape (nstar, npix)
        Continuum-normalised observed spectra.
    obs_weight : numpy.ndarray, shape (nstar, npix)
        Weights; 0 marks masked pixels (bad, telluric).
    template_norm : numpy.ndarray, shape (nstar, npix)
        A normalised rest-frame template per star, on ``wavelength``.
    wavelength : numpy.ndarray, shape (npix,)
        The templates' pixels.
    rv_max : float
        Search range, +/- km/s.
    oversample : int
        Oversampling of the ln(lambda) grid relative to the pixels.
    star_wavelength : numpy.ndarray, shape (nstar, npix) or (npix,), optional
        Each star's own pixels (default: ``wavelength``).

    Returns
    -------
    rv : numpy.ndarray, shape (nstar,)
        km/s, with sub-pixel refinement of the peak (Gaussian through three points).
    peak : numpy.ndarray, shape (nstar,)
        Normalised correlation at the peak (a quality indicator, <= 1).
    """
    wave = np.asarray(wavelength, dtype=np.float64)
    ln = np.log(wave)
    ln_star = np.broadcast_to(ln if star_wavelength is None else np.log(star_wavelength),
                              np.shape(obs_norm))
    n = oversample * wave.size
    grid = np.linspace(ln[0], ln[-1], n)
    step = grid[1] - grid[0]
    use = (obs_weight > 0) & np.isfinite(obs_norm)

    def resample(values, mask, ln_rows):
        # Each star on its own pixels: one interpolation per star (a handful).
        idx = np.stack([np.interp(grid, row, np.arange(row.size)) for row in ln_rows])
        lo = np.clip(np.floor(idx).astype(int), 0, wave.size - 2)
        t = idx - lo
        rows = np.arange(values.shape[0])[:, None]
        sig = np.where(mask, 1.0 - values, 0.0)
        out = sig[rows, lo] * (1 - t) + sig[rows, lo + 1] * t
        m = (mask[rows, lo] & mask[rows, lo + 1]).astype(float)
        mean = (out * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1)
        return (out - mean) * m

    taper = np.ones(n)
    edge = max(1, n // 20)
    taper[:edge] = taper[-edge:][::-1] = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
    so = resample(obs_norm, use, ln_star) * taper
    # The template only where the star has data (its pixels mapped onto the template's).
    star_ok = np.stack([np.interp(ln, row, m.astype(float)) > 0.999 for row, m
                        in zip(ln_star, use, strict=True)])
    template_ok = np.isfinite(np.broadcast_to(template_norm, use.shape)) & star_ok
    st = resample(np.broadcast_to(template_norm, use.shape), template_ok,
                  np.broadcast_to(ln, use.shape)) * taper
    nfft = 2 * n
    ccf = np.fft.irfft(np.fft.rfft(so, nfft) * np.conj(np.fft.rfft(st, nfft)), nfft)
    norm = np.sqrt((so**2).sum(1) * (st**2).sum(1))
    ccf = ccf / np.where(norm > 0, norm, np.inf)[:, None]
    kmax = int(np.ceil(np.log1p(rv_max / SPEED_OF_LIGHT_KMS) / step))
    lags = np.arange(-kmax, kmax + 1)
    window = ccf[:, lags % nfft]
    k = np.argmax(window, axis=1)
    k = np.clip(k, 1, lags.size - 2)
    rows = np.arange(window.shape[0])
    c0, cm, cp = window[rows, k], window[rows, k - 1], window[rows, k + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = (c0 > 0) & (cm > 0) & (cp > 0)
        lm, l0, lp = np.log(np.where(positive, cm, 1)), np.log(np.where(positive, c0, 1)), np.log(
            np.where(positive, cp, 1))
        gauss = 0.5 * (lm - lp) / (lm - 2 * l0 + lp)
        para = 0.5 * (cm - cp) / (cm - 2 * c0 + cp)
        delta = np.where(positive, gauss, para)
    delta = np.clip(np.nan_to_num(delta), -1, 1)
    lag = lags[k] + delta
    rv = SPEED_OF_LIGHT_KMS * np.expm1(lag * step)
    return rv, c0


def refine_rv(obs_norm, obs_weight, template_norm, wavelength, rv0, *, half_width=None,
              nstep=5, knot_spacing=None, star_wavelength=None):
    """Radial velocities refined by a chi^2 scan against each star's best template.

    The chi^2 of the template (with the smooth multiplicative correction of
    :func:`score_star`) is evaluated on a grid of velocities around ``rv0``, all trial
    velocities of a star at once; a parabola through the lowest points gives the velocity
    and its 1-sigma error (delta chi^2 = 1).

    Parameters
    ----------
    obs_norm, obs_weight : numpy.ndarray, shape (nstar, npix)
        Normalised observed spectra and their inverse variances (0 = masked).
    template_norm : numpy.ndarray, shape (nstar, npix)
        Normalised rest-frame templates, one per star.
    wavelength : numpy.ndarray, shape (npix,)
        The templates' pixels.
    rv0 : numpy.ndarray, shape (nstar,)
        Starting velocities, km/s.
    half_width : float, optional
        Scan half width, km/s (default: one pixel).
    knot_spacing : float, optional
        Knot spacing of the multiplicative correction, Angstrom.
    star_wavelength : numpy.ndarray, shape (nstar, npix) or (npix,), optional
        Each star's own pixels (default: ``wavelength``).

    Returns
    -------
    rv, rv_err : numpy.ndarray, shape (nstar,)
    """
    wave = np.asarray(wavelength, dtype=np.float64)
    star_wave = np.broadcast_to(wave if star_wavelength is None else star_wavelength,
                                np.shape(obs_norm))
    pix_kms = SPEED_OF_LIGHT_KMS * np.median(np.diff(np.log(wave)))
    half_width = pix_kms if half_width is None else half_width
    offsets = np.linspace(-half_width, half_width, nstep)
    rv0 = np.asarray(rv0, dtype=np.float64)
    trial = rv0[:, None] + offsets[None, :]  # (S, V)
    pos = _positions(star_wave[:, None, :], trial, wave)  # (S, V, P)
    inside = np.isfinite(pos)
    base = np.floor(np.where(inside, pos, 0.0)).astype(int)
    kw = _kernel_weights(np.where(inside, pos, 0.0) - base)  # (S, V, P, taps)
    cols = np.clip(base[..., None] + _TAPS, 0, wave.size - 1)
    tmpl = np.nan_to_num(np.asarray(template_norm, dtype=np.float64))
    rows = np.arange(tmpl.shape[0])[:, None, None, None]
    shifted = np.sum(tmpl[rows, cols] * kw, axis=-1)  # (S, V, P)
    w = np.where(inside & np.isfinite(obs_norm)[:, None, :], obs_weight[:, None, :], 0.0)
    margin = _edge_margin(star_wave[:, None, :], trial, wave)
    w[..., :margin] = 0
    w[..., -margin:] = 0
    f = np.nan_to_num(obs_norm)
    chi2 = np.stack([np.sum(w[s] * (f[s] - fit_corrected(f[s], w[s], shifted[s], star_wave[s],
                                                           knot_spacing)) ** 2, axis=1)
                     for s in range(f.shape[0])])  # stars: a few; velocities vectorised
    best = np.clip(np.argmin(chi2, axis=1), 2, nstep - 3)
    # Least-squares parabola through the 5 points u = -2..2 around the minimum (closed form).
    u = np.arange(-2, 3)
    y = np.take_along_axis(chi2, best[:, None] + u, axis=1)
    h = offsets[1] - offsets[0]
    b = (y * u).sum(1) / 10.0
    a = ((y * u**2).sum(1) - 2.0 * y.sum(1)) / 14.0
    ok = a > 0
    vertex = offsets[best] + h * np.where(ok, -b / (2 * np.where(ok, a, 1)), 0.0)
    vertex = np.clip(vertex, -half_width, half_width)
    err = np.where(ok, h / np.sqrt(np.where(ok, a, 1)), np.nan)
    return rv0 + vertex, err


# ----------------------------------------------------------------------------- scores


def _correction_basis(wavelength, knot_spacing):
    """Basis of the smooth multiplicative correction (a constant when no knot spacing)."""
    from .continuum import spline_basis

    if knot_spacing:
        return spline_basis(wavelength, knot_spacing)
    basis = scipy.sparse.csr_matrix(np.ones((len(wavelength), 1)))
    return basis, basis.T.tocsr(), basis.T.tocsr(), np.zeros((1, 1))


def _corrections(flux, weights, templates, wavelength, knot_spacing):
    """Least-squares smooth corrections c such that ``flux ~ c * templates`` (N, P)."""
    basis, outer_t, basis_t, penalty = _correction_basis(wavelength, knot_spacing)
    nb = basis.shape[1]
    weights = np.broadcast_to(weights, templates.shape)
    normal = (outer_t @ np.ascontiguousarray((weights * templates**2).T)).T.reshape(-1, nb, nb)
    rhs = (basis_t @ np.ascontiguousarray((weights * flux * templates).T)).T
    scale = np.trace(normal, axis1=1, axis2=2) / nb
    scale = np.where(scale > 0, scale, 1.0)
    # A light smoothness penalty (and a tiny ridge) keeps empty knot intervals determined.
    normal = normal + 1e-6 * scale[:, None, None] * penalty[None]
    normal[:, range(nb), range(nb)] += 1e-12 * scale[:, None]
    coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
    return np.asarray((basis @ coef.T).T)


def fit_corrected(flux, weights, templates, wavelength, knot_spacing):
    """Least-squares fits ``flux ~ templates * correction`` for many templates at once.

    Parameters
    ----------
    flux : numpy.ndarray, shape (P,)
    weights : numpy.ndarray, shape (P,) or (N, P)
        Inverse variances (0 = masked), shared or per template.
    templates : numpy.ndarray, shape (N, P)
        Templates on the spectrum's pixels (already shifted).
    knot_spacing : float or None
        Knot spacing of the cubic B-spline correction (None: a constant amplitude).

    Returns
    -------
    numpy.ndarray, shape (N, P)
        The fitted models.
    """
    return _corrections(flux, weights, templates, wavelength, knot_spacing) * templates


def _to_rest_frame(flux, weight, wavelength, rv, star_wavelength=None):
    """A star's spectrum and weights moved to the rest frame (velocity ``rv`` removed) and
    onto the templates' pixels ``wavelength`` (from its own, ``star_wavelength``).

    Pixels fed by a masked or off-range pixel get zero weight; the weights follow the
    interpolation (squared kernel) so that noise stays correctly weighted to first order.
    """
    back = SPEED_OF_LIGHT_KMS * (1.0 / (1.0 + rv / SPEED_OF_LIGHT_KMS) - 1.0)
    matrix = shift_matrix(wavelength, back, star_wavelength)
    var = np.where(weight > 0, 1.0 / np.where(weight > 0, weight, 1.0), 0.0)
    bad = (weight <= 0).astype(float)
    f = matrix @ np.where(weight > 0, flux, 0.0)
    v = matrix.multiply(matrix) @ var
    touched = np.abs(matrix) @ bad
    empty = np.asarray(matrix.getnnz(axis=1)) == 0
    w = np.where((touched < 1e-3) & ~empty & (v > 0), 1.0 / np.where(v > 0, v, 1.0), 0.0)
    margin = _edge_margin(wavelength, back, star_wavelength)
    w[:margin] = 0
    w[-margin:] = 0
    return np.where(w > 0, f, 0.0), w


def star_correction(obs, ivar, template, rv, wavelength, knot_spacing, star_wavelength=None):
    """The smooth correction of one template (P,) at velocity ``rv`` fitted to a star (on its
    own pixels ``star_wavelength``, default ``wavelength``).

    Templates close to this one need nearly the same correction: dividing the star by it and
    scoring them with a single amplitude is much cheaper than a correction per template.
    """
    star_wave = wavelength if star_wavelength is None else star_wavelength
    shifted = shift_spectra(np.nan_to_num(template), star_wave, rv, wavelength)
    w = np.where(np.isfinite(obs) & np.isfinite(shifted) & (ivar > 0), ivar, 0.0)
    corr = _corrections(np.nan_to_num(obs), w, np.nan_to_num(shifted)[None], star_wave,
                        knot_spacing)[0]
    return np.where(corr > 0, corr, np.nan)


def score_star(obs, ivar, templates, rv, wavelength, metric="chi2", delta=3.0, knot_spacing=None,
               correction=None, star_wavelength=None):
    """Scores of many rest-frame templates (N, P) against one star (P,) at velocity ``rv``.

    Each template is fitted to the star times a smooth multiplicative correction (a cubic
    B-spline with knots every ``knot_spacing`` Angstrom; None: a single free amplitude). The
    correction absorbs what independent continuum normalisations of star and template leave
    (most at the ends of the spectrum and around strong blends) without touching line
    profiles. chi^2 is exact linear least squares for all templates at once; Huber uses
    iteratively reweighted least squares and is scaled to equal chi^2 for small residuals.
    With a fixed ``correction`` (P,) (see :func:`star_correction`), the star is divided by it
    and each template gets a single amplitude: the fast mode used to scan many templates.
    The templates are on ``wavelength``, the star on its own pixels ``star_wavelength``
    (default: the same). Rows of ``templates`` with a NaN score NaN. float64 throughout.
    """
    tmpl, missing = _clean_templates(templates)
    f, w = _star_arrays(obs, ivar, correction)
    if correction is not None:
        knot_spacing = None
    if knot_spacing is None and metric == "chi2":
        return _fast_chi2(*_to_rest_frame(f, w, wavelength, rv, star_wavelength), tmpl, missing)
    star_wave = wavelength if star_wavelength is None else star_wavelength
    shifted = (shift_matrix(star_wave, rv, wavelength) @ tmpl.T).T  # (N, P)
    margin = _edge_margin(star_wave, rv, wavelength)
    w[:margin] = 0
    w[-margin:] = 0
    usable = (shifted**2) @ w > 0
    model = fit_corrected(f, w, shifted, star_wave, knot_spacing)
    if metric == "chi2":
        score = np.sum(w * (f - model) ** 2, axis=1)
    else:
        sw = np.sqrt(w)
        for _ in range(3):  # iteratively reweighted least squares
            r = (f - model) * sw
            hw = w * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-12))
            model = fit_corrected(f, hw, shifted, star_wave, knot_spacing)
        r = np.abs((f - model) * sw)
        score = 2.0 * np.sum(np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)), axis=1)
    return np.where(missing | ~usable, np.nan, score)


def _clean_templates(templates):
    """Templates as float64 (N, P), NaN rows zeroed, and which rows were NaN.

    Sums in float64: float32 picked the wrong template for a quarter of stars (stack notes).
    """
    tmpl = np.asarray(templates, dtype=np.float64)
    tmpl = tmpl.reshape(-1, tmpl.shape[-1])
    missing = ~np.isfinite(tmpl.sum(axis=1))  # one pass; a NaN anywhere makes the sum NaN
    if missing.any():
        tmpl = np.where(missing[:, None], 0.0, tmpl)
    return tmpl, missing


def _star_arrays(obs, ivar, correction=None):
    """A star's flux and weights with masked pixels zeroed, divided by a fixed correction."""
    w = np.where(np.isfinite(obs) & (ivar > 0), ivar, 0.0)
    f = np.nan_to_num(obs)
    if correction is not None:
        ok = np.isfinite(correction)
        f = np.where(ok, f / np.where(ok, correction, 1.0), 0.0)
        w = np.where(ok, w * np.where(ok, correction, 0.0) ** 2, 0.0)
    return f, w


def _fast_chi2(flux, weight, tmpl, missing):
    """chi^2 with a free amplitude of every template against rest-frame stars, in two matrix
    products: flux, weight (..., P) and tmpl (N, P) give (..., N).

    The stars go to the rest frame once (one spectrum shifted each instead of N templates);
    their pixels' noise correlation, the same for every template, does not change the ranking.
    """
    stt = weight @ (tmpl**2).T
    sft = (weight * flux) @ tmpl.T
    usable = stt > 0
    score = np.sum(weight * flux**2, axis=-1)[..., None] - sft**2 / np.where(usable, stt, np.inf)
    return np.where(missing | ~usable, np.nan, score)


def _score_block(obs, ivar, templates, rv, star_wave, *correction, wavelength, metric, delta,
                 knot_spacing):
    """Scores of every (star, template): obs, ivar, star_wave (S,1,P), templates ([1,]N,P),
    rv (S,1), optional correction (S,1,P)."""
    obs, ivar, rv, star_wave = obs[:, 0, :], ivar[:, 0, :], rv[:, 0], star_wave[:, 0, :]
    corr = correction[0][:, 0, :] if correction else [None] * obs.shape[0]
    if correction and metric == "chi2":
        # Fast mode: every star in its rest frame, then all stars x all templates at once.
        tmpl, missing = _clean_templates(templates)
        rest = [_to_rest_frame(*_star_arrays(obs[s], ivar[s], corr[s]), wavelength, rv[s],
                               star_wave[s])
                for s in range(obs.shape[0])]  # one spectrum per star
        return _fast_chi2(np.stack([f for f, _ in rest]), np.stack([w for _, w in rest]), tmpl,
                          missing)
    tmpl = np.asarray(templates, dtype=np.float64).reshape(-1, templates.shape[-1])
    # Stars with their own fitted corrections: each star's velocity shifts the templates.
    return np.stack([score_star(obs[s], ivar[s], tmpl, rv[s], wavelength, metric, delta,
                                knot_spacing, corr[s], star_wave[s])
                     for s in range(obs.shape[0])]).reshape(obs.shape[0], tmpl.shape[0])


def score_templates(obs_norm, obs_ivar, templates_norm, rv, *, metric="chi2", huber_delta=3.0,
                    knot_spacing=None, correction=None, star_wavelength=None, dim="wavelength",
                    template_dim="template"):
    """Score every template against every star in one vectorised pass (lazy with Dask).

    Parameters
    ----------
    obs_norm, obs_ivar : xarray.DataArray
        Normalised observed spectra (``star``, ``dim``) and inverse variances (0 = masked).
    templates_norm : xarray.DataArray
        Normalised rest-frame templates (``template_dim``, ``dim``), NaN for missing grid
        points; may be Dask-chunked along ``template_dim`` (``dim`` in one chunk).
    rv : xarray.DataArray
        Radial velocity of each star, km/s.
    metric : {'chi2', 'huber'}
        chi^2 with a free amplitude, or the Huber loss (threshold ``huber_delta`` sigma;
        robust to sky-subtraction residual spikes), scaled to equal chi^2 for small residuals.
    knot_spacing : float, optional
        Knot spacing (Angstrom) of the smooth multiplicative correction fitted with each
        template (see :func:`score_star`); None for a single amplitude.
    correction : xarray.DataArray, optional
        Fixed smooth corrections (``star``, ``dim``): the fast mode of :func:`score_star`.
    star_wavelength : xarray.DataArray, optional
        Each star's own pixel wavelengths (``star``, ``dim``); default: the ``dim``
        coordinate, on which the templates are.

    Returns
    -------
    xarray.DataArray
        Scores (``star``, ``template_dim``), float64; NaN for missing templates.
    """
    if metric not in ("chi2", "huber"):
        raise ValueError(f"metric must be 'chi2' or 'huber', not {metric!r}")
    wave = obs_norm[dim].values
    with xr.set_options(arithmetic_join="exact"):
        xr.align(obs_norm, templates_norm, join="exact", exclude=[template_dim, "star"])
    if star_wavelength is None:
        star_wavelength = obs_norm[dim].broadcast_like(obs_norm).drop_vars(dim)
    args = [obs_norm, obs_ivar, templates_norm, rv, star_wavelength]
    if correction is not None:
        args.append(correction)
    out = xr.apply_ufunc(
        _score_block, *args,
        kwargs={"wavelength": wave, "metric": metric, "delta": huber_delta,
                "knot_spacing": knot_spacing},
        input_core_dims=[[dim], [dim], [dim], [], [dim]] + [[dim]] * (correction is not None),
        dask="parallelized", output_dtypes=[np.float64],
    )
    out.attrs = {"metric": metric, "description": f"{metric} of the normalised spectra"}
    return out.transpose("star", ...)


# ----------------------------------------------------------------------------- refinement


def quadratic_minimum(x, y):
    """Minimum of a full quadratic fitted to scores ``y`` (S, K) at points ``x`` (S, K, d).

    Returns
    -------
    xmin : numpy.ndarray, shape (S, d)
        Stationary point (NaN where the fit is not a bowl).
    cov : numpy.ndarray, shape (S, d, d)
        ``2 H^-1``: the covariance for delta chi^2 = 1.
    """
    nstar, _, d = x.shape
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    design = np.concatenate([np.ones(x.shape[:2] + (1,)), x,
                             np.stack([x[..., i] * x[..., j] for i, j in pairs], axis=-1)], -1)
    ok = np.isfinite(y)
    design = np.where(ok[..., None], design, 0.0)
    normal = np.einsum("ski,skj->sij", design, design)
    rhs = np.einsum("ski,sk->si", design, np.where(ok, y, 0.0))
    coef = (np.linalg.pinv(normal) @ rhs[..., None])[..., 0]
    grad = coef[:, 1:1 + d]
    hess = np.zeros((nstar, d, d))
    for k, (i, j) in enumerate(pairs):
        c = coef[:, 1 + d + k]
        if i == j:
            hess[:, i, i] = 2 * c
        else:
            hess[:, i, j] = hess[:, j, i] = c
    bowl = np.all(np.linalg.eigvalsh(hess) > 0, axis=1) & (ok.sum(1) > design.shape[-1])
    xmin = np.full((nstar, d), np.nan)
    cov = np.full((nstar, d, d), np.nan)
    if bowl.any():
        xmin[bowl] = -np.linalg.solve(hess[bowl], grad[bowl][..., None])[..., 0]
        cov[bowl] = 2.0 * np.linalg.inv(hess[bowl])
    return xmin, cov


def score_points(obs_norm, obs_ivar, templates, template_index, axes, points, rv, wavelength,
                 *, metric="chi2", delta=3.0, knot_spacing=None, spec_scale=None,
                 extra_score=None, correction=None, star_wavelength=None):
    """Scores of models interpolated at parameter points, vectorised over points.

    Parameters
    ----------
    obs_norm, obs_ivar : numpy.ndarray, shape (nstar, npix)
    templates : numpy.ndarray (ntemplate, npix) or callable
        Normalised templates of the existing grid points on ``wavelength``, or a function
        returning the rows of given template positions (only the corners used are asked for).
    template_index : numpy.ndarray of int, shape of the grid axes
        Position of each grid point along the templates, -1 when missing.
    axes : dict
        Grid axes (teff, logg, feh, alpha).
    points : numpy.ndarray, shape (nstar, K, 4)
        (teff, logg, feh, alpha) of each star's K points.
    rv : numpy.ndarray, shape (nstar,)
    spec_scale : numpy.ndarray, shape (nstar,), optional
        Divide each star's spectral scores by this.
    extra_score : callable, optional
        ``extra_score(star, weights, points)`` -> scores (K,) added to the spectral ones,
        where ``weights`` (K, ntemplate) is the sparse interpolation matrix of the star's
        points (K, 4) (e.g. the photometric chi^2 of the interpolated models).
    correction : numpy.ndarray, shape (nstar, npix), optional
        Fixed smooth corrections (fast mode of :func:`score_star`).
    star_wavelength : numpy.ndarray, shape (nstar, npix), optional
        Each star's own pixels.

    Returns
    -------
    numpy.ndarray, shape (nstar, K)
    """
    from .grid import interpolation_weights

    nstar, k = points.shape[:2]
    flat = points.reshape(-1, 4)
    index, weight = interpolation_weights(axes, template_index >= 0, *flat.T)
    cols = template_index[tuple(index[..., d] for d in range(4))]
    weight = np.where(cols >= 0, np.nan_to_num(weight), 0.0)
    used = weight > 0
    ids = np.unique(cols[used])
    rows = np.repeat(np.arange(flat.shape[0]), index.shape[1])
    ntemplate = int(template_index.max()) + 1
    full = scipy.sparse.csr_matrix((weight[used], (rows[used.ravel()], cols[used])),
                                   shape=(flat.shape[0], ntemplate))
    data = templates(ids) if callable(templates) else np.asarray(templates)[ids]
    models = (full[:, ids] @ np.asarray(data, dtype=np.float64)).reshape(nstar, k, -1)
    star_wave = [None] * nstar if star_wavelength is None else star_wavelength
    scores = np.stack([score_star(obs_norm[s], obs_ivar[s], models[s], rv[s], wavelength,
                                  metric, delta, knot_spacing,
                                  None if correction is None else correction[s], star_wave[s])
                       for s in range(nstar)])
    if spec_scale is not None:
        scores = scores / np.asarray(spec_scale, dtype=float)[:, None]
    if extra_score is not None:
        scores = scores + np.stack([extra_score(s, full[s * k:(s + 1) * k], points[s])
                                    for s in range(nstar)])
    return scores


def refine_parameters(obs_norm, obs_ivar, templates, template_index, axes, start, rv,
                      wavelength, *, levels=((3, 1.0), (3, 0.5), (3, 0.25)), **options):
    """Refine (teff, logg, [M/H]) between grid points by a lattice search on interpolated
    templates, then a quadratic fit of the scores for the minimum and its errors.

    Each level scores a lattice of n^3 parameter sets spanning +/- ``half`` grid steps around
    the current best (at the start's [alpha/M]) with :func:`score_points`, vectorised over
    lattice points.

    Parameters
    ----------
    obs_norm, obs_ivar, templates, template_index, axes, rv, wavelength
        As for :func:`score_points`.
    start : dict of numpy.ndarray
        Starting parameters (the best grid point) of each star, including alpha.
    **options
        ``metric``, ``delta``, ``knot_spacing``, ``spec_scale``, ``extra_score``,
        ``correction``, ``star_wavelength``: see :func:`score_points`.

    Returns
    -------
    params : dict of numpy.ndarray
        Refined teff, logg, feh (alpha unchanged).
    errors : dict of numpy.ndarray
        1-sigma errors (delta score = 1, inflated by sqrt(chi^2/dof) when above 1 and no
        ``spec_scale`` is given).
    score : numpy.ndarray, shape (nstar,)
        The best score found (to compare refinements started from different points).
    """
    from .grid import PARAMS

    names = PARAMS[:3]
    nstar = obs_norm.shape[0]
    steps = np.array([np.median(np.diff(axes[p])) if len(axes[p]) > 1 else 0.0 for p in names])
    lo = np.array([axes[p][0] for p in names])
    hi = np.array([axes[p][-1] for p in names])
    centre = np.stack([np.asarray(start[p], dtype=float) for p in names], axis=1)  # (S, 3)
    alpha = np.asarray(start["alpha"], dtype=float)
    for n, half in levels:
        u = np.linspace(-half, half, n)
        grid = np.array(np.meshgrid(u, u, u, indexing="ij")).reshape(3, -1).T  # (K, 3)
        # Lattices that would cross the grid's edge are moved inside it, not clipped:
        # clipping would merge points and leave the final quadratic undetermined.
        inner = np.clip(centre, np.minimum(lo + half * steps, hi),
                        np.maximum(hi - half * steps, lo))
        points = np.clip(inner[:, None, :] + grid[None] * steps, lo, hi)  # (S, K, 3)
        full = np.concatenate([points, np.broadcast_to(alpha[:, None, None],
                                                       points.shape[:2] + (1,))], axis=2)
        scores = score_points(obs_norm, obs_ivar, templates, template_index, axes, full, rv,
                              wavelength, **options)
        best = np.nanargmin(np.where(np.isfinite(scores), scores, np.inf), axis=1)
        centre = points[np.arange(nstar), best]
    # Quadratic through the last lattice, in grid steps around its best point.
    free = steps > 0
    x = (points - centre[:, None, :])[..., free] / steps[free]
    xmin, cov = quadratic_minimum(x, scores)
    inside = np.all(np.abs(xmin) <= half, axis=1)
    params = dict(start)
    errors = {}
    npix = (obs_ivar > 0).sum(axis=1)
    dof_scale = np.ones(nstar) if options.get("spec_scale") is not None else np.sqrt(
        np.maximum(np.nanmin(scores, axis=1) / np.maximum(npix - 1, 1), 1.0))
    j = 0
    for i, p in enumerate(names):
        if not free[i]:
            params[p] = centre[:, i]
            errors[p] = np.full(nstar, np.nan)
            continue
        refined = np.where(inside, centre[:, i] + xmin[:, j] * steps[i], centre[:, i])
        params[p] = np.clip(refined, lo[i], hi[i])
        errors[p] = np.sqrt(np.abs(cov[:, j, j])) * steps[i] * dof_scale
        j += 1
    return params, errors, np.nanmin(scores, axis=1)
