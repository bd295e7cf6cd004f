"""Instrument setups of the simulator: pixel grid, fibers and nominal line-spread function."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ..constants import LSF_REFERENCE_WAVELENGTH
from ..exposure.header import FWHM_PIXELS, MIN_RESOLVING_POWER
from ..lsf import LineSpread

__all__ = ["Setup", "DEFAULT_SETUP", "ISOPLANE_SETUP", "LARGE_SETUP"]

@dataclasses.dataclass(frozen=True)
class Setup:
    """An instrument setup: pixel grid, fibers and line-spread function.

    Parameters
    ----------
    name : str
        Label (recorded in the truth and the manifest).
    pixels : int
        Pixels per spectrum, linear in wavelength from ``wave_min`` to ``wave_max``.
    fibers : int
        Fibers per exposure (at least 6: up to 3 standards, sky, one science target).
    wave_min, wave_max : float
        Wavelength range, Angstrom, air.
    fwhm_pixels : tuple of 3 float
        LSF FWHM in pixels at the blue end, the centre and the red end; the quadratic through
        them is written as FWHMPC0..2 (FWHM in Angstrom, x = lambda / 10000 A).
    formats : tuple of (str, str, str), optional
        The wavelength solutions its files are written with in a survey, as
        (format, unit, medium) of :func:`simulate_exposure` (e.g. a WCS only); default: the
        survey's mix of every kind.
    """

    name: str = "default"
    pixels: int = 4096
    fibers: int = 14
    wave_min: float = 3500.0
    wave_max: float = 8500.0
    fwhm_pixels: tuple[float, float, float] = (2.4, 2.05, 2.35)
    formats: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "fwhm_pixels", tuple(float(f) for f in self.fwhm_pixels))
        if self.formats is not None:
            object.__setattr__(self, "formats", tuple(tuple(str(v) for v in f)
                                                      for f in self.formats))
        if int(self.pixels) != self.pixels or self.pixels < 64:
            raise ValueError(f"pixels={self.pixels!r}: need an integer >= 64")
        if int(self.fibers) != self.fibers or self.fibers < 6:
            raise ValueError(f"fibers={self.fibers!r}: need an integer >= 6 (up to 3 "
                             "standards, sky fibers and at least one science target)")
        if not 1000.0 < self.wave_min < self.wave_max < 30000.0:
            raise ValueError(f"wave_min={self.wave_min!r}, wave_max={self.wave_max!r}: need "
                             "1000 < wave_min < wave_max < 30000 Angstrom")
        if len(self.fwhm_pixels) != 3 or min(self.fwhm_pixels) <= 0:
            raise ValueError(f"fwhm_pixels={self.fwhm_pixels!r}: need 3 positive values")
        for name in ("pixels", "fibers"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("wave_min", "wave_max"):
            object.__setattr__(self, name, float(getattr(self, name)))
        # What the reader would refuse is refused here, not in a file written for it.
        fwhm = self.lsf.fwhm(self.wavelength)
        if np.any(fwhm <= 0):
            raise ValueError(f"fwhm_pixels={self.fwhm_pixels!r}: the quadratic through them "
                             "is not positive at every pixel")
        power = float(np.min(self.wavelength / fwhm))
        if power < MIN_RESOLVING_POWER:
            raise ValueError(f"fwhm_pixels={self.fwhm_pixels!r} over {self.pixels} pixels: a "
                             f"resolving power of {power:.3g}, below the {MIN_RESOLVING_POWER:g} "
                             "the reader accepts")
        pixels = fwhm / self.dispersion
        if not (FWHM_PIXELS[0] <= pixels.min() and pixels.max() <= FWHM_PIXELS[1]):
            raise ValueError(f"fwhm_pixels={self.fwhm_pixels!r}: the quadratic through them "
                             f"spans {pixels.min():.3g}-{pixels.max():.3g} pixels, beyond the "
                             f"{FWHM_PIXELS[0]:g}-{FWHM_PIXELS[1]:g} the reader accepts")

    @property
    def dispersion(self):
        """Angstrom per pixel."""
        return (self.wave_max - self.wave_min) / (self.pixels - 1)

    @property
    def wavelength(self):
        """Pixel centres, Angstrom, air (linear)."""
        return np.linspace(self.wave_min, self.wave_max, self.pixels)

    @property
    def lsf(self):
        """The line-spread function, exactly as written in FWHMPC0..2."""
        x = np.array([self.wave_min, 0.5 * (self.wave_min + self.wave_max), self.wave_max])
        x = x / LSF_REFERENCE_WAVELENGTH
        fwhm = np.asarray(self.fwhm_pixels) * self.dispersion
        coeffs = np.linalg.solve(np.polynomial.polynomial.polyvander(x, 2), fwhm)
        return LineSpread(tuple(float(c) for c in coeffs), "FWHMPC")


#: The issue's default: 4096 pixels over 3500-8500 A (1.22 A/pixel), 14 fibers.
DEFAULT_SETUP = Setup()
#: The IsoPlane-320 commissioning setup: 14 fibers, 1340 pixels over 3500-8500 A
#: (3.73 A/pixel), LSF FWHM 2.7 pixels (~10 A); its files carry a linear WCS only (no
#: WAVELA), in air.
ISOPLANE_SETUP = Setup("isoplane", pixels=1340, fwhm_pixels=(2.7, 2.7, 2.7),
                       formats=(("wcs", "Angstroms", "air"),))
#: A later, larger K-SPEC configuration (a stand-in, not a design value): 30 fibers, 2048
#: pixels over 3500-8500 A (2.44 A/pixel).
LARGE_SETUP = Setup("large", pixels=2048, fibers=30, fwhm_pixels=(2.4, 2.2, 2.4))


def _as_setup(value):
    if isinstance(value, Setup):
        return value
    if isinstance(value, Mapping):
        return Setup(**value)
    raise TypeError(f"a setup must be a Setup or a dict of its fields, not {type(value).__name__}")
