"""Interstellar reddening laws (through the maintained ``extinction`` package)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .constants import DEFAULT_RV

__all__ = ["LAWS", "extinction_per_ebv", "redden"]

#: Supported laws: Fitzpatrick (1999, PASP 111, 63) and Cardelli, Clayton & Mathis (1989,
#: ApJ 345, 245), both at R_V = 3.1.
LAWS = ("F99", "CCM89")
# The laws are defined from the far UV to the near infrared; outside, no extinction is
# applied (no photometric band of ours reaches there).
_VALID = (1000.0, 30000.0)


def extinction_per_ebv(wavelength, law="F99", r_v=DEFAULT_RV):
    """A_lambda / E(B-V) in magnitudes at ``wavelength`` (Angstrom).

    Parameters
    ----------
    wavelength : array_like or xarray.DataArray
        Wavelengths, Angstrom.
    law : {'F99', 'CCM89'}
        Reddening law.
    r_v : float
        Ratio of total to selective extinction.

    Returns
    -------
    numpy.ndarray or xarray.DataArray
        Same shape (and coordinates) as ``wavelength``; 0 outside 1000-30000 Angstrom.
    """
    import extinction

    funcs = {"F99": extinction.fitzpatrick99, "CCM89": extinction.ccm89}
    if law not in funcs:
        raise ValueError(f"unknown reddening law {law!r}; valid: {', '.join(LAWS)}")
    wave = np.asarray(wavelength, dtype=np.float64)
    flat = wave.ravel()
    inside = (flat >= _VALID[0]) & (flat <= _VALID[1])
    out = np.zeros(flat.shape)
    if inside.any():
        # A_V = R_V E(B-V): with E(B-V) = 1, a_v = r_v.
        out[inside] = funcs[law](np.ascontiguousarray(flat[inside]), float(r_v), float(r_v))
    out = out.reshape(wave.shape)
    if isinstance(wavelength, xr.DataArray):
        return wavelength.copy(data=out).assign_attrs(units="mag", law=law, r_v=r_v)
    return out


def redden(flux, ebv, law="F99", r_v=DEFAULT_RV, dim="wavelength"):
    """Multiply spectra by 10^(-0.4 E(B-V) A_lambda/E(B-V)).

    Parameters
    ----------
    flux : xarray.DataArray
        Spectra with a ``dim`` coordinate in Angstrom.
    ebv : float or xarray.DataArray
        E(B-V), mag; broadcast against ``flux`` by dimension name.
    """
    curve = extinction_per_ebv(flux[dim], law, r_v)
    out = flux * 10.0 ** (-0.4 * ebv * curve)
    out.attrs = dict(flux.attrs)
    return out
