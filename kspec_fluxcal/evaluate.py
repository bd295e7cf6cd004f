"""Accuracy of calibrations against known truth (simulated surveys).

Metrics, per exposure
---------------------
``cal_shape``
    rms of (Cal / Cal_true - 1) after a 100 A running median and removal of the median
    level, outside telluric bands, over the range where the standards are bright enough to
    measure (4000-8400 A by default): the calibration's own shape error.
``shape``
    the same for the calibrated science spectra (stars, galaxies, quasars): calibrated / true
    flux, the median over science fibers (target noise included: faint targets dominate).
``shape_bright``
    ``shape`` over the science fibers with a median S/N >= 30 per pixel.
``level``
    median(calibrated / true) - 1 of science fibers (median over fibers): the absolute error,
    which includes each fiber's own aperture loss.
``level_cal``
    the calibration's level error alone: Cal x <aperture of the used standards> / Cal_true - 1.
``telluric``
    rms of the smoothed ratio inside telluric bands, relative to outside.
Per standard: fitted minus true Teff, log g, [M/H], RV and E(B-V).
"""

from __future__ import annotations

import numpy as np

from .calibration import running_median
from .exposure import open_exposure, read_standard_stars
from .masks import region_mask

__all__ = ["compare_with_truth"]

SCIENCE_KINDS = ("star", "galaxy", "qso")


def _shape_rms(ratio, wave, use, window):
    """rms of the smoothed ratio about its median level; also the level and the smoothed
    ratio relative to it."""
    smooth = running_median(ratio, wave, window)
    level = np.nanmedian(np.where(use, smooth, np.nan), axis=-1, keepdims=True)
    rel = smooth / level - 1.0
    return np.sqrt(np.nanmean(np.where(use, rel, np.nan) ** 2, axis=-1)), level[..., 0], rel


def compare_with_truth(calibrated, truth, *, window=100.0, wave_range=(4000.0, 8400.0),
                       telluric="telluric_default"):
    """Compare a calibrated exposure with its simulated truth.

    Parameters
    ----------
    calibrated : path-like or xarray.Dataset
        A calibrated file (or :func:`open_exposure` of one).
    truth : path-like or mapping
        The simulator's ``truth/<expid>.npz``.

    Returns
    -------
    dict
        The metrics of the module docstring, plus ``fibers`` (kind, median S/N per pixel and
        shape error of each science fiber), ``stars`` (a list of dicts of fitted minus true
        parameters) and ``n_standards``.
    """
    stars = None
    if not hasattr(calibrated, "data_vars"):
        stars = read_standard_stars(calibrated)
        calibrated = open_exposure(calibrated)
    truth = dict(np.load(truth)) if not isinstance(truth, dict) else truth
    wave = calibrated["wavelength"].values
    if not np.allclose(wave, truth["wavelength"], rtol=0, atol=1e-6):
        raise ValueError("the calibrated exposure and the truth have different wavelengths")
    inside = (wave >= wave_range[0]) & (wave <= wave_range[1])
    clear = region_mask(wave, telluric)
    use = inside & clear
    kinds = np.asarray(truth["fiber_kind"]).astype(str)
    aperture = np.asarray(truth["aperture"], dtype=float)
    std_fibers = np.flatnonzero(kinds == "standard")
    used_fibers = std_fibers
    if stars is not None and "used" in stars:
        used_fibers = np.asarray(stars["fiber"].values)[np.asarray(stars["used"].values, bool)]
    mean_aperture = float(np.mean(aperture[used_fibers])) if used_fibers.size else np.nan

    cal_true = 1.0 / np.asarray(truth["response"], dtype=float)
    cal = calibrated["cal"].values
    cal_ratio = cal * mean_aperture / cal_true
    cal_shape, _, cal_rel = _shape_rms(cal_ratio, wave, use, window)
    band = inside & ~clear
    tell = float(np.sqrt(np.nanmean(cal_rel[band] ** 2))) if band.any() else np.nan

    science = np.flatnonzero(np.isin(kinds, SCIENCE_KINDS))
    true_flux = np.asarray(truth["true_flux"], dtype=float)[science]
    flux = calibrated["flux"].values[science].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(true_flux > 0.05 * np.nanmedian(true_flux, axis=-1, keepdims=True),
                         flux / true_flux, np.nan)
    shape, level, _ = _shape_rms(ratio, wave, use[None, :], window)
    level = level - 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.nanmedian(np.where(use, flux / np.sqrt(
            calibrated["variance"].values[science]), np.nan), axis=-1)
    bright = snr >= 30

    out = {
        "expid": str(calibrated.attrs.get("expid")),
        "n_standards": int(calibrated.attrs.get("fcalnstr") or 0),
        "fcalsrc": str(calibrated.attrs.get("fcalsrc", "standards")),
        "cal_shape": float(cal_shape),
        "level_cal": float(np.nanmedian(np.where(use, cal_ratio, np.nan)) - 1.0),
        "telluric": tell,
        "shape": float(np.nanmedian(shape)) if shape.size else np.nan,
        "shape_bright": float(np.nanmedian(shape[bright])) if bright.any() else np.nan,
        "n_bright": int(bright.sum()),
        "level": float(np.nanmedian(level)) if level.size else np.nan,
        "science_fibers": int(science.size),
        "fibers": [(str(kinds[f]), float(n), float(r))
                   for f, n, r in zip(science, snr, shape, strict=True)],
        "stars": [],
    }
    if stars is not None and "std_fiber" in truth:
        for k, fiber in enumerate(np.asarray(truth["std_fiber"])):
            match = np.flatnonzero(np.asarray(stars["fiber"].values) == fiber)
            if not match.size:
                continue
            s = int(match[0])
            row = {"fiber": int(fiber), "status": str(stars["status"].values[s]),
                   "snr": float(truth["std_snr"][k])}
            for name in ("teff", "logg", "feh", "rv", "ebv"):
                row[f"d_{name}"] = float(stars[name].values[s]) - float(truth[f"std_{name}"][k])
            out["stars"].append(row)
    return out
