"""The data a QC plot or summary is drawn from, gathered from a calibration result or from a
calibrated file by one constructor.

The two sources hold the same things in different places: a
:class:`~kspec_fluxcal.CalibrationResult` keeps the combination's verdict on each star in its
``calibration``, a calibrated file in its FCALSTAR table; a result keeps its notes as
warnings, a file in its HISTORY. :func:`_from_result` and :func:`_from_file` only read their
source; :func:`_qc_data` builds the arrays the plots use from either.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import ExposureError
from ..exposure import open_exposure
from ..masks import load_regions
from ..products import read_standard_stars

# Pipeline notes (FluxCalWarnings) are stored in the history with this prefix.
_NOTE_PREFIX = "note: "
_HISTORY_START = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\b|note: )")
# FITS HISTORY cards hold 72 characters; longer entries continue on the next card.
_HISTORY_CARD = 72




@dataclass
class _QCData:
    """Everything the plots and the summary need, whatever the source."""

    expid: str
    source: str
    wavelength: np.ndarray
    cal: np.ndarray
    cal_variance: np.ndarray
    cal_mask: np.ndarray
    exposure: xr.Dataset
    stars: xr.Dataset | None
    status: np.ndarray
    used: np.ndarray
    grey: np.ndarray
    fcalnstr: int
    fcalrms: float
    single_star: bool
    fcalsrc: str
    history: list[str]
    warnings: list[str]
    telluric: tuple
    notes: list[str] = field(default_factory=list)


def _from_result(result, telluric):
    """QC data of a :class:`~kspec_fluxcal.CalibrationResult` (Dask-backed members computed):
    the combination's verdict on each star is read from its ``calibration``."""
    calibration = result.calibration.compute()
    calibrated = result.calibrated
    stars = None if result.stars is None else result.stars.compute()
    status, used, grey = _verdict(stars, calibration)
    attrs = calibration.attrs
    history = [str(h) for h in calibrated.attrs.get("history", attrs.get("history", []))]
    nused = int(attrs.get("fcalnstr", calibrated.attrs.get("fcalnstr", used.sum())) or 0)
    return _qc_data(
        calibration, calibrated, stars, (status, used, grey), telluric,
        expid=str(calibrated.attrs.get("expid") or "exposure"),
        source=str(result.path) if result.path is not None else "calibration result (not written)",
        fcalnstr=nused,
        fcalrms=_as_float(attrs.get("fcalrms", calibrated.attrs.get("fcalrms"))),
        single_star=bool(attrs.get("single_star", nused == 1)),
        fcalsrc=str(calibrated.attrs.get("fcalsrc", "standards")),
        history=history,
        warnings=list(result.warnings) or _notes(history),
    )


def _from_file(path, telluric):
    """QC data of a calibrated file (formats contract section 4): the calibration vector from
    its FLUXCAL table, the verdict on each star from its FCALSTAR table (when written)."""
    path = Path(path)
    exposure = open_exposure(path)
    if "cal" not in exposure:
        raise ExposureError(path, "HDU FLUXCAL", "missing: not a calibrated file "
                            "(run 'kspec-fluxcal calibrate' first)")
    stars = read_standard_stars(path)
    notes = []
    if stars is None:
        notes.append("no per-star table (FCALSTAR) in the file: residuals, template-match "
                     "and photometry plots not drawn")
    # The FITS header stores -1 for "no scatter estimate" (one star).
    rms = _as_float(exposure.attrs.get("fcalrms"))
    nused = int(exposure.attrs.get("fcalnstr") or 0)
    # The file's own HISTORY only: what reading it now adds (the conversion of vacuum
    # wavelengths to air) is not what was done to it, and would carry this run's time.
    history = _header_history(exposure.attrs.get("fits_header", ""))
    return _qc_data(
        exposure, exposure, stars, _verdict(stars, stars), telluric,
        expid=str(exposure.attrs["expid"]),  # the reader's exposure_id: never empty
        source=os.fspath(path),
        fcalnstr=nused,
        fcalrms=rms if rms >= 0 else np.nan,
        single_star=nused == 1,
        fcalsrc=str(exposure.attrs.get("fcalsrc") or "standards"),
        history=history,
        warnings=_notes(history),
        notes=notes,
    )


def _qc_data(vector, exposure, stars, verdict, telluric, **described):
    """The one constructor of :class:`_QCData`.

    Takes the Dataset holding the calibration vector (``wavelength``, ``cal``,
    ``cal_variance``, ``cal_mask``), the calibrated exposure, the per-star Dataset (or None),
    the verdict (status, used, grey level per star: :func:`_verdict`), the telluric bands to
    mark, and the scalar fields of :class:`_QCData` (``expid``, ``source``, ``fcalnstr``...);
    returns the QC data, with the grey level of every star filled in.
    """
    status, used, grey = verdict
    cal = np.asarray(vector["cal"].values, dtype=np.float64)
    cal_mask = np.asarray(vector["cal_mask"].values, dtype=bool)
    if stars is not None:
        grey = _fill_grey(stars, cal, cal_mask, grey)
    return _QCData(
        wavelength=np.asarray(vector["wavelength"].values, dtype=np.float64),
        cal=cal,
        cal_variance=np.asarray(vector["cal_variance"].values, dtype=np.float64),
        cal_mask=cal_mask,
        exposure=exposure,
        stars=stars,
        status=status,
        used=used,
        grey=grey,
        telluric=_regions(telluric),
        **described,
    )


def _verdict(stars, combination):
    """Status, use flag and grey level of every star, as the combination judged them.

    ``combination`` is where its per-star verdict is kept: the calibration Dataset of a
    result, the FCALSTAR table of a file. Without one, a star is used when its fit is 'ok'
    and its grey level is NaN (filled in by :func:`_fill_grey`).
    """
    nstar = 0 if stars is None else stars.sizes.get("star", 0)
    status = _star_status(stars, combination)
    used = _per_star(combination, "used", nstar)
    used = status == "ok" if used is None else used.astype(bool)
    grey = _per_star(combination, "grey_level", nstar)
    grey = np.full(nstar, np.nan) if grey is None else grey.astype(np.float64)
    return status, used, grey


def _per_star(source, name, nstar):
    """``source[name]`` as an array when it holds one value per star, else None."""
    if source is None or name not in source.variables:
        return None
    var = source[name]
    if var.dims != ("star",) or var.size != nstar:
        return None
    return np.asarray(var.values)


def _notes(history):
    """The pipeline's notes kept in a history (entries starting 'note: ')."""
    return [h[len(_NOTE_PREFIX):] for h in history if h.startswith(_NOTE_PREFIX)]


def _star_status(stars, calibration):
    """Final status per star: the combination's verdict wins over the fit's."""
    if stars is None:
        return np.zeros(0, dtype=str)
    for source in (calibration, stars):
        if source is not None and "star_status" in source and \
                source["star_status"].size == stars.sizes.get("star", 0):
            return np.asarray(source["star_status"].values).astype(str)
    if "status" in stars:
        return np.asarray(stars["status"].values).astype(str)
    return np.full(stars.sizes.get("star", 0), "unknown")


def _fill_grey(stars, cal, cal_mask, grey):
    """Grey level of each star relative to the combined vector, where not known already.

    The combination leaves it NaN for rejected stars; their residuals still need a level.
    """
    grey = np.array(grey, dtype=np.float64)
    star_cal, star_mask = _star_vectors(stars)
    for s in np.flatnonzero(~np.isfinite(grey)):
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = star_cal[s] / cal
        ok = star_mask[s] & cal_mask & np.isfinite(ratio)
        if ok.any():
            grey[s] = np.median(ratio[ok])
    return grey


def _has(stars, *names, along):
    """Whether every one of ``names`` is a (star, ``along``) array of ``stars``.

    A one-band or one-pixel FITS vector column reads back as a per-star scalar; such a
    table cannot be drawn per band, but must not stop the QC.
    """
    return stars is not None and all(
        name in stars.variables and set(stars[name].dims) == {"star", along} for name in names)


def _star_vectors(stars):
    """Per-star calibration vectors and their reliable-pixel masks, (star, wavelength).

    A zero or negative factor (a model that does not cover the pixel) is no measurement.
    """
    cal = np.asarray(stars["cal"].transpose("star", "wavelength").values, dtype=np.float64)
    mask = np.asarray(stars["cal_mask"].transpose("star", "wavelength").values, dtype=bool)
    mask = mask & np.isfinite(cal) & (cal > 0)
    return cal, mask


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _regions(telluric):
    if telluric is None:
        return ()
    if isinstance(telluric, (str, os.PathLike)):
        return load_regions(telluric)
    return tuple((float(lo), float(hi)) for lo, hi in telluric)


def _header_history(text):
    """HISTORY entries of a FITS header, re-joined across 72-character cards."""
    entries = []
    previous_full = False
    for line in str(text).split("\n"):
        if not line.startswith("HISTORY"):
            previous_full = False
            continue
        body = line[8:8 + _HISTORY_CARD]
        if entries and previous_full and not _HISTORY_START.match(body):
            entries[-1] += body
        else:
            entries.append(body)
        # A card filled to (nearly) its end was most likely cut by astropy's wrapping.
        previous_full = len(body.rstrip()) >= _HISTORY_CARD - 2
    return [re.sub(r"\s+$", "", e) for e in entries if e.strip()]


