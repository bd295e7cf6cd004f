"""A grating's second order: the light of lambda / 2 on the pixel of lambda, and its removal.

Without an order-sorting filter a grating puts, in second order, the light of lambda / 2 on
the pixel of first-order wavelength lambda: from twice a setup's blue end redward (7000 A for
the IsoPlane's 3500-8500 A). Twice the dispersion in second order spreads it over half the
Angstroms: the pixel at lambda, of width d lambda, receives w(lambda) x the photons its
fiber gets at lambda / 2 over d lambda / 2, w the second- to first-order efficiency ratio at
lambda / 2. The same physics serves the simulator (:mod:`kspec_fluxcal.sim.optics`), which
adds the light, and the pipeline (:func:`correct_second_order`), which removes it.

The ratio is a constant ``r`` (measured by the instrument team), or, given the grating's
first-order blaze wavelength lambda_b, scalar theory's: ``r`` x E_2(mu) / E_1(mu) at
mu = lambda / 2, E_m(mu) = sinc^2(pi (m - lambda_b / mu)) (:func:`blaze_efficiency`), which
is ``r`` x ((lambda_b - mu) / (2 mu - lambda_b))^2, ``r`` then a scale (1: scalar theory).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import ConfigError
from .exposure import add_history

__all__ = [
    "blaze_efficiency",
    "second_order_ratio",
    "second_order_problem",
    "correct_second_order",
    "MAX_GAP",
]

#: Bad first-order pixels (NaN counts, cosmic rays) bridged when reading the counts at
#: lambda / 2: a run of up to this many is interpolated over from its good neighbours (the
#: second-order light is a few % of a pixel's counts and the gap narrower than a line's
#: FWHM, ~2-3 px); a longer run makes the pixels whose lambda / 2 falls in it bad.
MAX_GAP = 2


def blaze_efficiency(wavelength, order, blaze):
    """A blazed grating's efficiency in order ``order`` at ``wavelength`` (Angstrom), scalar
    theory in Littrow: E_m(lambda) = sinc^2(pi (m - lambda_b / lambda)), sinc x = sin x / x,
    ``blaze`` lambda_b the first-order blaze wavelength (E_m = 1 at lambda_b / m). The scalar
    blaze function of Palmer & Loewen, *Diffraction Grating Handbook* (6th ed., Newport
    2005); it ignores polarization and shadowing, fair for grooves much wider than lambda."""
    return np.sinc(order - blaze / np.asarray(wavelength, dtype=float)) ** 2


def second_order_ratio(half, ratio, blaze=None):
    """The second- to first-order ratio w at ``half`` = lambda / 2 (Angstrom): ``ratio``
    itself without a ``blaze`` (None), else ``ratio`` x E_2 / E_1 at lambda / 2
    (:func:`blaze_efficiency`)."""
    if blaze is None:
        return ratio
    return ratio * (blaze_efficiency(half, 2, blaze) / blaze_efficiency(half, 1, blaze))


def second_order_problem(ratio, blaze, blue, where="the setup's"):
    """What is wrong with a second order's ``ratio`` and ``blaze`` (None: a constant
    ratio) for light from ``blue`` (Angstrom, ``where`` blue end), or None.

    Returns
    -------
    (str, str) or None
        The option at fault ('second_order' or 'second_order_blaze') and why.
    """
    if blaze is None:
        if not 0.0 <= ratio < 1.0:
            return "second_order", (f"second_order={ratio!r}: need a second- to first-order "
                                    "efficiency ratio in [0, 1)")
        return None
    if not 0.0 < ratio <= 1.0:
        return "second_order", (f"second_order={ratio!r} with second_order_blaze: need a "
                                "scale of the scalar theory's ratio in (0, 1] (1: scalar "
                                "theory)")
    # E_1 vanishes at lambda_b / 2: the ratio is finite only for lambda / 2 redder.
    if not 0.0 < blaze < 2.0 * blue:
        return "second_order_blaze", (
            f"second_order_blaze={blaze!r}: need a first-order blaze wavelength in "
            f"(0, {2.0 * blue:.0f}) A (twice {where} blue end, where the first order's "
            "efficiency would vanish)")
    return None


def correct_second_order(exposure, ratio, blaze=0.0):
    """Remove the grating's second order from every fiber of an opened exposure.

    On each fiber's own pixels, C1(lambda) = C(lambda) - w(lambda) q(lambda / 2)
    d lambda / 2, q the fiber's own counts per Angstrom at lambda / 2 (linear interpolation
    between its good pixels, over gaps of up to :data:`MAX_GAP` bad ones), w the ratio
    (:func:`second_order_ratio`); the variance gains (w d lambda / 2)^2 var q. Pixels whose
    lambda / 2 is bluer than their fiber's first pixel get nothing: light bluer than the
    setup's blue end, which the atmosphere passes down to ~3200 A, is not seen in first order
    and cannot be removed. Counts at lambda / 2 are taken as first-order only, true below
    four times the blue end (a setup that wide would also see the third order, not modelled).

    Parameters
    ----------
    exposure : xarray.Dataset
        From :func:`kspec_fluxcal.open_exposure` (counts; NumPy or Dask, one chunk along
        wavelength).
    ratio : float
        The second- to first-order efficiency ratio, in [0, 1) (0: nothing done); with
        ``blaze``, a scale of scalar theory's ratio in (0, 1].
    blaze : float
        The grating's first-order blaze wavelength, Angstrom, below twice the exposure's blue
        end; 0 or None: a constant ratio.

    Returns
    -------
    xarray.Dataset
        ``exposure`` itself when ``ratio`` is 0; else a copy with ``flux``, ``variance`` and
        ``good`` corrected (a pixel whose lambda / 2 falls in a longer gap is bad: NaN flux
        and variance), attrs ``fcal2nd`` (the ratio) and ``fcal2blz`` (the blaze, 0: none),
        and a HISTORY entry.

    Raises
    ------
    ConfigError
        A ratio or blaze out of range (the message names the option).
    """
    ratio, blaze = float(ratio), float(blaze) if blaze else None
    if ratio == 0.0 and blaze is None:
        # Nothing to remove, and no blaze for the blue end to bound: the fiber wavelengths
        # unread (a DataArray of them and their minimum: ~0.15 ms of every calibration)
        return exposure
    wave = exposure["fiber_wavelength"]
    blue = float(np.nanmin(wave.values))
    problem = second_order_problem(ratio, blaze, blue, "the exposure's")
    if problem is not None:
        raise ConfigError(None, f"[instrument] {problem[0]}", problem[1])
    if ratio == 0.0:
        return exposure
    flux, variance, good = (exposure[name] for name in ("flux", "variance", "good"))
    out = xr.apply_ufunc(
        _correct, flux, variance, good, wave,
        input_core_dims=[["wavelength"]] * 4, output_core_dims=[["wavelength"]] * 3,
        dask="parallelized", output_dtypes=[flux.dtype, variance.dtype, bool],
        kwargs={"ratio": ratio, "blaze": blaze})
    corrected = exposure.copy()
    for name, new in zip(("flux", "variance", "good"), out, strict=True):
        corrected[name] = new.transpose(*exposure[name].dims).assign_attrs(
            exposure[name].attrs)
    corrected.attrs.update({"fcal2nd": ratio, "fcal2blz": blaze or 0.0})
    law = (f"x scalar theory's E2/E1 at lambda/2 (blaze {blaze:g} A)" if blaze
           else "(constant)")
    add_history(corrected, f"second-order light removed: ratio {ratio:g} {law}, from "
                f"{2.0 * blue:.0f} A (twice the blue end), the fiber's own counts at lambda/2 "
                f"over half the pixel's width; gaps of up to {MAX_GAP} bad pixels bridged")
    return corrected


def _correct(flux, variance, good, wave, *, ratio, blaze):
    """:func:`correct_second_order` on arrays (fiber, pixel); returns (flux, variance, good)
    in the input dtypes."""
    nfib, npix = flux.shape
    f64 = np.float64
    counts, var = flux.astype(f64), variance.astype(f64)
    width = np.gradient(wave, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        q, var_q = counts / width, var / width**2  # per Angstrom
    solved = np.isfinite(wave)
    index = np.arange(npix)
    # The search needs increasing rows: an unsolved pixel (bad anyway) takes its left
    # neighbour's wavelength, the fiber's first solved one before it; a fiber without a
    # solution (its pixels all bad) the smallest wavelength.
    filled = np.maximum.accumulate(np.where(solved, wave, -np.inf), axis=1)
    first = np.take_along_axis(wave, np.argmax(solved, axis=1)[:, None], axis=1)
    filled = np.where(np.isneginf(filled), first, filled)
    filled[~np.isfinite(filled)] = np.nanmin(wave)
    blue = filled[:, :1]
    hit = solved & (0.5 * wave >= blue)  # pixels that see second-order light
    new_flux, new_var, lost = counts, var, np.zeros_like(hit)
    if not hit.any():
        return flux, variance, good
    # Only the columns from the first pixel hit on (the red part): the rest is unchanged.
    red = slice(int(np.argmax(hit.any(axis=0))), None)
    hit, half = hit[:, red], 0.5 * wave[:, red]
    # Row-wise search in one call: rows shifted apart by more than their span.
    span = np.nanmax(filled) - np.nanmin(filled) + 1.0
    shift = (np.arange(nfib) * 2.0 * span)[:, None]
    right = np.searchsorted((filled + shift).ravel(), np.where(hit, half, blue) + shift,
                            side="right") - (np.arange(nfib) * npix)[:, None]
    right = np.clip(right, 1, npix - 1)
    lower = np.maximum.accumulate(np.where(good, index, -1), axis=1)
    upper = np.minimum.accumulate(np.where(good, index, npix)[:, ::-1], axis=1)[:, ::-1]
    lo = np.take_along_axis(lower, right - 1, axis=1)
    hi = np.take_along_axis(upper, right, axis=1)
    usable = hit & (lo >= 0) & (hi < npix) & (hi - lo - 1 <= MAX_GAP)
    lo, hi = np.clip(lo, 0, npix - 1), np.clip(hi, 0, npix - 1)
    w_lo, w_hi = (np.take_along_axis(filled, k, axis=1) for k in (lo, hi))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(hi > lo, (half - w_lo) / (w_hi - w_lo), 0.0)
    at_half = (1.0 - t) * np.take_along_axis(q, lo, axis=1) \
        + t * np.take_along_axis(q, hi, axis=1)
    var_half = (1.0 - t) ** 2 * np.take_along_axis(var_q, lo, axis=1) \
        + t**2 * np.take_along_axis(var_q, hi, axis=1)
    gain = np.where(hit, second_order_ratio(np.where(hit, half, blue), ratio, blaze), 0.0) \
        * 0.5 * width[:, red]
    lost[:, red] = hit & ~usable
    with np.errstate(invalid="ignore"):
        new_flux[:, red] = np.where(usable, counts[:, red] - gain * at_half, counts[:, red])
        new_var[:, red] = np.where(usable, var[:, red] + gain**2 * var_half, var[:, red])
    new_flux[lost], new_var[lost] = np.nan, np.nan
    return (new_flux.astype(flux.dtype), new_var.astype(variance.dtype),
            good & ~lost & np.isfinite(new_flux))
