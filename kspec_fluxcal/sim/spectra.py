"""Spectra of the simulator's targets: Doppler shifts, reddening, magnitudes, and the
galaxies and quasars of the science fibers.

Stars come from a star source (:mod:`kspec_fluxcal.sim.star_sources`); a galaxy is a cool,
metal-rich star of the field's source standing in for an old population's continuum,
velocity broadened and redshifted, plus emission lines; a quasar is a power law with broad
lines and the mean Lyman-alpha forest.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.interpolate import CubicSpline

from ..constants import BANDS, FWHM_PER_SIGMA, LSF_REFERENCE_WAVELENGTH, SPEED_OF_LIGHT_KMS
from ..lsf import LineSpread
from ..photometry import synthetic_mag
from ..reddening import extinction_per_ebv
from ..templates import convolution_matrix

__all__ = ["doppler_shift"]

#: Galaxies and quasars: AB mag of the mean flux density over the exposure's range, at its
#: central wavelength; redshifts, velocity dispersions and line widths.
_GALAXY_MAG = (17.0, 19.5)
_GALAXY_Z = (0.02, 0.25)
_GALAXY_SIGMA_KMS = (120.0, 250.0)
_GAS_SIGMA_KMS = 60.0
_QSO_MAG = (17.5, 19.5)
_QSO_Z = (0.3, 2.2)
_QSO_FWHM_KMS = (3000.0, 6000.0)
#: Quasar continuum f_lambda ~ lambda^(-2 - alpha_nu) with alpha_nu = -0.44 and broad-line
#: fluxes relative to Lyman-alpha (= 100), roughly after the SDSS composite of Vanden Berk
#: et al. 2001, AJ 122, 549 (Lyman-alpha rest equivalent width ~90 A). Rest wavelengths:
#: vacuum in the UV, air in the optical.
_QSO_SLOPE = -1.56
_QSO_LYA_EW = 90.0
_QSO_LINES = ((1215.67, 100.0), (1549.06, 25.0), (1908.73, 16.0), (2798.75, 14.0),
              (4340.47, 3.0), (4861.33, 9.0), (6562.80, 30.0))
#: Mean Lyman-alpha forest transmission exp(-0.0018 (1 + z)^3.92) (Faucher-Giguere et al.
#: 2008, ApJ 681, 831).
_LYA_FOREST = (0.0018, 3.92)
#: Galaxy emission lines, air rest wavelengths, and ratios: H-beta = H-alpha / 2.86 (case B,
#: Osterbrock & Ferland 2006), [O III] 4959 = 5007 / 2.98 and [N II] 6548 = 6583 / 3.05
#: (Storey & Zeippen 2000, MNRAS 312, 813).
_HALPHA_EW = (5.0, 40.0)


def doppler_shift(wavelength, flux, velocity):
    """Doppler shift spectra: ``f(lambda) = f_rest(lambda / (1 + v/c))``.

    A cubic spline in ln(lambda) on the native grid; outside the grid the edge values are
    used. The 1/(1+z) flux factor is not applied (a photometric scale absorbs it).

    Parameters
    ----------
    wavelength : numpy.ndarray
        Increasing wavelengths, Angstrom.
    flux : numpy.ndarray
        Spectra on ``wavelength``, shape (nwave,) or (nspec, nwave).
    velocity : float or array_like
        Radial velocities, km/s (one per spectrum).

    Returns
    -------
    numpy.ndarray
        Shifted spectra, shaped like ``flux``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    rows = np.atleast_2d(flux)
    v = np.broadcast_to(np.asarray(velocity, dtype=np.float64), (rows.shape[0],))
    ln_w = np.log(np.asarray(wavelength, dtype=np.float64))
    out = np.empty_like(rows)
    for k in range(rows.shape[0]):  # one spline per spectrum; a handful per exposure
        x = np.clip(ln_w - np.log1p(v[k] / SPEED_OF_LIGHT_KMS), ln_w[0], ln_w[-1])
        out[k] = CubicSpline(ln_w, rows[k])(x)
    return out.reshape(flux.shape)


def _gaussian(x, centre, sigma):
    return np.exp(-0.5 * ((x - centre) / sigma) ** 2) / (np.sqrt(2.0 * np.pi) * sigma)


def _reddening(wavelength, ebv):
    curve = extinction_per_ebv(wavelength, "F99")
    return 10.0 ** (-0.4 * np.asarray(ebv, dtype=np.float64)[..., None] * curve)


def _magnitudes(wavelength, flux):
    """AB magnitudes (nspec, nband) in :data:`BANDS` of f_lambda spectra (any constant unit)."""
    da = xr.DataArray(np.atleast_2d(flux), dims=("spec", "wavelength"),
                      coords={"wavelength": wavelength})
    return synthetic_mag(da, list(BANDS)).transpose("spec", "band").values


def _galaxy(rng, stars, wave, window, centre_flux, resolving_power):
    """An old-population galaxy on wave[window], mean flux density ``centre_flux``."""
    (t0, t1), (f0, f1) = (stars.parameter_range(p, 0.0) for p in ("teff", "feh"))
    ranges = {"teff": (t0, t0 + 0.35 * (t1 - t0)), "feh": (f1 - 0.5 * (f1 - f0), f1)}
    p = stars.sample(rng, 1, ranges)
    rest = stars.spectrum(p["teff"], p["logg"], p["feh"], p["alpha"])[0]
    w = wave[window]
    z_max = max(min(_GALAXY_Z[1], w[0] / wave[0] - 1.01), 0.0)  # rest frame inside the grid
    z = rng.uniform(min(_GALAXY_Z[0], z_max), z_max)
    continuum = doppler_shift(wave, rest, SPEED_OF_LIGHT_KMS * z)[window]
    sigma = rng.uniform(*_GALAXY_SIGMA_KMS)
    broaden = LineSpread((0.0, FWHM_PER_SIGMA * sigma / SPEED_OF_LIGHT_KMS
                          * LSF_REFERENCE_WAVELENGTH), "velocity dispersion")
    continuum = convolution_matrix(w, w, broaden)[0] @ continuum
    continuum *= centre_flux / continuum.mean()
    halpha_ew = rng.uniform(*_HALPHA_EW) * (1.0 + z)
    halpha = halpha_ew * np.interp(6562.80 * (1.0 + z), w, continuum)
    hbeta = halpha / 2.86
    oiii = hbeta * rng.uniform(0.3, 3.0)
    nii = halpha * rng.uniform(0.2, 0.5)
    lines = ((3726.03, hbeta * 0.8), (3728.82, hbeta * 1.0), (4861.33, hbeta),
             (4958.91, oiii / 2.98), (5006.84, oiii), (6548.05, nii / 3.05),
             (6562.80, halpha), (6583.45, nii), (6716.44, halpha * 0.15),
             (6730.82, halpha * 0.11))
    # Lines carry the grid's resolution too, as the continuum does, so the LSF convolution
    # (which removes it in quadrature) leaves their intrinsic width.
    sigma_v = np.hypot(_GAS_SIGMA_KMS, SPEED_OF_LIGHT_KMS / (resolving_power * FWHM_PER_SIGMA))
    spec = continuum.copy()
    for rest_wave, flux in lines:
        centre = rest_wave * (1.0 + z)
        spec += flux * _gaussian(w, centre, centre * sigma_v / SPEED_OF_LIGHT_KMS)
    return spec, z


def _quasar(rng, wave, window, centre_flux, resolving_power):
    """A quasar on wave[window], mean flux density ``centre_flux``."""
    w = wave[window]
    z = rng.uniform(*_QSO_Z)
    rest = w / (1.0 + z)
    continuum = (rest / 1450.0) ** _QSO_SLOPE
    fwhm = rng.uniform(*_QSO_FWHM_KMS)
    sigma_v = np.hypot(fwhm / FWHM_PER_SIGMA,
                       SPEED_OF_LIGHT_KMS / (resolving_power * FWHM_PER_SIGMA))
    lya_flux = _QSO_LYA_EW * (1215.67 / 1450.0) ** _QSO_SLOPE
    spec = continuum.copy()
    for line, relative in _QSO_LINES:
        spec += (lya_flux * relative / 100.0
                 * _gaussian(rest, line, line * sigma_v / SPEED_OF_LIGHT_KMS))
    z_abs = w / 1215.67 - 1.0
    forest = np.where(z_abs < z, np.exp(-_LYA_FOREST[0] * (1.0 + z_abs) ** _LYA_FOREST[1]), 1.0)
    spec *= forest
    return spec * centre_flux / spec.mean(), z
