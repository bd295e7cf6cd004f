"""The simulated atmosphere and sky: extinction, telluric absorption and sky emission.

Extinction is Rayleigh scattering, aerosols and the ozone Chappuis band. The telluric truth is
the package's telluric line list at high resolution, with line strengths that follow the
night's temperature and water widths that change per exposure, seen through each fiber's true
line spread (the pipeline models the bands with two columns and fixed optical depths: a
different form, as the real atmosphere's would be). The sky is a dark-sky continuum with
moonlight and the bright night-sky lines.
"""

from __future__ import annotations

import functools

import numpy as np

from ..constants import FLUX_UNIT_SCALE
from ..photometry import ab_to_flam
from ..telluric import high_resolution_grid, line_optical_depth, sample_transmission, telluric_lines
from .spectra import _gaussian

__all__ = ["atmospheric_extinction", "telluric_transmission"]

#: Rayleigh scattering, mag/airmass: 0.0088 lambda_um^-4.05 (6-9 % below Hansen & Travis
#: 1974's optical depth 0.00857 lambda^-4 (1 + 0.0113 lambda^-2), times 1.086 mag, at sea
#: level: 6 % at 5000-8500 A, 9 % at 3500 A; a site at altitude has less).
_RAYLEIGH = (0.0088, 4.05)


#: Aerosol extinction, mag/airmass at 1 um and its power (a typical clear-site Angstrom
#: exponent); a night's value is this times a factor (``conditions._NIGHT["aerosol"]``).
_AEROSOL = (0.05, 1.3)


#: Ozone Chappuis band: peak cross-section ~4.7e-21 cm^2 near 6000 A (Burrows et al. 1999,
#: JQSRT 61, 509) times a 300 DU column (8.07e18 cm^-2) gives 0.038 optical depth, 0.04 mag;
#: modelled as a Gaussian of this sigma (A).
_OZONE = (0.04, 6000.0, 650.0)
#: Telluric truth: the package's line list (``kspec_fluxcal.telluric.telluric_lines``) at high
#: resolution, Beer's law in the column (airmass for O2, airmass x water factor for H2O), the
#: transmission convolved with each fiber's true line spread. Deliberately richer than the
#: pipeline's two-column model: every line's strength follows the night's temperature through
#: its lower-state energy E'' (drawn once per line, exponential, mean 300 cm^-1: the
#: rotational populations of O2 and H2O at ~270 K), S(T) = S(T0) (T0/T)^q exp(-c2 E''
#: (1/T - 1/T0)), q = 1 for O2 (linear molecule) and 1.5 for H2O, c2 = hc/k; and the water
#: lines' pressure widths change per exposure with the water's mean altitude.
_TELLURIC_T0 = 270.0

_TELLURIC_ELOWER = 300.0
_TELLURIC_SEED = 7594
#: Second radiation constant hc/k, cm K (CODATA 2018, exact).
_C2_CM_K = 1.438776877

#: Dark-sky continuum, V mag/arcsec^2 (a dark site, e.g. Benn & Ellison 1998, La Palma 21.9),
#: through a fiber of 3 arcsec diameter (7.07 arcsec^2); V (Vega) ~ AB to 0.02 mag.
_SKY_V_AB = 21.5 - 2.5 * np.log10(np.pi * 1.5**2)

#: Bright night-sky lines, air wavelengths (Osterbrock et al. 1996, PASP 108, 277), and their
#: equivalent widths against the dark-sky continuum, A. The dark V = 21.5 mag/arcsec^2 sky is
#: ~1.3 R/A, so a 200 R [O I] 5577 line has ~150 A; OH lines of 50-150 R, 40-110 A (rough).
_SKY_LINES = (
    (5577.34, 150.0), (5889.95, 15.0), (5895.92, 12.0), (6300.30, 60.0), (6363.78, 20.0),
    (6863.96, 40.0), (7276.41, 40.0), (7316.28, 60.0), (7340.89, 60.0), (7750.64, 50.0),
    (7794.11, 50.0), (7821.50, 40.0), (7913.71, 60.0), (7993.33, 80.0), (8344.60, 110.0),
    (8399.17, 80.0), (8430.17, 80.0), (8827.10, 120.0), (8885.85, 100.0),
)
#: Sky-subtraction residuals: amplitudes (fraction of the sky line) of the scale error and of
#: the shift (derivative) term, each of random sign and size uniform in this range, per fiber
#: and line.
_SKY_RESIDUAL = (0.02, 0.06)


def atmospheric_extinction(wavelength, aerosol=_AEROSOL[0]):
    """Extinction coefficient k(lambda), mag per airmass: Rayleigh + aerosol + ozone.

    Parameters
    ----------
    wavelength : array_like
        Angstrom.
    aerosol : float
        Aerosol extinction at 1 micron, mag/airmass.
    """
    um = np.asarray(wavelength, dtype=np.float64) / 1e4
    rayleigh = _RAYLEIGH[0] * um ** -_RAYLEIGH[1]
    dust = aerosol * um ** -_AEROSOL[1]
    ozone = _OZONE[0] * np.exp(-0.5 * ((um * 1e4 - _OZONE[1]) / _OZONE[2]) ** 2)
    return rayleigh + dust + ozone


@functools.cache
def _lower_state_energies():
    """E'' of every line of the telluric line list, cm^-1 (drawn once, seeded)."""
    lines = telluric_lines()
    return np.random.default_rng(_TELLURIC_SEED).exponential(_TELLURIC_ELOWER,
                                                             lines["wavelength"].size)


@functools.lru_cache(maxsize=16)
def _telluric_hr(airmass, pwv, temperature, water_width):
    """The high-resolution truth transmission (grid, transmission) for the conditions."""
    lines = telluric_lines()
    power = np.where(lines["water"], 1.5, 1.0)
    factor = ((_TELLURIC_T0 / temperature) ** power
              * np.exp(-_C2_CM_K * _lower_state_energies() * (1.0 / temperature
                                                              - 1.0 / _TELLURIC_T0)))
    hwhm = lines["hwhm"] * np.where(lines["water"], water_width, 1.0)
    wave = high_resolution_grid()
    tau = line_optical_depth(wave, lines["wavelength"], lines["strength"] * factor, hwhm,
                             lines["water"])
    return wave, np.exp(-airmass * tau[0] - airmass * pwv * tau[1])


def telluric_transmission(wavelength, lsf, airmass=1.0, pwv=1.0, temperature=_TELLURIC_T0,
                          water_width=1.0):
    """Telluric transmission seen through a line-spread function (the simulator's truth).

    The line list at high resolution with temperature-dependent strengths and
    altitude-dependent water widths (see the constants above), Beer's law in the columns,
    convolved with the line spread and sampled at the pixels.

    Parameters
    ----------
    wavelength : array_like
        Pixel centres, Angstrom (air), any shape.
    lsf : LineSpread or line spread with a ``sigma(wavelength)`` method
        The true line-spread function (with a ``profile``, its ``parts(wavelength)``: a sum
        of Gaussians, as weight, offset and sigma).
    airmass, pwv : float
        Airmass and precipitable-water factor.
    temperature : float
        The atmosphere's temperature, K.
    water_width : float
        Water lines' pressure-width factor.

    Returns
    -------
    numpy.ndarray
        Transmission, shaped like ``wavelength``; 1 away from the bands.
    """
    wave_hr, hr = _telluric_hr(float(airmass), float(pwv), float(temperature),
                               float(water_width))
    wave = np.asarray(wavelength, dtype=np.float64)
    if getattr(lsf, "profile", None) is None:
        return sample_transmission(wave_hr, hr, wave, lsf.sigma(wave))
    # A profile of several Gaussians (the simulator's true line spread): one sampling each.
    return sum(weight * sample_transmission(wave_hr, hr, wave - offset, sigma)
               for weight, offset, sigma in lsf.parts(wave))


def _sky(wavelength, lsf, moon):
    """Sky flux density (flux units) in one fiber: continuum and one profile per line."""
    dark = ab_to_flam(_SKY_V_AB, 5500.0) / FLUX_UNIT_SCALE
    shape = (wavelength / 5500.0) ** 0.3
    continuum = dark * shape * (1.0 + moon * (wavelength / 5500.0) ** -2)
    centres = np.array([c for c, _ in _SKY_LINES])
    ew = np.array([e for _, e in _SKY_LINES]) * dark * (centres / 5500.0) ** 0.3
    sigma = lsf.sigma(centres)
    if getattr(lsf, "profile", None) is None:
        profiles = ew[:, None] * _gaussian(wavelength[None, :], centres[:, None],
                                           sigma[:, None])
    else:  # a profile of several Gaussians: each line's light moved by their offsets
        profiles = sum(weight * ew[:, None] * _gaussian(wavelength[None, :],
                                                        (centres + offset)[:, None],
                                                        part_sigma[:, None])
                       for weight, offset, part_sigma in lsf.parts(centres))
    offsets = (wavelength[None, :] - centres[:, None]) / sigma[:, None]
    return continuum, profiles, offsets
