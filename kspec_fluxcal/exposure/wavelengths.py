"""The wavelength solution of a RED file (formats contract section 1): from its WAVELA
extension or the primary header's linear WCS, in Angstrom, its medium (air or vacuum), checked
per fiber, and the reference grid the calibration vector is given on."""

from __future__ import annotations

import numpy as np

from ..errors import ExposureError
from ..fits_file import find_hdu, hdu_data, header_value

__all__ = ["raw_wavelength", "fiber_wavelengths", "check_wavelength", "median_of_rows",
           "unsolved_pixels", "bridged_wavelengths"]

# The contract's spellings (WAVELA BUNIT 'Angstrom' or 'nm'; CUNIT1 also 'Angstroms'), in
# any case: 'A' is the FITS symbol of the Ampere, not a wavelength unit.
_ANGSTROM_UNITS = {"angstrom", "angstroms"}
_NM_UNITS = {"nm"}
# A calibrated spectrum covering less than this, or reaching beyond, is not in Angstrom.
_PLAUSIBLE_RANGE = (1000.0, 30000.0)


def _unit_factor(unit, path, where):
    u = str(unit).strip().lower()
    if u in _ANGSTROM_UNITS or u == "":
        return 1.0
    if u in _NM_UNITS:
        return 10.0
    raise ExposureError(path, where, f"unexpected wavelength unit {unit!r} "
                        "(expected 'Angstrom' or 'nm')")


_MEDIA = {"air": "air", "vac": "vac"}


def _medium(primary, wavela, path):
    """'air' or 'vac' from AIRORVAC of the WAVELA and primary headers (absent: air).

    Both headers are checked: a bad value in either, or two that disagree, is an error, not
    a silent choice of one frame.
    """
    found = {}
    for hdr, where in ((wavela, "WAVELA header"), (primary, "primary header")):
        if hdr is None or "AIRORVAC" not in hdr:
            continue
        value = str(hdr["AIRORVAC"]).strip().lower()
        if value not in _MEDIA:
            raise ExposureError(path, f"{where} AIRORVAC",
                                f"value {value!r} is neither 'air' nor 'vac' (an absent "
                                "AIRORVAC means air)")
        found[where] = value
    media = {_MEDIA[v] for v in found.values()}
    if len(media) > 1:
        raise ExposureError(path, "primary header AIRORVAC",
                            f"{found['primary header']!r} contradicts the WAVELA header's "
                            f"AIRORVAC {found['WAVELA header']!r}")
    return media.pop() if media else "air"


def _wcs_wavelength(header, nspec, path):
    if "CRVAL1" not in header:
        raise ExposureError(path, "HDU WAVELA",
                            "missing, and the primary header has no linear wavelength solution "
                            "(CRVAL1, CDELT1 or CD1_1, CRPIX1)")
    for key in ("CTYPE1", "CRPIX1", "CUNIT1"):
        # No defaults: FITS's (CRPIX1 = 0, unit m) are not kspecdr's (1, Angstrom).
        if key not in header:
            raise ExposureError(path, f"primary header {key}", "missing (a linear wavelength "
                                "solution gives CRVAL1, CDELT1 or CD1_1, CRPIX1, CUNIT1 and "
                                "CTYPE1 = 'Wavelength')")
    if not str(header["CUNIT1"]).strip():
        # Blank is no unit, not Angstrom (a WAVELA's BUNIT may be absent: Angstrom).
        raise ExposureError(path, "primary header CUNIT1", "blank (a linear wavelength "
                            "solution's unit is 'Angstroms', 'Angstrom' or 'nm')")
    ctype = str(header["CTYPE1"]).strip()
    if ctype.upper() != "WAVELENGTH":
        # FITS's 'WAVE' (vacuum) and 'AWAV' (air) would say the medium, which AIRORVAC says.
        raise ExposureError(path, "primary header CTYPE1",
                            f"{ctype!r} is not a linear wavelength axis ('Wavelength')")
    delta_key = "CDELT1" if "CDELT1" in header else "CD1_1"
    if delta_key not in header:
        raise ExposureError(path, "primary header", "CRVAL1 present but neither CDELT1 nor CD1_1")
    crval = header_value(header, ("CRVAL1",), path, True)
    delta = header_value(header, (delta_key,), path, True)
    if "CDELT1" in header and "CD1_1" in header:
        # The FITS WCS standard takes CD1_1 (astropy does), the contract names CDELT1 first:
        # a file giving two dispersions has no one solution to trust.
        other = header_value(header, ("CD1_1",), path, True)
        if not np.isclose(other, delta, rtol=1e-9, atol=0.0):
            raise ExposureError(path, "primary header", f"CDELT1 = {delta:g} and CD1_1 = "
                                f"{other:g} disagree (two wavelength dispersions)")
    crpix = header_value(header, ("CRPIX1",), path, True)
    factor = _unit_factor(header["CUNIT1"], path, "primary header CUNIT1")
    pix = np.arange(nspec, dtype=np.float64) + 1.0
    return factor * (crval + (pix - crpix) * delta)


def check_wavelength(wave, path, where):
    """Refuse a 1-D solution that is not finite everywhere, not increasing, or outside
    the plausible range in Angstrom (a hint when it looks like nm)."""
    finite = np.isfinite(wave)
    if not finite.any():
        raise ExposureError(path, where, "no finite wavelength")
    if not finite.all():
        # One solution for every fiber: a pixel without a wavelength cannot be placed.
        raise ExposureError(path, where, f"wavelength of pixel {int(np.flatnonzero(~finite)[0])} "
                            "is not finite (NaN or inf)")
    w = wave
    if np.any(np.diff(w) <= 0):
        raise ExposureError(path, where, "wavelengths do not increase along the pixel axis")
    lo, hi = _PLAUSIBLE_RANGE
    if w[0] < lo or w[-1] > hi:
        hint = " (values look like nm labelled as Angstrom)" if w[-1] < lo else ""
        raise ExposureError(path, where, f"wavelengths {w[0]:.6g}-{w[-1]:.6g} Angstrom are "
                            f"outside the plausible {lo:.0f}-{hi:.0f} Angstrom{hint}")


def raw_wavelength(hdul, path, nfib, nspec):
    """The wavelength solution as written: (wave in Angstrom, source, medium, raw).

    From WAVELA, shape (nspec,), (1, nspec) or (nfib, nspec), else from the primary header's
    linear WCS; not yet checked or converted to air. ``raw`` is None for a WCS, else
    (the WAVELA data as in the file, its header as text), so that products keep them.
    """
    header = hdul[0].header
    wave_hdu = find_hdu(hdul, path, ("WAVELA",), required=False)
    medium = _medium(header, None if wave_hdu is None else wave_hdu.header, path)
    if wave_hdu is None:
        return _wcs_wavelength(header, nspec, path), "primary header WCS", medium, None
    if not wave_hdu.is_image:
        raise ExposureError(path, "HDU WAVELA", f"is a table ({type(wave_hdu).__name__}); "
                            "expected an image of wavelengths")
    data = np.asarray(hdu_data(wave_hdu, path, "WAVELA"))
    wave = data.astype(np.float64)
    if wave.shape not in ((nspec,), (1, nspec), (nfib, nspec)):
        raise ExposureError(path, "HDU WAVELA", f"shape {wave.shape} matches neither "
                            f"({nspec},) nor the primary's {(nfib, nspec)}")
    # In place: the converted copy is this function's own (a per-fiber solution's 0.46 MB)
    wave *= _unit_factor(wave_hdu.header.get("BUNIT", "Angstrom"), path, "HDU WAVELA BUNIT")
    return wave, "WAVELA", medium, (data.copy(), wave_hdu.header.tostring(sep="\n"))


def fiber_wavelengths(wave, nfib, path, source="WAVELA"):
    """Each fiber's own pixel wavelengths (nfib, nspec) and the reference grid (nspec,).

    A 1-D solution (or a WCS) is every fiber's. Per-fiber rows are kept as they are (no
    pixel is resampled; per-fiber rows with every pixel solved are returned as ``wave``
    itself, not copied); a pixel without a wavelength (NaN) is a pixel without data, a row
    without any a fiber without a solution. The reference grid, on which the calibration
    vector is given, is the median of the rows; it needs a wavelength at every pixel.
    """
    where = "HDU WAVELA" if source == "WAVELA" else source
    if wave.ndim == 1 or wave.shape[0] == 1:
        wave = wave.reshape(-1)
        check_wavelength(wave, path, where)
        return np.broadcast_to(wave, (nfib, wave.size)).copy(), wave
    finite = np.isfinite(wave)
    # Every pixel solved (the usual case): the same checks without the masked copies.
    solved = bool(finite.all())
    if np.any(~(wave > 0) if solved else finite & ~(wave > 0)):
        row, col = (int(i[0]) for i in np.nonzero(finite & ~(wave > 0)))
        raise ExposureError(path, f"{where} row {row}",
                            f"wavelength {wave[row, col]!r} of pixel {col} is not positive")
    rows = np.flatnonzero(finite.any(axis=1))
    if not rows.size:
        raise ExposureError(path, where, "no fiber has a finite wavelength solution")
    # Each row's finite pixels must increase and lie in the plausible range: all rows at
    # once, the first offending row checked alone for its message.
    lo, hi = _PLAUSIBLE_RANGE
    filled = wave if solved else np.where(finite, wave, np.nan)
    # Neighbours compared, not their difference's sign (b - a <= 0 is b <= a for values
    # without inf, NaN failing both): no 0.46 MB of steps for 14 x 4096
    low = wave.min(axis=1) if solved else np.nanmin(np.where(finite, wave, np.inf), axis=1)
    high = wave.max(axis=1) if solved else np.nanmax(np.where(finite, wave, -np.inf), axis=1)
    bad = np.any(filled[:, 1:] <= filled[:, :-1], axis=1) | (low < lo) | (high > hi)
    bad &= finite.any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        check_wavelength(wave[row][finite[row]], path, f"{where} row {row}")
    # all-NaN columns are reported just below
    reference = median_of_rows(wave if rows.size == len(wave) else wave[rows])
    check_wavelength(reference, path, f"{where} (median of the rows)")
    return filled, reference


def median_of_rows(wave):
    """The median of the rows of ``wave`` pixel by pixel, NaN ignored (NaN where a column
    has no value): :func:`kspec_fluxcal.continuum.nanmedian` (np.nanmedian's values, whose
    masked arrays for so few rows cost 3 times as much).

    Per-fiber solutions are offset from one another and keep their order at every pixel
    (all those of the lake): rows that do, positive, are ordered once as wholes, and the
    median is taken from the middle ones, the same values without nanmedian's sort of every
    column (14 x 4096: ~0.7 -> ~0.1 ms)."""
    rows = wave[np.argsort(wave[:, 0])]
    # NaN fails both comparisons; positive: no signed zeros, whose order a sort leaves open
    if (rows[0] > 0).all() and (rows[1:] >= rows[:-1]).all():
        n = len(rows)
        return 0.5 * (rows[(n - 1) // 2] + rows[n // 2])
    from ..continuum import nanmedian  # scipy.sparse, not needed to read a file otherwise

    return nanmedian(wave, axis=0)[0]


def unsolved_pixels(fiber_wave, fiber_type):
    """Fibers (not dead or unused) with pixels that have no wavelength: {fiber: pixels}."""
    solved = np.isfinite(fiber_wave)
    if solved.all():  # the usual case: no count, no fiber type compared (~0.08 ms)
        return {}
    missing = (~solved).sum(axis=1)
    live = ~np.isin(fiber_type, ("D", "N", "U"))
    return {int(f): int(missing[f]) for f in np.flatnonzero((missing > 0) & live)}


def bridged_wavelengths(fiber_wave, reference):
    """Each fiber's wavelengths (nfib, nspec) with its unsolved pixels (NaN) filled: the
    fiber's offset from the ``reference`` grid interpolated from its solved pixels (constant
    beyond them; none for a row without any), so that each row increases like the others.

    For computations on a fiber's pixels (a standard's fit: velocity shifts, line spread,
    telluric model) that need a finite wavelength at every pixel; the unsolved ones are bad
    pixels (``good`` False), so the values given them weigh nothing.
    """
    from ..continuum import fill_gaps  # only for a file with unsolved pixels

    finite = np.isfinite(fiber_wave)
    if finite.all():
        return fiber_wave
    offset = np.where(finite, fiber_wave - reference, 0.0)
    return np.where(finite, fiber_wave, reference + fill_gaps(offset, finite))
