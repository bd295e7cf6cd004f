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

# Per-exposure draws.

#: Exposure time range, s, and airmass range.
_EXPTIME_RANGE = (600.0, 1800.0)
_AIRMASS_RANGE = (1.0, 2.0)
#: Night-to-night throughput drift: grey and tilt terms, 1-sigma.
_DRIFT_SIGMA = (0.02, 0.015)



#: Aerosol extinction factor of a night (times the nominal ``_AEROSOL`` at 1 um).
_AEROSOL_NIGHT = (0.6, 1.6)
#: Temperature of the atmosphere per night, K (telluric line strengths follow it).
_TELLURIC_TEMPERATURE = (255.0, 285.0)



#: Water-line width factor per exposure (pressure at the water's mean altitude).
_WATER_WIDTH = (0.85, 1.15)
#: Precipitable-water factor (1 = the column of the line list's equivalent widths), per exposure.
_PWV_RANGE = (0.4, 2.5)
#: Grey transparency (thin cloud) per exposure; on a photometric night (``photometric_nights``)
#: it varies by at most 2 % (the issue's definition of photometric).
_TRANSPARENCY_RANGE = (0.8, 1.0)
_PHOTOMETRIC_TRANSPARENCY = (0.98, 1.0)

#: Moonlight: sky continuum x (1 + moon (lambda / 5500 A)^-2), moon drawn per night.
_MOON_RANGE = (0.0, 2.0)



# Chromatic fiber losses.



#: Chromatic fiber losses (``chromatic_losses``; physics in :mod:`kspec_fluxcal.sim.fiber_losses`):
#: the night's median seeing (FWHM at 5000 A at the zenith, arcsec), an exposure's scatter
#: about it (factor) and its growth with airmass, X^0.6 (Roddier 1981); fiber positioning
#: offsets, arcsec per axis (1 sigma); the fraction of the differential refraction left by an
#: atmospheric dispersion corrector (nominal values, not K-SPEC's measured ones).
_SEEING_NIGHT = (0.9, 1.6)
_SEEING_EXPOSURE = (0.85, 1.15)
_SEEING_AIRMASS_POWER = 0.6
_FIBER_POSITION_SIGMA = 0.25
_DAR_RESIDUAL = 0.25



def _draw(rng, value, bounds):
    return float(rng.uniform(*bounds)) if value is None else float(value)



def _conditions(rng, conditions, airmass, exptime, field):
    """Night and exposure conditions: given ones kept, the others drawn (in a fixed order)."""
    cond = dict(conditions or {})
    if "aerosol" in cond:
        aerosol = float(cond["aerosol"])
    else:
        aerosol = _AEROSOL[0] * float(rng.uniform(*_AEROSOL_NIGHT))
    drift = tuple(cond["drift"]) if "drift" in cond else tuple(rng.normal(0.0, _DRIFT_SIGMA))
    out = {"aerosol": aerosol, "drift": drift,
           "moon": _draw(rng, cond.get("moon"), _MOON_RANGE),
           "pwv": _draw(rng, cond.get("pwv"), _PWV_RANGE),
           "transparency": _draw(rng, cond.get("transparency"),
                                 cond.get("transparency_range", _TRANSPARENCY_RANGE))}
    out["airmass"] = round(_draw(rng, airmass, _AIRMASS_RANGE), 4)  # as written in the header
    out["exptime"] = float(np.round(_draw(rng, exptime, _EXPTIME_RANGE)))
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
    median = float(rng.uniform(*_SEEING_NIGHT)) if night is None else float(night)
    seeing = median * rng.uniform(*_SEEING_EXPOSURE) * cond["airmass"] ** _SEEING_AIRMASS_POWER
    return _Losses(round(float(seeing), 3), rng.normal(0.0, _FIBER_POSITION_SIGMA, (nfib, 2)))



def _night_options(rng, nights, options, chromatic):
    """Photometric nights and the nights' median seeing, in place (their own stream)."""
    for night in nights:
        photometric = bool(rng.random() < options["photometric_nights"])
        seeing = float(rng.uniform(*_SEEING_NIGHT))
        if photometric:
            night.update(photometric=True, transparency_range=_PHOTOMETRIC_TRANSPARENCY)
        if chromatic:
            night["seeing"] = seeing
