"""The instrument line-spread function, described without callables so it can be stored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .constants import FWHM_PER_SIGMA, LSF_REFERENCE_WAVELENGTH

__all__ = ["LineSpread", "exposure_lsf"]


@dataclass(frozen=True)
class LineSpread:
    """Gaussian line-spread function with FWHM(lambda) = sum_k c_k (lambda / 10000 A)^k.

    A constant FWHM (header SPECFWHM) is the polynomial of degree 0; FWHMPC0..n give the
    wavelength-dependent form (formats contract, section 1).

    Parameters
    ----------
    coeffs : tuple of float
        Polynomial coefficients c_0, c_1, ..., FWHM in Angstrom.
    source : str
        Where the description came from (e.g. 'FWHMPC', 'SPECFWHM', 'config').
    """

    coeffs: tuple[float, ...]
    source: str = "SPECFWHM"

    def __post_init__(self):
        object.__setattr__(self, "coeffs", tuple(float(c) for c in self.coeffs))
        if not self.coeffs:
            raise ValueError("a LineSpread needs at least one coefficient")

    @classmethod
    def constant(cls, fwhm, source="SPECFWHM"):
        """A wavelength-independent FWHM, Angstrom."""
        return cls((float(fwhm),), source)

    @classmethod
    def from_attrs(cls, attrs):
        """Rebuild from the attrs written by :meth:`to_attrs`."""
        return cls(tuple(np.atleast_1d(attrs["lsf_fwhm_coeffs"])), str(attrs.get("lsf_source", "")))

    def to_attrs(self):
        """Plain attributes describing this LSF (for Dataset.attrs)."""
        return {
            "lsf_fwhm_coeffs": list(self.coeffs),
            "lsf_source": self.source,
            "lsf_definition": "FWHM(lambda) = sum_k lsf_fwhm_coeffs[k] * (lambda / 10000 A)**k, A",
        }

    def scaled(self, factor):
        """This LSF with every FWHM multiplied by ``factor`` (e.g. a fitted width correction)."""
        factor = float(factor)
        if factor == 1.0:
            return self
        return LineSpread(tuple(c * factor for c in self.coeffs), f"{self.source} x {factor:.4f}")

    @property
    def is_constant(self):
        """True when the FWHM does not depend on wavelength."""
        return all(c == 0.0 for c in self.coeffs[1:])

    def fwhm(self, wavelength):
        """FWHM in Angstrom at ``wavelength`` (Angstrom)."""
        x = np.asarray(wavelength, dtype=np.float64) / LSF_REFERENCE_WAVELENGTH
        return np.polynomial.polynomial.polyval(x, self.coeffs)

    def sigma(self, wavelength):
        """Gaussian sigma in Angstrom at ``wavelength``."""
        return self.fwhm(wavelength) / FWHM_PER_SIGMA

    def key(self):
        """A short stable hash of the description (setups are keyed by it)."""
        text = ",".join(f"{c:.6g}" for c in self.coeffs)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def exposure_lsf(exposure, config):
    """The exposure's line-spread function (from its attrs), or the configured FWHM override
    (``config.instrument.fwhm`` > 0)."""
    if config.instrument.fwhm > 0:
        return LineSpread.constant(config.instrument.fwhm, "config [instrument] fwhm")
    return LineSpread.from_attrs(exposure.attrs)
