"""The primary header of a RED file (formats contract section 1): the exposure's keywords,
checked for plausibility, and its line-spread description."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..constants import SPEED_OF_LIGHT_KMS
from ..errors import ExposureError, FluxCalWarning
from ..fits_file import header_value
from ..lsf import LineSpread

__all__ = ["exposure_keywords", "exposure_id", "check_width", "line_spread", "check_line_spread",
           "data_unit", "is_flux_unit", "COUNT_UNITS", "EXPTIME_RANGE", "AIRMASS_RANGE",
           "SEEING_RANGE", "MJD_RANGE", "MIN_PIXELS", "MIN_RESOLVING_POWER", "FWHM_PIXELS"]

#: Plausible exposure times (s): a K-SPEC exposure is seconds to hours; 1e30 is a bad header.
EXPTIME_RANGE = (0.0, 1.0e5)
#: Plausible airmasses: 1 at the zenith; > 10 is within a degree or two of the horizon.
AIRMASS_RANGE = (1.0, 10.0)
#: Plausible seeing (optional SEEING, FWHM in arcsec at the guider): beyond 20 arcsec no
#: fiber spectrograph observes.
SEEING_RANGE = (0.0, 20.0)
#: Plausible dates of observation (MJD): 1968-2132. Outside, a header's date is a typo or a
#: placeholder (MJD-OBS = 1.0), which would put the exposure on the wrong night of the survey
#: model and the archive.
MJD_RANGE = (40000.0, 100000.0)
#: Lowest plausible resolving power (wavelength / line-spread FWHM): a broad-band filter has
#: ~5; below 10 no spectrum is left. Such a FWHM is in another unit (mA, m/s), and its wings
#: asked the grid for negative wavelengths. (The simulator's smallest spectra, 64 pixels
#: over 3500-8500 A at 2-2.5 pixels per FWHM, have ~18 at the blue end.)
MIN_RESOLVING_POWER = 10.0
#: Plausible sampling of the line spread: FWHM in pixels of the exposure's own wavelength
#: solution. Spectrographs sample it with ~1.5-6 pixels (2 is Nyquist's: DESI ~2.2, BOSS
#: ~2.2, AAOmega ~3.5, the IsoPlane 2.7; a CCD binned 4x along the dispersion ~0.6) and
#: pipelines that resample keep it near that. Beyond 20 the FWHM is in another unit than
#: Angstrom (150 km/s read as 150 A is 40 pixels of the IsoPlane's 3.7 A, a resolving power
#: of 33 that passes :data:`MIN_RESOLVING_POWER`); below a quarter of a pixel too (0.25 nm
#: read as 0.25 A on K-SPEC's 1.22 A pixels is 0.2 of them). Closer, a wrong unit is left to
#: the width fit of the standards, which warns when their lines are beyond its reach.
FWHM_PIXELS = (0.25, 20.0)
#: Fewest pixels of a spectrum: fewer is a cut or transposed image, not a K-SPEC spectrum.
MIN_PIXELS = 16
#: Primary BUNIT values read as the contract's 'counts' (any case; blank as absent): its own
#: spelling, the singular and ADU, the unit a CCD counts in (README).
COUNT_UNITS = ("counts", "count", "adu", "")
# Words that make a BUNIT a flux density (astropy does not parse every spelling in use:
# 'erg/s/cm^2/A' reads as per Ampere).
_FLUX_WORDS = ("erg", "jy", "jansky", "watt", "w/m", "w m-2", "w/(m")


def _in_range(value, key, bounds, path, unit="", open_low=False):
    lo, hi = bounds
    inside = (lo < value if open_low else lo <= value) and value <= hi
    if not inside:
        shown = f"{'(' if open_low else '['}{lo:g}, {hi:g}]"
        raise ExposureError(path, f"primary header {key}", f"value {value!r}{unit} is outside "
                            f"the plausible range {shown}{unit}")
    return value


#: Suffixes of a compressed file, removed before its own extension.
_COMPRESSED = (".gz", ".fz", ".bz2")


def exposure_id(header, path):
    """The exposure's identifier (what names its products' QC files and archive rows):
    EXPID, or without one the file's name without its extension (and a compression suffix:
    ``KS20261101.0001.fits.gz`` is ``KS20261101.0001``)."""
    if header.get("EXPID", ""):
        return str(header["EXPID"])
    name = Path(path).name
    if name.lower().endswith(_COMPRESSED):
        name = name[:name.rindex(".")]
    return os.path.splitext(name)[0] or name


def exposure_keywords(header, path):
    """EXPTIME, MJD-OBS and AIRMASS (None when absent), checked for plausibility."""
    exptime = header_value(header, ("EXPTIME", "EXPOSED"), path, True)
    key = next(k for k in ("EXPTIME", "EXPOSED") if header.get(k) not in (None, ""))
    _in_range(exptime, key, EXPTIME_RANGE, path, " s", open_low=True)
    airmass = header_value(header, ("AIRMASS",), path, False)
    if airmass is not None:
        _in_range(airmass, "AIRMASS", AIRMASS_RANGE, path)
    seeing = header_value(header, ("SEEING",), path, False)
    if seeing is not None and not SEEING_RANGE[0] < seeing <= SEEING_RANGE[1]:
        # Outside the contract and used only by the survey model: 0 or -1 is how many
        # systems write "not measured", no reason to refuse the exposure.
        warnings.warn(f"{path}: primary header SEEING: value {seeing!r} arcsec outside "
                      f"({SEEING_RANGE[0]:g}, {SEEING_RANGE[1]:g}] arcsec taken as not "
                      "measured", FluxCalWarning, stacklevel=3)
        seeing = None
    mjd = header_value(header, ("MJD-OBS", "UTMJD"), path, True)
    key = next(k for k in ("MJD-OBS", "UTMJD") if header.get(k) not in (None, ""))
    _in_range(mjd, key, MJD_RANGE, path, " d")
    return {"exptime": exptime, "mjd": mjd, "airmass": airmass, "seeing": seeing}


def check_width(path, nspec):
    """Refuse an image narrower than :data:`MIN_PIXELS` pixels."""
    if nspec < MIN_PIXELS:
        raise ExposureError(path, "HDU PRIMARY", f"image is {nspec} pixel{'s' * (nspec != 1)} "
                            f"wide; a spectrum needs at least {MIN_PIXELS}")


def line_spread(header, path):
    """The line-spread FWHM of the primary header: the polynomial FWHMPC0..n, else the
    constant SPECFWHM, as a :class:`~kspec_fluxcal.lsf.LineSpread`."""
    coeffs = []
    while f"FWHMPC{len(coeffs)}" in header:
        key = f"FWHMPC{len(coeffs)}"
        coeffs.append(header_value(header, (key,), path, True))
    # A coefficient beyond a gap would be silently ignored: a truncated polynomial.
    orders = sorted(int(k[6:]) for k in header if k.startswith("FWHMPC") and k[6:].isdigit())
    if orders and orders[-1] >= len(coeffs):
        raise ExposureError(path, f"primary header FWHMPC{orders[-1]}",
                            f"present but FWHMPC{len(coeffs)} is missing (the FWHM polynomial "
                            "needs every coefficient FWHMPC0..FWHMPCn)")
    if coeffs:
        return LineSpread(tuple(coeffs), "FWHMPC")
    if "SPECFWHM" in header:
        fwhm = header_value(header, ("SPECFWHM",), path, True)
        return LineSpread.constant(fwhm, "SPECFWHM")
    raise ExposureError(path, "primary header",
                        "no line-spread description: neither SPECFWHM nor FWHMPC0 is present")


def check_line_spread(lsf, wave, path):
    """Refuse a line-spread FWHM that is not positive at every pixel of ``wave``, wider
    than :data:`MIN_RESOLVING_POWER` allows, or sampled with a number of pixels outside
    :data:`FWHM_PIXELS` (a FWHM in km/s, nm or pixels: the contract's is in Angstrom)."""
    where = f"primary header {lsf.source}"
    fwhm = lsf.fwhm(wave)  # every pixel: a polynomial can dip below zero between the ends
    if np.any(~np.isfinite(fwhm)) or np.any(fwhm <= 0):
        raise ExposureError(path, where, f"line-spread FWHM is not positive over "
                            f"{wave[0]:.0f}-{wave[-1]:.0f} A")
    k = int(np.argmax(fwhm / wave))
    if wave[k] / fwhm[k] < MIN_RESOLVING_POWER:
        raise ExposureError(path, where,
                            f"line-spread FWHM {fwhm[k]:.4g} A at {wave[k]:.0f} A is a "
                            f"resolving power of {wave[k] / fwhm[k]:.3g}, below the plausible "
                            f"{MIN_RESOLVING_POWER:g} (a FWHM in another unit than Angstrom?)")
    step = np.abs(np.gradient(wave)) if wave.size > 1 else np.ones(1)
    pixels = fwhm / step
    k = int(np.argmax(pixels) if pixels.max() > FWHM_PIXELS[1] else np.argmin(pixels))
    if not FWHM_PIXELS[0] <= pixels[k] <= FWHM_PIXELS[1]:
        raise ExposureError(path, where, f"line-spread FWHM {fwhm[k]:.4g} A at {wave[k]:.0f} A "
                            f"is {pixels[k]:.3g} pixels of the wavelength solution "
                            f"({step[k]:.3g} A/pixel), outside the plausible "
                            f"{FWHM_PIXELS[0]:g}-{FWHM_PIXELS[1]:g}: the contract's unit is "
                            f"Angstrom{_other_unit(fwhm[k], wave[k], step[k])}")


def _other_unit(fwhm, wave, step):
    """', in <unit>?' for the units in which the header's ``fwhm`` would be sampled
    plausibly at ``wave`` (A) with ``step`` A/pixel ('' for none)."""
    readings = {"km/s": fwhm * wave / SPEED_OF_LIGHT_KMS, "nm": 10.0 * fwhm,
                "pixels": fwhm * step}
    fits_ = [f"{unit} ({value / step:.2g} pixels)" for unit, value in readings.items()
             if FWHM_PIXELS[0] <= value / step <= FWHM_PIXELS[1]]
    return f"; is it in {' or '.join(fits_)}?" if fits_ else ""


def is_flux_unit(text):
    """Whether a BUNIT is a flux density (a calibrated product's, contract section 4)."""
    text = str(text).strip().lower()
    return bool(text) and any(word in text for word in _FLUX_WORDS)


def data_unit(header, path):
    """The primary image's unit: BUNIT, 'counts' when absent.

    The contract's RED file is in counts; a calibrated product (section 4), which opens the
    same way, is in a flux density. Any other unit (counts/s, electrons) is an error: the
    calibration would take it for counts, and the archive's throughput, 1 / (factor x
    EXPTIME), would be off by the rate or the gain.
    """
    bunit = str(header.get("BUNIT", "counts"))
    if bunit.strip().lower() in COUNT_UNITS or is_flux_unit(bunit):
        return bunit
    raise ExposureError(path, "primary header BUNIT",
                        f"{bunit.strip()!r} is neither 'counts' (a RED file) nor a flux density "
                        "(a calibrated product)")
