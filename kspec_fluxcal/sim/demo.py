"""The embedded default: the whole chain on a simulated survey with known truth.

Synthetic template grid -> Zarr cube -> simulated survey (RED files, catalog, truth) ->
survey calibration on a Dask LocalCluster -> QC plots, archive plots and an accuracy
summary against the truth. Everything goes under one directory (default ``store/demo``);
steps whose outputs exist from an earlier run with the same settings are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo"]


def _step(text):
    print(f"\n== {text}", flush=True)


def run_demo(out="store/demo", *, exposures=20, nights=4, workers=None, seed=1,
             dashboard_address="127.0.0.1:8787"):
    """Run the demo; returns the exit status (0 when every exposure was calibrated).

    Parameters
    ----------
    out : path-like
        Working directory.
    exposures, nights, seed : int
        Size and seed of the simulated survey.
    workers : int, optional
        LocalCluster workers (default: one per core).
    """
    from ..grid.build import build_grid

    start = time.time()
    out = Path(out)
    survey = out / "survey"
    _step(f"1/5 simulated survey ({exposures} exposures, {nights} nights, seed {seed}) with a "
          "SYNTHETIC template grid")
    _simulated_survey(survey, {"exposures": exposures, "nights": nights, "seed": seed})
    _step("2/5 template grid -> Zarr cube")
    cube = build_grid(survey / "grid", out / "templates.zarr", workers=2, progress=True,
                      overwrite=True)
    _step("3/5 survey calibration on a Dask LocalCluster")
    calibrated = out / "calibrated"
    report = _calibrate_survey(survey, cube, calibrated, out, workers, dashboard_address)
    entries = json.loads((survey / "survey.json").read_text())["exposures"]
    done = [e for e in entries if e["expid"] in set(report.calibrated)]
    _step("4/5 QC plots")
    qc_dir = _plots(calibrated, done[:2])
    _step("5/5 accuracy against the truth")
    _accuracy(out, survey, calibrated, done)
    print(f"\nDone in {time.time() - start:.0f} s. Outputs under {out}/:")
    print(f"  calibrated FITS and archive: {calibrated}/ (archive.zarr)")
    print(f"  QC plots: {qc_dir}/   Dask performance report: {out / 'dask-report.html'}")
    print(f"  accuracy summary: {out / 'accuracy.txt'}")
    if not report.ok:
        print(f"{len(report.failed)} exposure(s) failed: see the summary above")
    return 0 if report.ok else 1


def _simulated_survey(survey, settings):
    """Simulate the survey into ``survey`` (its ``settings``: exposures, nights, seed), unless
    the survey there was made with the same settings (then it is reused)."""
    from .survey import simulate_survey

    manifest = survey / "survey.json"
    reuse = False
    if manifest.exists():
        options = json.loads(manifest.read_text()).get("options", {})
        reuse = all(options.get(k) == v for k, v in settings.items())
    if reuse:
        print(f"reusing {survey}")
    else:
        simulate_survey(survey, **settings, overwrite=True, progress=True)


def _calibrate_survey(survey, cube, calibrated, out, workers, dashboard_address):
    """Calibrate the survey's lake with its catalog and the template ``cube`` on a
    LocalCluster into ``calibrated`` (a performance report in ``out``); the job's report."""
    from ..survey import run_survey

    return run_survey(survey / "lake", catalog=survey / "catalog.csv", grid=cube,
                      out=calibrated, workers=workers, progress=True,
                      dashboard_address=dashboard_address,
                      performance_report=out / "dask-report.html")


def _calibrated_path(calibrated, entry):
    """Where the survey job wrote the calibrated file of a manifest entry."""
    from ..pipeline import output_name

    return calibrated / Path(entry["path"]).relative_to("lake").parent / output_name(
        entry["path"])


def _plots(calibrated, shown):
    """QC plots of the ``shown`` manifest entries and the archive plots (with the survey
    model when the job fitted one setup), in the layout of ``calibrate --qc``; their
    directory."""
    from ..qc import qc_directory, qc_from_file
    from ..survey.archive import open_archive
    from ..survey.model_store import MODEL_STORE, model_setups, open_model
    from ..survey.plots import plot_archive

    qc_dir = qc_directory(calibrated)
    for entry in shown:
        written = qc_from_file(_calibrated_path(calibrated, entry), qc_dir)
        print(f"{entry['expid']}: {len(written)} QC files in {qc_dir}")
    store = calibrated / MODEL_STORE
    model = open_model(store) if len(model_setups(store) if store.exists() else []) == 1 \
        else None
    archive_plots = plot_archive(open_archive(calibrated / "archive.zarr"), qc_dir / "archive",
                                 model=model)
    print(f"archive plots: {', '.join(str(p) for p in archive_plots)}")
    return qc_dir


def _accuracy(out, survey, calibrated, done):
    """Compare the calibrated exposures of the manifest entries ``done`` with their truth;
    print the accuracy table and write it to ``out/accuracy.txt``."""
    from .accuracy import compare_with_truth

    rows = [compare_with_truth(_calibrated_path(calibrated, entry), survey / entry["truth"])
            for entry in done]
    text = accuracy_table(rows)
    print(text)
    (out / "accuracy.txt").write_text(text + "\n")


#: The accuracy table's columns, as printed under it (see kspec_fluxcal.sim.accuracy).
ACCURACY_COLUMNS = (
    ("n_std", "standard stars used (FCALNSTR)"),
    ("cal_shape%", "rms shape error of the calibration vector (its level removed, 100 A "
     "running median, outside telluric bands, 4000-8400 A)"),
    ("shape%", "the same for the calibrated science spectra (median over science fibers, "
     "their noise included)"),
    ("level%", "median level error of the science spectra (includes each fiber's aperture "
     "loss)"),
    ("level_cal%", "level error of the calibration vector alone"),
    ("telluric%", "rms error of the calibration inside telluric bands, relative to outside"),
)


def accuracy_table(rows):
    """Per-exposure accuracy lines, their columns explained, and survey medians / 90th
    percentiles (percent)."""
    lines = [f"{'EXPID':<18} {'n_std':>5} {'cal_shape%':>10} {'shape%':>8} {'level%':>8} "
             f"{'level_cal%':>10} {'telluric%':>9}"]
    for r in rows:
        lines.append(f"{r['expid']:<18} {r['n_standards']:>5d} {100 * r['cal_shape']:>10.2f} "
                     f"{100 * r['shape']:>8.2f} {100 * r['level']:>+8.2f} "
                     f"{100 * r['level_cal']:>+10.2f} {100 * r['telluric']:>9.2f}")
    lines += ["", "Columns, in percent, against the simulation's truth:"]
    lines += [f"  {name}: {text}" for name, text in ACCURACY_COLUMNS]
    if rows:
        def stat(key, absolute=False):
            values = np.array([r[key] for r in rows], dtype=float)
            values = np.abs(values) if absolute else values
            if not np.isfinite(values).any():
                return np.nan, np.nan
            return 100 * np.nanmedian(values), 100 * np.nanpercentile(values, 90)

        lines.append("")
        for key, label, absolute in (("cal_shape", "calibration shape error", False),
                                     ("shape", "science-fiber shape error", False),
                                     ("shape_bright", "science-fiber shape error, S/N >= 30",
                                      False),
                                     ("level_cal", "calibration level error |.|", True),
                                     ("level", "science-fiber level error |.| (incl. aperture "
                                      "losses)", True),
                                     ("telluric", "error inside telluric bands", False)):
            med, p90 = stat(key, absolute)
            lines.append(f"{label}: median {med:.2f}%, 90th percentile {p90:.2f}%")
        stars = [s for r in rows for s in r["stars"]]
        if stars:
            for key, unit in (("d_teff", "K"), ("d_logg", "dex"), ("d_feh", "dex"),
                              ("d_rv", "km/s"), ("d_ebv", "mag")):
                values = np.abs([s[key] for s in stars])
                lines.append(f"standards |{key[2:]} fit - true|: median {np.median(values):.3g} "
                             f"{unit}, 90th percentile {np.percentile(values, 90):.3g} {unit}")
        lines.append("(anchors: SDSS ~4 % rms, BOSS ~6 %; target < 1 % shape, < 2 % absolute)")
    return "\n".join(lines)
