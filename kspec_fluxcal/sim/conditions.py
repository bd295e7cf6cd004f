"""Observing conditions of the simulator: what is drawn per night and per exposure.

A night has its aerosol extinction, throughput drift, moonlight, the atmosphere's
temperature, whether it is photometric and its median seeing; an exposure its airmass,
exposure time, water column, water-line widths, transparency, field and, with chromatic
losses, its seeing and the fibers' positioning offsets. Given values are kept, the others
drawn in a fixed order, so that the same seed gives the same survey.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .atmosphere import _AEROSOL

#: What a night draws, uniform in these ranges: its aerosol extinction factor (times the
#: nominal ``atmosphere._AEROSOL`` at 1 um); its moonlight (sky continuum x (1 + moon
#: (lambda / 5500 A)^-2)); its atmosphere's temperature, K (telluric line strengths follow
#: it); its median seeing (FWHM at 5000 A at the zenith, arcsec; with chromatic losses). And
#: the 1-sigma grey and tilt terms of its throughput drift (normal).
_NIGHT = {"aerosol": (0.6, 1.6), "moon": (0.0, 2.0), "temperature": (255.0, 285.0),
          "seeing": (0.9, 1.6), "drift": (0.02, 0.015)}
#: What an exposure draws, uniform in these ranges: exposure time, s; airmass; precipitable-
#: water factor (1 = the column of the line list's equivalent widths); water-line width factor
#: (pressure at the water's mean altitude); grey transparency (thin cloud), which varies by at
#: most 2 % on a photometric night (``photometric_nights``; the issue's definition of
#: photometric); its seeing about the night's median (factor; with chromatic losses). The
#: conditions' ``airmass_range``, ``pwv_range`` and ``transparency_range`` replace the ranges
#: of those three (the same random numbers, mapped into the given range).
_EXPOSURE = {"exptime": (600.0, 1800.0), "airmass": (1.0, 2.0), "pwv": (0.4, 2.5),
             "water_width": (0.85, 1.15), "transparency": (0.8, 1.0),
             "photometric_transparency": (0.98, 1.0), "seeing": (0.85, 1.15)}
#: Chromatic fiber losses (``chromatic_losses``; physics in
#: :mod:`kspec_fluxcal.sim.fiber_losses`): the seeing's growth with airmass, X^0.6 (Roddier
#: 1981); fiber positioning offsets, arcsec per axis (1 sigma); the fraction of the
#: differential refraction left by an atmospheric dispersion corrector (nominal values, not
#: K-SPEC's measured ones).
_SEEING_AIRMASS_POWER = 0.6
_FIBER_POSITION_SIGMA = 0.25
_DAR_RESIDUAL = 0.25


def _ranges(airmass_range, pwv_range):
    """The conditions' ``airmass_range`` and ``pwv_range`` that are given (a dict, empty for
    the defaults), checked: airmass at least 1, water factor at least 0, low <= high."""
    out = {}
    for name, value, least in (("airmass_range", airmass_range, 1.0),
                               ("pwv_range", pwv_range, 0.0)):
        if value is None:
            continue
        lo, hi = (float(v) for v in value)
        if not least <= lo <= hi < np.inf:
            raise ValueError(f"{name}={tuple(value)!r}: need {least:g} <= low <= high (finite)")
        out[name] = (lo, hi)
    return out


def _draw(rng, value, bounds):
    return float(rng.uniform(*bounds)) if value is None else float(value)


def _exposure_conditions(rng, conditions, airmass, exptime, field, nfib, chromatic):
    """An exposure's conditions and, with ``chromatic`` losses, its seeing and fiber offsets.

    Takes the main stream ``rng``, the given night/exposure ``conditions`` (dict or None) and
    the exposure's own ``airmass``, ``exptime``, ``field`` (None: drawn). Returns the dict of
    :func:`_conditions` plus ``temperature`` and ``water_width`` (drawn from a child stream),
    and :class:`_Losses` for ``nfib`` fibers (another child stream) or None.
    """
    cond = _conditions(rng, conditions, airmass, exptime, field)
    sky_rng = rng.spawn(1)[0]  # the atmosphere's own draws (the other streams unchanged)
    cond["temperature"] = _draw(sky_rng, (conditions or {}).get("temperature"),
                                _NIGHT["temperature"])
    cond["water_width"] = _draw(sky_rng, (conditions or {}).get("water_width"),
                                _EXPOSURE["water_width"])
    losses = _losses(rng.spawn(1)[0], cond, conditions, nfib) if chromatic else None
    return cond, losses


def _conditions(rng, conditions, airmass, exptime, field):
    """Night and exposure conditions: given ones kept, the others drawn (in a fixed order)."""
    cond = dict(conditions or {})
    # simulate_exposure's own conditions are checked as simulate_survey's are
    cond.update(_ranges(cond.get("airmass_range"), cond.get("pwv_range")))
    if "aerosol" in cond:
        aerosol = float(cond["aerosol"])
    else:
        aerosol = _AEROSOL[0] * float(rng.uniform(*_NIGHT["aerosol"]))
    drift = tuple(cond["drift"]) if "drift" in cond else \
        tuple(rng.normal(0.0, _NIGHT["drift"]))
    out = {"aerosol": aerosol, "drift": drift,
           "moon": _draw(rng, cond.get("moon"), _NIGHT["moon"]),
           "pwv": _draw(rng, cond.get("pwv"), cond.get("pwv_range", _EXPOSURE["pwv"])),
           "transparency": _draw(rng, cond.get("transparency"),
                                 cond.get("transparency_range", _EXPOSURE["transparency"]))}
    # Rounded as written in the header.
    out["airmass"] = round(_draw(rng, airmass, cond.get("airmass_range", _EXPOSURE["airmass"])),
                           4)
    out["exptime"] = float(np.round(_draw(rng, exptime, _EXPOSURE["exptime"])))
    if field is None:
        field = (float(rng.uniform(0.0, 360.0)), float(np.degrees(np.arcsin(
            rng.uniform(np.sin(np.radians(-30.0)), np.sin(np.radians(60.0)))))))
    out["field"] = field
    return out


class _Losses(NamedTuple):
    seeing: float  # FWHM at 5000 A at the exposure's airmass, arcsec
    offsets: np.ndarray  # (fiber, 2) positioning offsets, arcsec (x: parallactic)


def _losses(rng, cond, conditions, nfib):
    """The exposure's seeing and the fibers' positioning offsets (their own stream)."""
    night = (conditions or {}).get("seeing")
    median = float(rng.uniform(*_NIGHT["seeing"])) if night is None else float(night)
    seeing = (median * rng.uniform(*_EXPOSURE["seeing"])
              * cond["airmass"] ** _SEEING_AIRMASS_POWER)
    return _Losses(round(float(seeing), 3), rng.normal(0.0, _FIBER_POSITION_SIGMA, (nfib, 2)))


def _draw_nights(rng, n, photometric_nights, chromatic):
    """The conditions of ``n`` nights, from the survey's night stream ``rng``.

    Returns one dict per night: ``aerosol``, ``drift``, ``moon``, then ``temperature`` (from
    a child stream), then, from another child stream, ``photometric`` and its
    ``transparency_range`` for a fraction ``photometric_nights`` of them, and the night's
    median ``seeing`` when ``chromatic`` (losses are simulated).
    """
    nights = [{
        "aerosol": _AEROSOL[0] * rng.uniform(*_NIGHT["aerosol"]),
        "drift": tuple(float(d) for d in rng.normal(0.0, _NIGHT["drift"])),
        "moon": float(rng.uniform(*_NIGHT["moon"])),
    } for _ in range(n)]
    # The atmosphere's temperature per night, from its own stream.
    sky_rng = rng.spawn(1)[0]
    for night in nights:
        night["temperature"] = float(sky_rng.uniform(*_NIGHT["temperature"]))
    _night_options(rng.spawn(1)[0], nights, photometric_nights, chromatic)
    return nights


def _night_options(rng, nights, photometric_nights, chromatic):
    """Photometric nights and the nights' median seeing, in place (their own stream)."""
    for night in nights:
        photometric = bool(rng.random() < photometric_nights)
        seeing = float(rng.uniform(*_NIGHT["seeing"]))
        if photometric:
            night.update(photometric=True,
                         transparency_range=_EXPOSURE["photometric_transparency"])
        if chromatic:
            night["seeing"] = seeing
