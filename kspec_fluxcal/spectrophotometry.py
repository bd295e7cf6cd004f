"""The spectrophotometric check SDSS publishes per plate: the synthetic g, r, i magnitudes of
the calibrated point sources that have catalog photometry, against the catalog.

Per exposure, the program fibers (TYPE 'P') matched to the catalog (by OBJID, else by
position; catalog entries are stars) give synthetic Pan-STARRS1 g, r, i magnitudes of their
calibrated spectra; the median of (synthetic - catalog) per band and the robust scatter
(1.4826 MAD, the median over the bands) describe the calibration as the science targets see
it, with no truth: a grey calibration error moves every band's median, a tilt the bands
apart. The medians include the fibers' own aperture losses (a point source loses ~10 % of
its light outside a fiber: +0.1 mag), which the standards' calibration does not remove;
compare exposures with each other (a night's median), not with zero.

Synthetic magnitudes are computed on the exposure's reference wavelengths: per-fiber
wavelength solutions differ from them by a fraction of a pixel, ~3e-4 of a band's width
(< 0.001 mag). Pixels without data (cosmic rays) are bridged linearly first.
"""

from __future__ import annotations

import numpy as np

from .catalog import catalog_lookup
from .constants import FLUX_UNIT_SCALE, POSITION_MATCH_ARCSEC
from .continuum import fill_gaps, nanmedian
from .photometry import band_weight_values, synthetic_mag_values

__all__ = ["spectrophotometric_check", "check_exposure", "SPHOT_BANDS", "SPHOT_MIN_SNR",
           "PROGRAM_TYPE"]

#: The check's bands: name in the header/archive -> speclite filter (Pan-STARRS1, AB).
SPHOT_BANDS = {"g": "panstarrs-g", "r": "panstarrs-r", "i": "panstarrs-i"}
#: FIBRES TYPE of the fibers checked (formats contract section 1: P program target).
PROGRAM_TYPE = "P"
#: Program fibers with a lower median S/N per pixel are left out: their synthetic magnitudes
#: would measure their noise, not the calibration.
SPHOT_MIN_SNR = 5.0
#: A band's median needs at least this many stars.
_MIN_STARS = 1


def spectrophotometric_check(calibrated, catalog, *, radius_arcsec=POSITION_MATCH_ARCSEC):
    """Synthetic minus catalog g, r, i of an exposure's calibrated point sources.

    Parameters
    ----------
    calibrated : xarray.Dataset
        From :func:`kspec_fluxcal.apply_calibration` (flux in the flux unit).
    catalog : xarray.Dataset
        From :func:`kspec_fluxcal.read_catalog` (with the Pan-STARRS1 bands).

    Returns
    -------
    dict
        ``sphot_g``, ``sphot_r``, ``sphot_i``: median synthetic - catalog, mag (None when no
        star has the band); ``sphot_scatter``: rms scatter about the band means, mag (pooled
        over the bands; None for fewer than two stars); ``sphot_n``: stars used;
        ``stars``: per star (fiber, objid, and the offsets by band).
    """
    fibers, rows, flux = _program_stars(calibrated, catalog, radius_arcsec)
    out = {f"sphot_{b}": None for b in SPHOT_BANDS} | {"sphot_scatter": None, "sphot_n": 0,
                                                      "stars": []}
    catalog_bands = catalog.indexes["band"]
    names = [n for n, f in SPHOT_BANDS.items() if f in catalog_bands]
    bands = [SPHOT_BANDS[n] for n in names]
    if not fibers.size or not bands:
        return out
    # Variables, not DataArrays: selecting a DataArray selects every catalog coordinate too;
    # the stars' rows first, then the bands (the whole catalog's were copied).
    columns = [catalog_bands.get_loc(b) for b in bands]
    catalog_mag = catalog.variables["mag"].transpose("star", "band").values[rows][:, columns]
    offset = _synthetic(calibrated.variables["wavelength"].values, flux, bands) - catalog_mag
    finite = np.isfinite(offset)
    used = finite.any(axis=1)
    out["sphot_n"] = int(used.sum())
    squares, dof = 0.0, 0
    # Every star with every band (the usual case): the bands' medians in one call, the same
    # values (np.median's ~25 us a call was mostly its own overhead on a handful of stars).
    medians = np.median(offset, axis=0) if finite.all() else None
    for k, name in enumerate(names):
        values = offset[:, k][finite[:, k]]
        if values.size >= _MIN_STARS:
            out[f"sphot_{name}"] = float(np.median(values) if medians is None else medians[k])
        if values.size >= 2:
            squares += float(np.sum((values - values.mean()) ** 2))
            dof += values.size - 1
    if dof:
        # Pooled over the bands, a degree of freedom spent on each band's mean: an exposure
        # has a handful of program stars, where a median absolute deviation about the median
        # reads 25-40 % low (3 stars: one deviation is 0 by construction).
        out["sphot_scatter"] = float(np.sqrt(squares / dof))
    objid = catalog.variables["objid"].values
    out["stars"] = [{"fiber": int(f), "objid": int(objid[r]),
                     **{n: float(offset[s, k]) for k, n in enumerate(names)}}
                    for s, (f, r) in enumerate(zip(fibers, rows, strict=True)) if used[s]]
    return out


def _program_stars(calibrated, catalog, radius_arcsec):
    """Program fibers matched to the catalog with enough S/N: (fiber indices, catalog rows,
    their calibrated flux as float64)."""
    fibres = calibrated.variables  # not DataArrays, each made with the exposure's coordinates
    kind = np.char.strip(fibres["fiber_type"].values.astype(str))
    program = np.flatnonzero(kind == PROGRAM_TYPE)
    if not program.size:
        return program, program, np.empty((0, calibrated.sizes["wavelength"]))
    index, _, _ = catalog_lookup(catalog, fibres["objid"].values[program],
                                 fibres["ra"].values[program], fibres["dec"].values[program],
                                 radius_arcsec)
    flux, variance = (_fiber_rows(calibrated.variables[name], program)
                      for name in ("flux", "variance"))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / np.sqrt(variance)
    keep = (index >= 0) & _median_reaches(snr, SPHOT_MIN_SNR)
    return program[keep], index[keep], flux[keep]


def _fiber_rows(variable, fibers):
    """The rows ``fibers`` of a (fiber, wavelength) Variable as float64. Only these fibers
    are computed when it is lazy; NumPy's are indexed directly (a Variable's selection,
    0.1 ms each, was a sixth of the check)."""
    data = variable.data
    if isinstance(data, np.ndarray) and variable.dims == ("fiber", "wavelength"):
        return np.asarray(data[fibers], dtype=np.float64)
    return variable.isel(fiber=fibers).values.astype(np.float64)


def _median_reaches(values, threshold):
    """Whether the median of each row of ``values`` over its values (NaN ignored; a row
    without any has none) is >= ``threshold``: np.nanmedian's decision.

    Decided by counting the values below: the median's two middle values are both at or
    above it, or both below, but for an even count with the threshold between them, where
    the median itself (:func:`~kspec_fluxcal.continuum.nanmedian`) decides. Sorting every
    fiber's pixels for it was a sixth of the check.
    """
    count = np.sum(~np.isnan(values), axis=1)
    below = np.sum(values < threshold, axis=1)
    reaches = (count > 0) & (below <= (count - 1) // 2)
    between = (count > 0) & (count % 2 == 0) & (below == count // 2)
    if between.any():
        reaches[between] = nanmedian(values[between], axis=1)[:, 0] >= threshold
    return reaches


def _synthetic(wavelength, flux, bands):
    """AB magnitudes (star, band) of calibrated spectra ``flux`` (star, wavelength)."""
    good = np.isfinite(flux)
    filled = fill_gaps(np.where(good, flux, 0.0), good)
    filled *= FLUX_UNIT_SCALE
    weights = band_weight_values(bands, wavelength, medium="air")
    return synthetic_mag_values(filled, weights)


def check_exposure(calibrated, catalog):
    """Run :func:`spectrophotometric_check` on a calibrated exposure and record it: attrs
    ``sphot_*`` (header FCALSPG, FCALSPR, FCALSPI, FCALSPS, FCALSPN) and a history line.

    Returns
    -------
    dict
        The check (see :func:`spectrophotometric_check`).
    """
    from .exposure import add_history

    check = spectrophotometric_check(calibrated, catalog)
    calibrated.attrs.update({k: v for k, v in check.items() if k != "stars"})
    if check["sphot_n"]:
        shown = ", ".join(f"{b} {check[f'sphot_{b}']:+.3f}" for b in SPHOT_BANDS
                          if check[f"sphot_{b}"] is not None)
        add_history(calibrated, f"spectrophotometric check: {check['sphot_n']} program "
                    f"star(s), median synthetic - catalog {shown} mag")
    return check
