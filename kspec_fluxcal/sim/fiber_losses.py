"""Chromatic fiber losses of point sources: seeing and differential atmospheric refraction.

A fiber of radius :data:`FIBER_RADIUS_ARCSEC` collects the part of a star's image that falls
inside it. The image is a Gaussian whose FWHM is the seeing at the exposure's airmass, scaled
with wavelength as lambda^-1/5 (Kolmogorov turbulence; Roddier 1981, Progress in Optics 19,
281); its centre sits at the fiber's positioning offset plus the differential refraction
relative to the guide wavelength, along the parallactic direction: R(lambda) - R(lambda_g) =
206265 (n(lambda) - n(lambda_g)) tan z, with n the refractive index of air at the site
(:mod:`kspec_fluxcal.refraction`: Filippenko 1982, PASP 94, 715, Edlen's dispersion
formula corrected for pressure, temperature and water vapour). The collected fraction of a
Gaussian image offset by d in a circle of radius R is the CDF of a non-central chi^2 with 2
degrees of freedom: P(chi'^2 < (R/sigma)^2; nc = (d/sigma)^2). Blue light, with a broader and
more displaced image, is lost more than red, more so at high airmass and in bad seeing:
every figure computed with grey losses alone is optimistic.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from ..constants import FWHM_PER_SIGMA, GUIDE_WAVELENGTH
from ..refraction import SITE, differential_refraction, refractive_index_minus_one

__all__ = ["refractive_index_minus_one", "differential_refraction", "seeing_at",
           "enclosed_fraction", "fiber_apertures", "expected_aperture",
           "FIBER_RADIUS_ARCSEC", "GUIDE_WAVELENGTH", "SITE"]

#: Fiber core radius on the sky, arcsec (3 arcsec diameter, as the simulator's sky assumes).
FIBER_RADIUS_ARCSEC = 1.5
#: Seeing's wavelength dependence, FWHM ~ lambda^-1/5 (Kolmogorov; Roddier 1981), and the
#: wavelength the SEEING keyword refers to, Angstrom.
_SEEING_POWER = -0.2
SEEING_WAVELENGTH = 5000.0
#: Spacing of the grid the fractions are computed on before interpolation, Angstrom.
_COARSE_STEP = 50.0
#: Offsets of the expected aperture's average: Gauss-Hermite points per axis.
_QUADRATURE = 12


def seeing_at(wavelength, seeing):
    """Seeing FWHM (arcsec) at ``wavelength``: ``seeing`` at :data:`SEEING_WAVELENGTH`,
    scaled as lambda^-1/5."""
    return seeing * (np.asarray(wavelength, dtype=np.float64) / SEEING_WAVELENGTH) ** _SEEING_POWER


def enclosed_fraction(offset, fwhm, radius=FIBER_RADIUS_ARCSEC):
    """Fraction of a Gaussian image of ``fwhm`` offset by ``offset`` from the centre of a
    circle of ``radius`` (arcsec, any broadcastable shapes) that falls inside it."""
    sigma = np.asarray(fwhm, dtype=np.float64) / FWHM_PER_SIGMA
    return scipy.stats.ncx2.cdf((radius / sigma) ** 2, 2, (np.asarray(offset) / sigma) ** 2)


def fiber_apertures(wavelength, seeing, airmass, offsets, dispersion=1.0):
    """Each fiber's collected fraction of a point source, per pixel.

    Parameters
    ----------
    wavelength : numpy.ndarray
        (fiber, pixel) or (pixel,), Angstrom.
    seeing : float
        FWHM at :data:`SEEING_WAVELENGTH` at the exposure's airmass, arcsec.
    airmass : float
    offsets : numpy.ndarray, shape (fiber, 2)
        Positioning offsets at the guide wavelength, arcsec, x along the parallactic
        direction (the way refraction moves the image).
    dispersion : float
        Fraction of the differential refraction that reaches the focal plane (1: no
        atmospheric dispersion corrector).

    Returns
    -------
    numpy.ndarray, shape (fiber, pixel)
    """
    wave = np.broadcast_to(np.asarray(wavelength, dtype=np.float64),
                           (offsets.shape[0], np.shape(wavelength)[-1]))
    # The fraction is smooth in wavelength: computed on a coarse uniform grid (every
    # _COARSE_STEP A; error ~1e-4) and interpolated linearly to every pixel.
    lo, hi = np.nanmin(wave), np.nanmax(wave)
    coarse = np.linspace(lo, hi, max(2, int(np.ceil((hi - lo) / _COARSE_STEP)) + 1))
    shift = dispersion * differential_refraction(coarse, airmass)
    distance = np.hypot(offsets[:, 0:1] + shift, offsets[:, 1:2])
    values = enclosed_fraction(distance, seeing_at(coarse, seeing))  # (fiber, coarse)
    pos = np.clip((wave - lo) / (coarse[1] - coarse[0]), 0.0, coarse.size - 1.000001)
    left = pos.astype(int)
    frac = pos - left
    rows = np.arange(values.shape[0])[:, None]
    return values[rows, left] * (1.0 - frac) + values[rows, left + 1] * frac


def expected_aperture(wavelength, seeing, airmass, offset_sigma, dispersion=1.0):
    """The collected fraction averaged over positioning offsets (a 2-D Gaussian of
    ``offset_sigma`` arcsec per axis): what a calibration from many standards refers to.
    ``dispersion`` as for :func:`fiber_apertures`.

    Returns
    -------
    numpy.ndarray, shaped like ``wavelength`` (1-D).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(_QUADRATURE)
    weights = weights / weights.sum()
    ox, oy = np.meshgrid(nodes * offset_sigma, nodes * offset_sigma, indexing="ij")
    offsets = np.stack([ox.ravel(), oy.ravel()], axis=1)
    w = np.outer(weights, weights).ravel()
    return w @ fiber_apertures(wavelength, seeing, airmass, offsets, dispersion)
