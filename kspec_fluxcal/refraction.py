"""Refraction of air and the chromatic fiber loss it causes.

The refractive index of air follows Edlen's dispersion formula corrected for pressure,
temperature and water vapour (Filippenko 1982, PASP 94, 715, Eqs. 1-3). A star positioned on
its fiber at the guide wavelength is displaced at any other wavelength by the differential
refraction 206265 (n(lambda) - n(lambda_guide)) tan z arcsec; a small displacement d loses a
fraction of light proportional to d^2, so the loss in ln flux is, to first order,
``a tan^2 z u(lambda)^2`` with ``u = (n(lambda) - n(lambda_guide)) / (n(4000 A) -
n(lambda_guide))``: a fixed shape in wavelength (:func:`refraction_loss_shape`) times one
amplitude, which the survey model fits per setup. The shape hardly depends on the site's air
(its pressure and temperature scale n - 1 as a whole, which the amplitude absorbs).
"""

from __future__ import annotations

import numpy as np

from .constants import GUIDE_WAVELENGTH

__all__ = ["refractive_index_minus_one", "differential_refraction", "refraction_loss_shape",
           "SITE"]

#: Nominal site air (a 1-2 km mountain observatory; not K-SPEC's measured values): pressure
#: and water vapour pressure in mmHg, temperature in C.
SITE = {"pressure": 620.0, "temperature": 5.0, "water": 6.0}
#: Radians to arcsec.
_ARCSEC = 206264.806
#: Wavelength at which :func:`refraction_loss_shape` is 1, Angstrom.
_SHAPE_REFERENCE = 4000.0


def refractive_index_minus_one(wavelength, site=None):
    """n - 1 of air at the site (Filippenko 1982, Eqs. 1-3).

    Parameters
    ----------
    wavelength : array_like
        Angstrom (air; the difference with vacuum wavelengths is negligible here).
    site : dict, optional
        ``pressure`` and ``water`` (mmHg), ``temperature`` (C); default :data:`SITE`.
    """
    site = SITE if site is None else site
    inv2 = (1e4 / np.asarray(wavelength, dtype=np.float64)) ** 2  # 1/lambda^2, micron^-2
    sea = 64.328 + 29498.1 / (146.0 - inv2) + 255.4 / (41.0 - inv2)  # 15 C, 760 mmHg, x1e6
    p, t = site["pressure"], site["temperature"]
    dry = sea * p * (1.0 + (1.049 - 0.0157 * t) * 1e-6 * p) / (720.883 * (1.0 + 0.003661 * t))
    wet = (0.0624 - 0.000680 * inv2) / (1.0 + 0.003661 * t) * site["water"]
    return (dry - wet) * 1e-6


def differential_refraction(wavelength, airmass, reference=GUIDE_WAVELENGTH, site=None):
    """Refraction at ``wavelength`` minus that at ``reference``, arcsec (towards the zenith
    positive): 206265 (n - n_ref) tan z, tan z = sqrt(X^2 - 1) (plane-parallel)."""
    tan_z = np.sqrt(np.maximum(np.asarray(airmass, dtype=np.float64) ** 2 - 1.0, 0.0))
    return _ARCSEC * (refractive_index_minus_one(wavelength, site)
                      - refractive_index_minus_one(reference, site)) * tan_z


def refraction_loss_shape(wavelength, guide=GUIDE_WAVELENGTH):
    """The wavelength shape of the light a fiber loses to differential refraction:
    ((n(lambda) - n(guide)) / (n(4000 A) - n(guide)))^2, 0 at the guide wavelength and 1 at
    4000 A (times an amplitude and tan^2 z, the loss in ln flux of a small displacement).

    Parameters
    ----------
    wavelength : array_like
        Angstrom (air).
    guide : float
        The wavelength the fibers are positioned at, Angstrom (not 4000 A).
    """
    at_guide = refractive_index_minus_one(guide)
    u = ((refractive_index_minus_one(wavelength) - at_guide)
         / (refractive_index_minus_one(_SHAPE_REFERENCE) - at_guide))
    return u * u
