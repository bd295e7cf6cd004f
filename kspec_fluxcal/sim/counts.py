"""From flux to counts: instrument throughput, fiber apertures, sky, the standards' magnitudes
for their S/N, and the noise.

The response (counts per pixel per flux unit) is exposure time x collecting area x
transparency x instrument throughput x atmospheric transmission 10^(-0.4 k(lambda) X) x
telluric transmission x pixel width x lambda / (h c). Fibers lose a grey fraction of a point
source's light (``aperture``, 0.85-0.95, independent per fiber), or with chromatic losses the
part of the seeing disc outside the fiber (:mod:`kspec_fluxcal.sim.fiber_losses`). Noise:
Poisson counts of signal plus sky (gain 1 e-/count), minus the sky, plus 4 e- read noise; the
variance is the model's signal + sky + read noise^2. Sky-subtraction residuals at bright sky
lines are in the counts but not in the variance; one to four pixels per fiber are NaN
(masked cosmic rays). Optionally (``second_order``), the grating's second order adds to the
pixel at lambda the light of lambda / 2 (:func:`_second_light`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..constants import FLUX_UNIT_SCALE, HC_ERG_AA, KSPEC_COLLECTING_AREA_CM2
from .atmosphere import (
    _SKY_LINES,
    _SKY_RESIDUAL,
    _sky,
    atmospheric_extinction,
    telluric_transmission,
)
from .conditions import _DAR_RESIDUAL, _FIBER_POSITION_SIGMA

#: Peak end-to-end throughput (atmosphere excluded): telescope, fiber, spectrograph, CCD.
_PEAK_THROUGHPUT = 0.22
#: CCD gain (e-/count) and read noise (e-), typical of a scientific CCD.
_GAIN = 1.0
_READ_NOISE = 4.0
#: Fiber grey aperture losses for point sources (seeing, positioning): uniform in this range,
#: independent per fiber. Extended sky fills the fiber and has none.
_APERTURE_RANGE = (0.85, 0.95)

#: Masked cosmic rays per fiber (NaN pixels), inclusive range.
_COSMICS_PER_FIBER = (1, 4)


#: Gaia G (Vega) range of the standard stars, when their S/N can be reached in it.
_STANDARD_G = (13.5, 16.5)


#: The brightest standards used when the usual range cannot reach the S/N asked for (bright
#: standards of short exposures), before the transparency is changed (which makes the
#: implied throughput unphysical, as the pipeline then says).
_BRIGHT_STANDARD_G = 9.0


def _throughput(wavelength, drift=(0.0, 0.0)):
    """End-to-end instrument throughput (atmosphere excluded), with a night's drift."""
    lam = np.asarray(wavelength, dtype=np.float64)
    bell = np.exp(-0.5 * (np.log(lam / 6000.0) / 0.36) ** 2)
    slope = 1.0 + 0.08 * (lam - 6000.0) / 2500.0
    ripple = 1.0 + 0.03 * np.sin(2.0 * np.pi * (lam - 3500.0) / 1400.0)  # coatings, 1400 A
    dip = 1.0 - 0.05 * np.exp(-0.5 * ((lam - 5600.0) / 150.0) ** 2)  # a dichroic-like dip
    night = 1.0 + drift[0] + drift[1] * (lam - 6000.0) / 2500.0
    return _PEAK_THROUGHPUT * bell * slope * ripple * dip * night


def _instrument_counts(wavelength, pixel_width, exptime, drift):
    """Counts per pixel per flux unit above the instrument (no atmosphere, no cloud)."""
    return (exptime * KSPEC_COLLECTING_AREA_CM2 * _throughput(wavelength, drift) * pixel_width
            * wavelength / HC_ERG_AA * FLUX_UNIT_SCALE / _GAIN)


def _snr_curves(unit_counts, noise_var):
    """Median S/N per pixel (G, star) for a G (Vega) grid; counts are given at G = 15."""
    mags = np.linspace(8.0, 24.0, 321)
    scale = 10.0 ** (-0.4 * (mags - 15.0))
    signal = scale[:, None, None] * unit_counts[None]
    snr = np.nanmedian(signal / np.sqrt(signal + noise_var[None]), axis=2)
    return mags, snr


def _solve_magnitudes(rng, unit_counts, noise_var, snr_range, transparency):
    """Gaia G of each standard for a target S/N in ``snr_range``: in 13.5-16.5, else down to
    G = 9 (bright standards); the transparency changes only when neither reaches the range."""
    lo, hi = snr_range
    mags, snr = _snr_curves(unit_counts, noise_var)  # S/N decreases with G
    g_lo, g_hi = _STANDARD_G

    def snr_at(g, k, q):  # S/N of star k at magnitude g when the counts are scaled by q
        return np.interp(g - 2.5 * np.log10(q), mags, snr[:, k])

    def mag_at(target, k):  # magnitude of star k giving S/N ``target`` at q = 1
        return np.interp(target, snr[::-1, k], mags[::-1])

    def interval(k, q):  # reachable S/N inside the range, kept 2% away from its ends
        return max(lo, snr_at(g_hi, k, q)) * 1.02, min(hi, snr_at(g_lo, k, q)) / 1.02

    nstar = snr.shape[1]
    q = 1.0
    if any(a >= b for a, b in (interval(k, q) for k in range(nstar))):
        g_lo = _BRIGHT_STANDARD_G
    if any(a >= b for a, b in (interval(k, q) for k in range(nstar))):
        # Put the middle of the range (in log) at the middle magnitude for the median star.
        g_mid = float(np.median([mag_at(np.sqrt(lo * hi), k) for k in range(nstar)]))
        q = 10.0 ** (0.4 * (0.5 * (g_lo + g_hi) - g_mid))
    gmag = np.empty(nstar)
    for k in range(nstar):
        a, b = interval(k, q)
        if a < b:
            target = np.exp(rng.uniform(np.log(a), np.log(b)))
            gmag[k] = mag_at(target, k) + 2.5 * np.log10(q)
        else:  # out of reach for this star: the nearest magnitude
            gmag[k] = g_lo if snr_at(g_lo, k, q) < lo else g_hi
    return gmag, transparency * q


class _Light(NamedTuple):
    instrument: np.ndarray  # (pixel,) common grid, at transparency 1
    atmosphere: np.ndarray
    telluric: np.ndarray
    rows: tuple  # (instrument, atmosphere, telluric) on each fiber's pixels (fiber, pixel)
    aperture: np.ndarray  # (fiber,) the grey draw (chromatic: its median over the pixels)
    sky_counts: np.ndarray
    residual: np.ndarray
    noise_var: np.ndarray
    # Point-source apertures on each fiber's pixels and on the common grid: (fiber, 1) grey,
    # or (fiber, pixel) with chromatic losses; and the expected one of a point source.
    apertures: tuple
    expected: np.ndarray
    second: object = None  # _SecondLight (``second_order``) or None


class _SecondLight(NamedTuple):
    """The second order's light on each fiber's pixels (fiber, pixel): counts per flux unit
    at lambda / 2 (transparency 1, times the efficiency ratio, 0 below the setup's blue
    end), the point-source aperture there and the sky's counts."""

    response: np.ndarray
    aperture: np.ndarray
    sky_counts: np.ndarray


def _apertures(grey, pixels, cond, losses):
    """Point-source apertures (rows, common grid) and the expected one (module constants)."""
    if losses is None:
        return (grey[:, None], grey[:, None]), np.full(pixels.base.size, np.mean(
            _APERTURE_RANGE))
    from .fiber_losses import expected_aperture

    other = grey / _APERTURE_RANGE[1]  # the fiber's own losses; seeing is modelled now
    rows, common = (_chromatic_apertures(grey, w, cond, losses)
                    for w in (pixels.rows, pixels.base))
    expected = np.mean(other) * expected_aperture(pixels.base, losses.seeing, cond["airmass"],
                                                  _FIBER_POSITION_SIGMA, _DAR_RESIDUAL)
    return (rows, common), expected


def _chromatic_apertures(grey, wave, cond, losses):
    """Point-source apertures (fiber, pixel) at ``wave`` with chromatic losses: each fiber's
    own losses (``grey`` over the largest) times its seeing and refraction losses."""
    from .fiber_losses import fiber_apertures

    return (grey / _APERTURE_RANGE[1])[:, None] * fiber_apertures(
        wave, losses.seeing, cond["airmass"], losses.offsets, _DAR_RESIDUAL)


def _telluric_conditions(cond):
    return cond["airmass"], cond["pwv"], cond["temperature"], cond["water_width"]


def _response_terms(cond, wave, width, lsf):
    """Counts per flux unit of the instrument, the extinction and the telluric transmission
    at ``wave`` (pixel widths ``width``), through the line spread ``lsf`` (or a list of
    them, one per row of ``wave``)."""
    instrument = _instrument_counts(wave, width, cond["exptime"], cond["drift"])
    atmosphere = 10.0 ** (-0.4 * atmospheric_extinction(wave, cond["aerosol"]) * cond["airmass"])
    if isinstance(lsf, list):
        telluric = np.stack([telluric_transmission(w, one, *_telluric_conditions(cond))
                             for w, one in zip(wave, lsf, strict=True)])
    else:
        telluric = telluric_transmission(wave, lsf, *_telluric_conditions(cond))
    return instrument, atmosphere, telluric


def _light(rng, cond, pixels, optics, losses=None, second=None):
    """Response terms, apertures, sky and sky-subtraction residuals of every fiber (and the
    second order's light with ``second``, :func:`_second_light`: no random draw)."""
    nfib, npix = pixels.rows.shape

    def response_of(w, lsf):
        return _response_terms(cond, w, np.gradient(w, axis=-1), lsf)

    common = response_of(pixels.base, optics.exposure)
    if pixels.per_fiber:
        rows = response_of(pixels.rows, optics.exposure)
    else:
        rows = tuple(np.broadcast_to(a, (nfib, npix)) for a in common)
    if optics.fibers is not None:
        rows = (*rows[:2], np.stack([telluric_transmission(pixels.rows[f], optics.fibers[f],
                                                           *_telluric_conditions(cond))
                                     for f in range(nfib)]))
    aperture = grey = rng.uniform(*_APERTURE_RANGE, nfib)
    sky_counts = np.empty((nfib, npix))
    residual = np.zeros((nfib, npix))
    nlines = len(_SKY_LINES)
    coef_scale, coef_shift = (rng.choice([-1.0, 1.0], (nfib, nlines))
                              * rng.uniform(*_SKY_RESIDUAL, (nfib, nlines)) for _ in range(2))
    shared = not pixels.per_fiber and optics.fibers is None
    sky_shared = _sky(pixels.base, optics.exposure, cond["moon"]) if shared else None
    for f in range(nfib):  # per fiber: its own wavelengths, LSF and residual coefficients
        cont, profiles, offsets = sky_shared or _sky(pixels.rows[f], optics.fiber(f), cond["moon"])
        lines = profiles * rows[0][f]
        sky_counts[f] = cont * rows[0][f] + lines.sum(axis=0)
        residual[f] = coef_scale[f] @ lines + coef_shift[f] @ (lines * offsets)
    apertures, expected = _apertures(aperture, pixels, cond, losses)
    if losses is not None:
        aperture = np.median(apertures[1], axis=1)
    extra = None if second is None else _second_light(cond, pixels, second, losses, grey)
    return _Light(*common, rows, aperture, sky_counts, residual, sky_counts + _READ_NOISE**2,
                  apertures, expected, extra)


def _second_light(cond, pixels, second, losses, grey):
    """The second order's :class:`_SecondLight`. The pixel at lambda (width d lambda)
    receives, times the efficiency ratio, the photons the fiber gets at lambda / 2 over
    d lambda / 2 (second order: twice the dispersion), through the same telescope,
    atmosphere and fiber (the instrument's throughput and the aperture at lambda / 2)."""
    wave, optics = second.pixels.rows, second.optics
    nfib = wave.shape[0]
    instrument, atmosphere, telluric = _response_terms(
        cond, wave, 0.5 * np.gradient(pixels.rows, axis=-1),
        optics.exposure if optics.fibers is None else [optics.fiber(f) for f in range(nfib)])
    instrument = second.weight * instrument
    aperture = grey[:, None] if losses is None else _chromatic_apertures(grey, wave, cond,
                                                                         losses)
    # Fibers on one solution and line spread see one sky spectrum (as in _light).
    shared = not second.pixels.per_fiber and optics.fibers is None
    sky_shared = _sky(wave[0], optics.exposure, cond["moon"]) if shared else None
    sky = np.empty_like(wave)
    for f in range(nfib):  # extended: no aperture loss, no extinction (emission)
        cont, profiles, _ = sky_shared or _sky(wave[f], optics.fiber(f), cond["moon"])
        sky[f] = instrument[f] * (cont + profiles.sum(axis=0))
    return _SecondLight(instrument * atmosphere * telluric, aperture, sky)


class _Counts(NamedTuple):
    counts: np.ndarray
    variance: np.ndarray
    noiseless: np.ndarray
    response: np.ndarray
    transparency: float
    std_snr: np.ndarray
    response_fiber: np.ndarray  # (fiber, pixel): the response on each fiber's own pixels
    second: np.ndarray | None = None  # (fiber, pixel): the second order's noiseless counts


def _expose(rng, targets, light, kinds, snr_range, transparency, second_rng=None):
    """Standards' magnitudes for their S/N (the transparency changes only if needed), then the
    noisy counts: Poisson (signal + sky) - sky + read noise + residuals, cosmic rays. With
    the second order's light, its Poisson counts (signal + sky) - sky are drawn from
    ``second_rng`` and added: every other draw stays as without."""
    std = targets.std_fibers
    inst_rows, atm_rows, tell_rows = light.rows

    def response_rows(q):
        return inst_rows * q * atm_rows * tell_rows

    unit = targets.true_rows[std] * response_rows(transparency)[std] * light.apertures[0][std]
    lo, hi = (float(v) for v in snr_range)
    g_std, transparency = _solve_magnitudes(rng, unit, light.noise_var[std], (lo, hi),
                                            transparency)
    scale = 10.0 ** (-0.4 * (g_std - 15.0))
    targets.gmag[: std.size] = g_std
    targets.dilution[: std.size] *= scale
    targets.true_flux[std] *= scale[:, None]
    targets.true_rows[std] *= scale[:, None]
    if targets.second_rows is not None:
        targets.second_rows[std] *= scale[:, None]
    response = light.instrument * transparency * light.atmosphere * light.telluric
    signal = targets.true_rows * response_rows(transparency) * light.apertures[0]
    nfib, npix = signal.shape
    counts = (rng.poisson(signal + light.sky_counts) - light.sky_counts
              + rng.normal(0.0, _READ_NOISE, (nfib, npix)) + light.residual)
    variance = signal + light.noise_var
    second = None
    if light.second is not None:  # its noiseless counts, in the truth
        second = targets.second_rows * light.second.response * transparency \
            * light.second.aperture
        sky2 = light.second.sky_counts
        counts += second_rng.poisson(second + sky2) - sky2
        variance += second + sky2
    ncosmic = rng.integers(_COSMICS_PER_FIBER[0], _COSMICS_PER_FIBER[1] + 1, nfib)
    for f in range(nfib):
        hit = rng.choice(npix, ncosmic[f], replace=False)
        counts[f, hit] = np.nan
        variance[f, hit] = np.nan
    dead = kinds == "dead"
    for array in (counts, variance, targets.true_flux, targets.true_rows,
                  *(() if second is None else (second,))):
        array[dead] = np.nan
    noiseless = targets.true_flux * response[None, :] * light.apertures[1]
    with np.errstate(invalid="ignore"):
        std_snr = np.nanmedian(signal[std] / np.sqrt(variance[std]), axis=1)
    return _Counts(counts, variance, noiseless, response, transparency, std_snr,
                   np.ascontiguousarray(response_rows(transparency)), second)
