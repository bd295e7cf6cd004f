"""The archive fallback of the survey job (``[survey] fallback``, opt-in): an exposure
without usable standards that the survey model cannot serve is calibrated from the median of
the archived calibrations of its setup within ``fallback_window`` days, scaled by exposure
time (airmass differences not corrected); FCALSRC 'archive', grade D.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .cluster import as_completed_pairs
from .tasks import Packed, outcome, run_task, token

__all__ = ["run_fallback"]


def _fallback_task(path, out_path, reference, config, setup_key, input_hash, utc_offset, expid):
    """Calibrate an exposure without usable standards from archived calibrations; never
    raises for bad data (:func:`kspec_fluxcal.survey.tasks.run_task`)."""
    return Packed(run_task(expid, _from_archive, path, out_path, reference, setup_key,
                           input_hash, utc_offset, config))


def _from_archive(path, out_path, reference, setup_key, input_hash, utc_offset, config):
    """The work of a fallback task: the calibration from ``reference``
    (:func:`_archive_reference`), applied and written; returns its archive record and
    quality."""
    import xarray as xr

    from ..calibration import apply_calibration
    from ..config import second_order_options
    from ..exposure import add_history, open_exposure
    from ..products import write_calibrated
    from ..second_order import correct_second_order
    from .archive import archive_record

    # as the exposures calibrated with their own standards
    exposure = correct_second_order(open_exposure(path), **second_order_options(config))
    wave = exposure["wavelength"].values
    width = np.gradient(wave)
    grid, curve, spread, n, span = reference
    exptime = exposure.attrs["exptime"]
    # The archive holds cal x pixel width (per Angstrom) x exptime-free median: undo
    # both for this exposure's pixels and exposure time.
    cal = np.interp(wave, grid, curve) / exptime / width
    # Per pixel, the variance of a median of n calibrations; how far this exposure's own
    # would be from them (their spread, mostly a level) is FCALLERR, not a pixel's noise.
    cal_var = np.pi / 2 / n * (np.interp(wave, grid, spread) / exptime / width) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = float(np.nanmedian(spread / curve))
    calibration = xr.Dataset(
        {"cal": ("wavelength", cal), "cal_variance": ("wavelength", cal_var),
         "cal_mask": ("wavelength", np.zeros(wave.size, bool))},
        coords={"wavelength": exposure["wavelength"]},
        # FCALRMS is the contract's scatter between standards: none here.
        attrs={"fcalnstr": 0, "fcalrms": np.nan, "fcallerr": rms, "fcalsrc": "archive",
               "fcalqual": "D", "history": []})
    add_history(calibration, f"no usable standard star: calibrated from the median of "
                f"{n} archived calibration(s) of setup {setup_key} within {span:.2f} d "
                "(scaled by exposure time; airmass differences not corrected)")
    calibrated = apply_calibration(exposure, calibration)
    calibrated.attrs["setup"] = setup_key
    write_calibrated(calibrated, out_path, overwrite=True)
    record = archive_record(calibrated, None, None, source=str(path),
                            input_hash=input_hash, utc_offset=utc_offset)
    quality = {"grade": "D", "used": 0, "standards": 0, "fcalrms": np.nan,
               "fcalmerr": np.nan, "fcallsf": np.nan}
    return {"record": record, "nstar": 0, "quality": quality}


def _archive_reference(archive_path, setup_key, mjd, window):
    """Median (cal x exptime) of archived standard-star calibrations of a setup near ``mjd``.

    Returns (archive wavelengths, median, robust spread, number used, largest |dMJD|), or
    None when the archive has no such calibration.
    """
    from .archive import open_archive

    if not Path(archive_path).exists():
        return None
    ds = open_archive(archive_path)
    if not ds.sizes.get("exposure"):
        return None
    near = ((ds["setup"].values == setup_key) & (ds["fcalsrc"].values == "standards")
            & (np.abs(ds["mjd"].values - mjd) <= window))
    if not near.any():
        return None
    sub = ds.isel(exposure=np.flatnonzero(near))
    scaled = (sub["cal"] * sub["exptime"]).compute().values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN outside the setup's range
        curve = np.nanmedian(scaled, axis=0)
        spread = (1.4826 * np.nanmedian(np.abs(scaled - curve), axis=0) if near.sum() > 1
                  else 0.05 * curve)
    span = float(np.max(np.abs(sub["mjd"].values - mjd)))
    return (ds["wavelength"].values, curve, spread, int(near.sum()), span)


def run_fallback(client, todo, writer, report, config, utc, progress):
    """Calibrate from the archive the exposures of ``todo`` whose first pass found no usable
    standard and that the survey model did not calibrate; updates ``report``."""
    candidates = [e for e in todo if e.get("failure", {}).get("status") == "no standards"
                  and e["info"]["expid"] in report.failed]
    futures = {}
    window = config.survey.fallback_window
    for entry in candidates:
        info = entry["info"]
        reference = _archive_reference(writer.path, info["setup"], info["mjd"], window)
        if reference is None:
            report.failed[info["expid"]] += (f"; no archived calibration of setup {info['setup']}"
                                             f" within {window:g} d for the archive fallback")
            continue
        key = f"fallback-{info['expid']}-{token(entry['input_hash'], entry['out'], reference[3])}"
        futures[client.submit(_fallback_task, entry["path"], entry["out"], reference, config,
                              info["setup"], entry["input_hash"], utc, info["expid"],
                              key=key, retries=2)] = entry
    records = []
    try:
        with as_completed_pairs(client, futures) as pairs:
            for future, result in pairs:
                expid = futures[future]["info"]["expid"]
                result = outcome(future, result, expid, report)
                if result["status"] == "ok":
                    records.append(result["record"])
                    report.quality[expid] = result["quality"]
                    report.failed.pop(expid, None)
                    report.calibrated.append(expid)
                    report.fallback.append(expid)
                else:
                    report.failed[expid] += f"; archive fallback failed: {result['reason']}"
    finally:
        writer.append(records)
    if progress and futures:
        print(f"{len(records)} exposure(s) without usable standards calibrated from the archive",
              flush=True)
