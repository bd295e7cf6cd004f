"""Radial velocities of the standards: cross-correlation in ln(lambda) for a start, then a
chi^2 scan against each star's template (shifted with :mod:`kspec_fluxcal.fit.shifts`)."""

from __future__ import annotations

import functools

import numpy as np

from .._nan import nan_to_num
from ..constants import SPEED_OF_LIGHT_KMS
from ..wavelength import distinct_rows, pixels_key
from .matching import corrected_chi2
from .shifts import position_margin, rest_positions, sample_rows

__all__ = ["cross_correlate_rv", "refine_rv"]



def cross_correlate_rv(obs_norm, obs_weight, template_norm, wavelength, *, rv_max=500.0,
                       oversample=4, star_wavelength=None):
    """Radial velocities by cross-correlation in ln(lambda), vectorised over stars.

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
    # (P,) when every star is on the templates' pixels or on one solution (often all of an
    # exposure's: their rows interpolated, and their positions split, once)
    ln_star = ln if star_wavelength is None else np.log(_shared_row(star_wavelength))
    n = oversample * wave.size
    grid = np.linspace(ln[0], ln[-1], n)
    step = grid[1] - grid[0]
    use = (obs_weight > 0) & np.isfinite(obs_norm)
    taper = _taper(n)
    # Stars on the templates' own pixels (often all of an exposure's) share the templates'
    # taps on the grid, and have data where they do (np.interp gives a node's value exactly).
    on_template = np.ndim(ln_star) == 1 and np.array_equal(ln_star, ln)
    taps = _grid_taps(ln, grid, use.shape)
    so = _line_signal(obs_norm, use, taps if on_template else _grid_taps(ln_star, grid,
                                                                         use.shape))
    so *= taper
    # The template only where the star has data (its pixels mapped onto the template's).
    star_ok = use if on_template else np.stack([
        np.interp(ln, row, m.astype(float)) > 0.999
        for row, m in zip(np.broadcast_to(ln_star, use.shape), use, strict=True)])
    template_ok = np.isfinite(np.broadcast_to(template_norm, use.shape)) & star_ok
    st = _line_signal(np.broadcast_to(template_norm, use.shape), template_ok, taps)
    st *= taper
    squares = so**2
    power = squares.sum(1)
    np.square(st, out=squares)  # the same squares and sums, in one temporary
    norm = np.sqrt(power * squares.sum(1))
    kmax = int(np.ceil(np.log1p(rv_max / SPEED_OF_LIGHT_KMS) / step))
    lags = np.arange(-kmax, kmax + 1)
    # Only the ~60 lags within rv_max: direct sums (one dot product per lag) cost a tenth of
    # the FFTs of 2n points that gave every lag.
    padded = np.zeros((so.shape[0], n + 2 * kmax))  # np.pad's result, without its overhead
    padded[:, kmax:kmax + n] = so
    ccf = np.array([np.correlate(a, b, "valid") for a, b in zip(padded, st, strict=True)])
    lag, peak = _peak_lag(ccf / np.where(norm > 0, norm, np.inf)[:, None], lags)
    return SPEED_OF_LIGHT_KMS * np.expm1(lag * step), peak


@functools.lru_cache(maxsize=4)
def _taper(n):
    """The correlation's taper of ``n`` points (read-only): cosine ramps over the first and
    last twentieth, 1 between (an exposure's length: made once, not per exposure)."""
    taper = np.ones(n)
    edge = max(1, n // 20)
    taper[:edge] = taper[-edge:][::-1] = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
    taper.flags.writeable = False
    return taper


def _grid_taps(ln_rows, grid, shape):
    """Where the common ln(lambda) ``grid`` falls on rows (``shape`` (S, P)) of pixels
    ``ln_rows`` ((S, P), or (P,) shared by every row): ``(left, t, u)``, each grid point's
    left pixel in the flattened rows (S, len(grid)), and the weights ``t`` of its right
    and ``u = 1 - t`` of its left neighbour (shared pixels: one row, broadcast)."""
    nrow, npix = shape
    # Each star on its own pixels: one interpolation per star (a handful); shared pixels
    # interpolated, and their positions split, once.
    if np.ndim(ln_rows) == 1:
        idx = np.interp(grid, ln_rows, np.arange(npix))[None]
    else:
        idx = np.stack([np.interp(grid, row, np.arange(row.size)) for row in ln_rows])
    lo = idx.astype(int)  # the positions interpolated are >= 0: truncation is the floor
    np.clip(lo, 0, npix - 2, out=lo)
    t = idx - lo
    # Gathers from the flattened rows (take: several times faster than (row, column) pairs),
    # the right neighbours' from the rows one pixel on (no second index array)
    left = lo + npix * np.arange(nrow)[:, None]
    return left, t, np.subtract(1, t, out=idx)


def _line_signal(values, mask, taps):
    """Line depths ``1 - values`` (S, P), resampled linearly onto the common ln(lambda) grid
    of ``taps`` (:func:`_grid_taps`), masked pixels zeroed and each row's mean removed:
    (S, len(grid)), ready to correlate."""
    left, t, u = taps
    sig = np.where(mask, 1.0 - values, 0.0).ravel()
    # In place: the same products and sums as the expressions, without their temporaries
    # (each (S, 4 P) float64 one ~0.4 MB: cross_correlate_rv took ~1.5x the time with them)
    out = sig.take(left)
    ahead = sig[1:].take(left)
    ahead *= t
    out *= u
    out += ahead
    flat_mask = np.ascontiguousarray(mask).ravel()
    m = flat_mask.take(left)  # the products with 0/1 as booleans: no float copy
    m &= flat_mask[1:].take(left)
    np.multiply(out, m, out=ahead)  # ahead's buffer reused for the masked signal
    mean = ahead.sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1)
    out -= mean
    out *= m
    return out


def _peak_lag(window, lags):
    """The correlation's peak in ``window`` (S, L), the correlation at ``lags`` (L,): its lag
    refined between samples by a Gaussian through three points (a parabola where one is not
    positive), and the correlation at the peak sample (S,)."""
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
    delta = np.clip(nan_to_num(delta), -1, 1)
    return lags[k] + delta, c0


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
    half_width = _pixel_kms(pixels_key(wave)) if half_width is None else half_width
    offsets = np.linspace(-half_width, half_width, nstep)
    rv0 = np.asarray(rv0, dtype=np.float64)
    trial = rv0[:, None] + offsets[None, :]  # (S, V)
    pos = rest_positions(star_wave[:, None, :], trial, wave)  # (S, V, P)
    inside = np.isfinite(pos)
    # Sampled in float32: the chi^2 parabola's vertex moves by ~1e-5 of a km/s.
    shifted = sample_rows(nan_to_num(np.asarray(template_norm, dtype=np.float64)), pos,
                          np.float32)
    w = np.where(inside & np.isfinite(obs_norm)[:, None, :], obs_weight[:, None, :], 0.0)
    margin = position_margin(pos)
    w[..., :margin] = 0
    w[..., -margin:] = 0
    f = nan_to_num(obs_norm)
    chi2 = np.empty(trial.shape)
    # The stars of one wavelength solution share the correction's basis: their trials are
    # fitted in one call (each row's products and sums are its own: the same numbers as
    # star by star).
    for group in _same_rows(star_wave):
        # A run of stars (all of them when they share one solution) as a view, not a copy
        rows = slice(group[0], group[-1] + 1) if group[-1] - group[0] + 1 == len(group) \
            else group
        flux = np.repeat(f[rows], nstep, axis=0)
        weight, template = (a[rows].reshape(flux.shape) for a in (w, shifted))
        chi2[rows] = corrected_chi2(flux, weight, template, star_wave[group[0]],
                                    knot_spacing).reshape(len(group), nstep)
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


@functools.lru_cache(maxsize=4)
def _pixel_kms(wave_bytes):
    """The median pixel of wavelengths (their bytes) in km/s: an exposure's templates' pixels
    twice per fit (its log, differences and median ~50 us each time)."""
    wave = np.frombuffer(wave_bytes, dtype=np.float64)
    return SPEED_OF_LIGHT_KMS * np.median(np.diff(np.log(wave)))


def _shared_row(rows):
    """``rows`` (S, P) as one row (P,) when they are all equal (or already one row)."""
    rows = np.asarray(rows)
    return rows[0] if rows.ndim == 2 and len(rows) and (rows == rows[0]).all() else rows


def _same_rows(rows):
    """Indices of the rows (S, P) grouped by equal values (lists, in order of first
    appearance): :func:`~kspec_fluxcal.wavelength.distinct_rows`' grouping (equal in every
    bit), rows all equal (most exposures' stars) found by one comparison."""
    bits = np.asarray(rows, dtype=np.float64).view(np.int64)
    if len(bits) and (bits == bits[0]).all():
        return [list(range(len(bits)))]
    _, inverse = distinct_rows(rows, None)
    return [np.flatnonzero(inverse == k).tolist() for k in range(int(inverse.max(initial=-1)) + 1)]
