"""Survey-wide recalibration as one Dask graph on dask.distributed.

Plan (client side, headers only): discover the RED files, read what each needs for planning
(EXPID, MJD, setup = wavelength grid + line-spread function), hash its inputs, and group the
exposures by setup. Graph: one ``prepare-<setup>`` task per setup (the prepared template
cube, ~10-30 MB, computed once and moved to the workers that need it by the scheduler), the
catalog scattered once to every worker, and one ``calibrate-<EXPID>`` task per exposure that
fits, combines, applies and writes the calibrated FITS file atomically and returns a small
archive record. The client appends records to ``archive.zarr`` as tasks finish, so a killed
job keeps everything finished; ``resume=True`` skips exposures archived with the same inputs.
A failing exposure is reported with its reason and never stops the others; a worker that
dies is replaced and its task retried elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .config import Config, load_config
from .errors import CalibrationError, FluxCalError, InputError

__all__ = ["discover", "plan_survey", "run_survey", "SurveyReport"]


@dataclass
class SurveyReport:
    """What a survey run did."""

    calibrated: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    fallback: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    archive: Path | None = None
    dashboard: str | None = None
    elapsed: float = 0.0

    @property
    def ok(self):
        """True when no exposure failed."""
        return not self.failed

    def summary(self):
        """A short multi-line summary."""
        lines = [f"{len(self.calibrated)} calibrated ({len(self.fallback)} from the archive), "
                 f"{len(self.skipped)} skipped as up to date, {len(self.failed)} failed, "
                 f"in {self.elapsed:.1f} s"]
        lines += [f"  FAILED {name}: {reason}" for name, reason in sorted(self.failed.items())]
        return "\n".join(lines)


def discover(lake, pattern="**/*.fits"):
    """RED files under ``lake`` matching ``pattern`` (hidden and temporary files skipped)."""
    lake = Path(lake)
    if not lake.is_dir():
        raise InputError(lake, None, "no such lake directory")
    return sorted(p for p in lake.glob(pattern)
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(lake).parts))


def _file_hash(path, chunk=1 << 20):
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def plan_survey(paths, *, lake, catalog_hash, grid_plan, config):
    """Read headers and hash inputs; returns (entries, failures).

    Each entry: path, rel (path under the lake), info (see
    :func:`kspec_fluxcal.read_exposure_info`) and input_hash (RED file content, catalog,
    grid build, configuration and package version).
    """
    from .exposure import read_exposure_info

    settings = json.dumps(config.to_dict(), sort_keys=True)
    entries, failures, seen = [], {}, {}
    for path in paths:
        rel = Path(path).relative_to(lake)
        try:
            info = read_exposure_info(path)
        except FluxCalError as err:
            failures[str(rel)] = str(err)
            continue
        if info["expid"] in seen:
            failures[str(rel)] = f"duplicate EXPID {info['expid']} (also in {seen[info['expid']]})"
            continue
        seen[info["expid"]] = rel
        digest = hashlib.sha1("|".join([_file_hash(path), catalog_hash, grid_plan, settings,
                                        __version__]).encode()).hexdigest()
        entries.append({"path": str(path), "rel": str(rel), "info": info, "input_hash": digest})
    return entries, failures


# ----------------------------------------------------------------------------- tasks


def _prepare_task(grid_path, example_path, config):
    from .exposure import open_exposure
    from .grid import open_grid
    from .standards import exposure_lsf, prepare_setup

    exposure = open_exposure(example_path)
    lsf = exposure_lsf(exposure, config)
    return prepare_setup(open_grid(grid_path), exposure["wavelength"].values, lsf, config)


def _calibrate_task(path, out_path, catalog, setup, grid_path, config, setup_key, input_hash,
                    utc_offset):
    """Calibrate one exposure; never raises for bad data: returns a status dict."""
    import dask

    from .archive import archive_record
    from .exposure import open_exposure, write_calibrated
    from .grid import open_grid
    from .pipeline import calibrate

    expid = Path(path).stem
    try:
        with dask.config.set(scheduler="synchronous"):
            exposure = open_exposure(path)
            expid = exposure.attrs["expid"]
            grid = setup
            if not np.array_equal(setup["wavelength"].values, exposure["wavelength"].values):
                grid = open_grid(grid_path)  # prepared on this worker, through its cache
            result = calibrate(exposure, catalog, grid, config)
            result.calibrated.attrs["setup"] = setup_key
            write_calibrated(result.calibrated, out_path, overwrite=True, stars=result.stars)
            record = archive_record(result.calibrated, result.stars, result.calibration,
                                    source=str(path), input_hash=input_hash,
                                    utc_offset=utc_offset)
        return {"expid": expid, "status": "ok", "record": record, "notes": list(result.warnings),
                "nstar": int(result.calibration.attrs["fcalnstr"])}
    except CalibrationError as err:
        return {"expid": expid, "status": "no standards", "reason": str(err)}
    except FluxCalError as err:
        return {"expid": expid, "status": "failed", "reason": str(err)}
    except Exception as err:  # a bug must not stop the survey: report it with its place
        where = traceback.extract_tb(err.__traceback__)[-1]
        return {"expid": expid, "status": "failed",
                "reason": f"internal error {type(err).__name__}: {err} "
                          f"({Path(where.filename).name}:{where.lineno})"}


def _fallback_task(path, out_path, reference, config, setup_key, input_hash, utc_offset):
    """Calibrate an exposure without usable standards from archived calibrations."""
    import dask
    import xarray as xr

    from .archive import archive_record
    from .calibration import apply_calibration
    from .exposure import add_history, open_exposure, write_calibrated

    try:
        with dask.config.set(scheduler="synchronous"):
            exposure = open_exposure(path)
            wave = exposure["wavelength"].values
            width = np.gradient(wave)
            grid, curve, spread, n, span = reference
            exptime = exposure.attrs["exptime"]
            cal = np.interp(wave, grid, curve) / exptime / width
            cal_var = (np.interp(wave, grid, spread) / exptime / width) ** 2
            calibration = xr.Dataset(
                {"cal": ("wavelength", cal), "cal_variance": ("wavelength", cal_var),
                 "cal_mask": ("wavelength", np.zeros(wave.size, bool))},
                coords={"wavelength": exposure["wavelength"]},
                attrs={"fcalnstr": 0, "fcalrms": float(np.nanmedian(spread / curve)),
                       "fcalsrc": "archive", "history": []})
            add_history(calibration, f"no usable standard star: calibrated from the median of "
                        f"{n} archived calibration(s) of setup {setup_key} within {span:.2f} d "
                        "(scaled by exposure time; airmass differences not corrected)")
            calibrated = apply_calibration(exposure, calibration)
            calibrated.attrs["setup"] = setup_key
            write_calibrated(calibrated, out_path, overwrite=True)
            record = archive_record(calibrated, None, None, source=str(path),
                                    input_hash=input_hash, utc_offset=utc_offset)
        return {"expid": exposure.attrs["expid"], "status": "ok", "record": record,
                "notes": [], "nstar": 0}
    except FluxCalError as err:
        return {"expid": Path(path).stem, "status": "failed", "reason": str(err)}


def _archive_reference(archive_path, setup_key, mjd, window):
    """Median (cal x exptime) of archived standard-star calibrations of a setup near ``mjd``."""
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
    curve = np.nanmedian(scaled, axis=0)
    spread = 1.4826 * np.nanmedian(np.abs(scaled - curve), axis=0) if near.sum() > 1 else 0.05 * curve
    span = float(np.max(np.abs(sub["mjd"].values - mjd)))
    return (ds["wavelength"].values, curve, spread, int(near.sum()), span)


# ----------------------------------------------------------------------------- the job


class _Progress:
    def __init__(self, total, enabled):
        self.total, self.enabled, self.done, self.failed = total, enabled, 0, 0
        self.tty = sys.stdout.isatty()
        self.start = time.time()
        self._last = -1

    def update(self, ok):
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        pct = int(100 * self.done / max(self.total, 1))
        if self.tty:
            bar = "#" * (pct // 4)
            print(f"\r[{bar:<25}] {self.done}/{self.total} exposures, {self.failed} failed, "
                  f"{time.time() - self.start:.0f} s", end="", flush=True)
            if self.done == self.total:
                print()
        elif pct // 10 != self._last or self.done == self.total:
            self._last = pct // 10
            print(f"{self.done}/{self.total} exposures done ({self.failed} failed), "
                  f"{time.time() - self.start:.0f} s", flush=True)


def _start_client(scheduler, workers, threads_per_worker, dashboard_address):
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except OSError as err:
            raise FluxCalError(f"cannot connect to the scheduler at {scheduler}: {err}") from None
    workers = workers or os.cpu_count() or 1
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                           dashboard_address=dashboard_address, processes=True)
    return Client(cluster), cluster


def run_survey(lake, *, catalog, grid, out, config=None, scheduler=None, workers=None,
               threads_per_worker=1, performance_report=None, resume=False, pattern=None,
               progress=True, client=None, dashboard_address="127.0.0.1:8787", flush_every=8):
    """Re-calibrate every RED file under ``lake`` as one Dask job.

    Parameters
    ----------
    lake : path-like
        Directory searched recursively for RED files (``pattern``, default from the
        configuration's [survey] pattern).
    catalog : path-like
        Standard-star catalog (Refcat2 CSV).
    grid : path-like
        Template grid store.
    out : path-like
        Output directory: calibrated files mirror the lake's tree (``<name>_fluxcal.fits``)
        and the archive is ``out/archive.zarr``.
    config : Config or path-like, optional
    scheduler : str, optional
        Address of an existing scheduler; default: a LocalCluster of ``workers`` processes
        (one per core) with ``threads_per_worker`` threads each.
    performance_report : path-like, optional
        Save Dask's HTML performance report there.
    resume : bool
        Skip exposures already archived with identical inputs.
    progress : bool
        Print the dashboard link, progress and the summary.
    client : distributed.Client, optional
        Use this client (tests, notebooks) instead of creating one.

    Returns
    -------
    SurveyReport
    """
    from distributed import as_completed
    from distributed import performance_report as perf_report

    from .archive import ArchiveWriter
    from .catalog import read_catalog
    from .grid import open_grid
    from .pipeline import output_name

    start = time.time()
    config = config if isinstance(config, Config) else load_config(config)
    lake, out = Path(lake), Path(out)
    catalog_path = Path(catalog)
    catalog_ds = read_catalog(catalog_path)
    grid_ds = open_grid(grid)
    paths = discover(lake, pattern or config.survey.pattern)
    if not paths:
        raise InputError(lake, None, f"no RED file matches {pattern or config.survey.pattern!r}")
    entries, failed = plan_survey(paths, lake=lake, catalog_hash=_file_hash(catalog_path),
                                  grid_plan=str(grid_ds.attrs.get("build_plan")), config=config)
    out.mkdir(parents=True, exist_ok=True)
    writer = ArchiveWriter(out / "archive.zarr")
    report = SurveyReport(failed=dict(failed), archive=writer.path)
    todo = []
    for entry in entries:
        target = out / Path(entry["rel"]).parent / output_name(entry["rel"])
        entry["out"] = str(target)
        if resume and writer.is_current(entry["info"]["expid"], entry["input_hash"]) \
                and target.exists():
            report.skipped.append(entry["info"]["expid"])
        else:
            todo.append(entry)
    utc = config.survey.utc_offset
    owns_client = client is None
    cluster = None
    if owns_client:
        client, cluster = _start_client(scheduler, workers, threads_per_worker, dashboard_address)
    report.dashboard = client.dashboard_link
    try:
        if progress:
            print(f"{len(paths)} RED files, {len(todo)} to calibrate, {len(report.skipped)} up to "
                  f"date, {len(failed)} unreadable; {len({e['info']['setup'] for e in todo})} "
                  f"setup(s); dashboard: {client.dashboard_link}", flush=True)
        ctx = (perf_report(filename=str(performance_report)) if performance_report
               else contextlib.nullcontext())
        with ctx:
            _run_graph(client, todo, catalog_ds, grid, config, writer, report, utc, progress,
                       flush_every, as_completed)
            if config.survey.fallback:
                _run_fallback(client, todo, writer, report, config, utc, progress)
    finally:
        if owns_client:
            client.close()
            if cluster is not None:
                cluster.close()
    report.elapsed = time.time() - start
    if progress:
        print(report.summary(), flush=True)
        print(f"archive: {writer.path}", flush=True)
    return report


def _run_graph(client, todo, catalog_ds, grid_path, config, writer, report, utc, progress,
               flush_every, as_completed):
    by_setup = {}
    for entry in todo:
        by_setup.setdefault(entry["info"]["setup"], []).append(entry)
    catalog_future = client.scatter(catalog_ds, broadcast=True)
    futures = []
    for setup_key, group in by_setup.items():
        prepared = client.submit(_prepare_task, str(grid_path), group[0]["path"], config,
                                 key=f"prepare-{setup_key}", retries=2)
        for entry in group:
            futures.append(client.submit(
                _calibrate_task, entry["path"], entry["out"], catalog_future, prepared,
                str(grid_path), config, setup_key, entry["input_hash"], utc,
                key=f"calibrate-{entry['info']['expid']}", retries=2, pure=False))
    bar = _Progress(len(futures), progress)
    pending, last = [], time.time()
    by_key = {f"calibrate-{e['info']['expid']}": e for e in todo}
    for future in as_completed(futures):
        entry = by_key[future.key]
        try:
            result = future.result()
        except Exception as err:  # the task could not run at all (e.g. workers kept dying)
            result = {"expid": entry["info"]["expid"], "status": "failed",
                      "reason": f"task failed: {type(err).__name__}: {err}"}
        future.release()
        if result["status"] == "ok":
            pending.append(result["record"])
            report.calibrated.append(result["expid"])
        else:
            entry["failure"] = result
            report.failed[result["expid"]] = result["reason"]
        bar.update(result["status"] == "ok")
        if len(pending) >= flush_every or (pending and time.time() - last > 5.0):
            writer.append(pending)
            pending, last = [], time.time()
    writer.append(pending)


def _run_fallback(client, todo, writer, report, config, utc, progress):
    candidates = [e for e in todo if e.get("failure", {}).get("status") == "no standards"]
    futures = {}
    for entry in candidates:
        info = entry["info"]
        reference = _archive_reference(writer.path, info["setup"], info["mjd"],
                                       config.survey.fallback_window)
        if reference is None:
            report.failed[info["expid"]] += (f"; no archived calibration of setup {info['setup']}"
                                             f" within {config.survey.fallback_window:g} d")
            continue
        futures[client.submit(_fallback_task, entry["path"], entry["out"], reference, config,
                              info["setup"], entry["input_hash"], utc,
                              key=f"calibrate-fallback-{info['expid']}", retries=2)] = entry
    records = []
    for future, entry in futures.items():
        result = future.result()
        if result["status"] == "ok":
            records.append(result["record"])
            report.failed.pop(result["expid"], None)
            report.calibrated.append(result["expid"])
            report.fallback.append(result["expid"])
        else:
            report.failed[result["expid"]] += f"; archive fallback failed: {result['reason']}"
    writer.append(records)
    if progress and futures:
        print(f"{len(records)} exposure(s) without usable standards calibrated from the archive")
