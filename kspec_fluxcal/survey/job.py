"""The survey job: survey-wide recalibration as one Dask graph on dask.distributed.

Plan (headers only): discover the RED files, read what each needs for planning (EXPID, MJD,
wavelength range and line spread; on the client, or in ``plan-*`` tasks for a lake of more
than :data:`PLAN_ON_CLUSTER` files), hash its inputs, and group the exposures by
the template library that serves them (:func:`kspec_fluxcal.templates.library_range`: their
wavelength range plus the LSF's wings, rounded outward to 500 A, so that every exposure of
an instrument configuration shares one whatever its exact wavelength solution and line
spread). Graph: one ``library-<range>`` task per configuration (the template library,
~10-100 MB, computed once and moved to the workers that need it by the scheduler), one
``catalog-<hash>`` task that reads the catalog (a result the scheduler makes again if every
worker holding it dies), and one
``calibrate-<EXPID>`` task per exposure that fits, combines, applies and writes the
calibrated FITS file atomically and returns a small archive record: ~1 task per exposure.
The client commits records to ``archive.zarr`` in batches as tasks finish (at least every
``flush_interval`` seconds), so a killed job keeps what it had committed; ``resume=True``
skips exposures archived with the same inputs. A failing exposure is reported with its
reason and never stops the others; a worker that dies is replaced and its tasks retried
elsewhere. Warnings raised in a task are returned in the report, not printed by workers.

Then, with ``[model] enabled`` (the default), the survey model
(:mod:`kspec_fluxcal.survey.model_job`): fitted from the archive as a tree reduction
(``model-*`` tasks) and used to recalibrate (``recalibrate-<EXPID>`` tasks); exposures
without usable standards are calibrated from it. Last, with ``[survey] fallback``, exposures
still without a calibration get the archive fallback (:mod:`kspec_fluxcal.survey.fallback`).
The [model] options are not part of an exposure's input hash: they change the model (whose
identity each archive row records), not the exposure's own calibration.

Task keys are ``library-<range>-<token>`` and ``calibrate-<EXPID>-<token>``, the token a
hash of everything the task's result depends on (inputs, configuration, output path; see
:mod:`kspec_fluxcal.survey.tasks`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import __version__
from .._atomic import check_output_directory
from .._inputs import glob_problem
from .._lock import exclusive
from ..config import Config, load_config
from ..errors import FluxCalError, InputError, SchedulerLostError
from .cluster import as_completed_pairs, on_cluster
from .report import SurveyReport
from .tasks import (
    FLUSH_EVERY,
    FLUSH_INTERVAL,
    Packed,
    Progress,
    check_scheduler,
    collect,
    long_lived_frozen,
    run_task,
    scheduler_lost,
    task_failure,
    token,
)

__all__ = ["discover", "plan_survey", "run_survey"]


def discover(lake, pattern="**/*.fits", *, exclude=()):
    """RED files under ``lake`` matching ``pattern``.

    Hidden and temporary files (any path component starting with '.') are skipped, and so
    is everything under the directories in ``exclude`` (the survey's output directory, when
    it lies inside the lake: its calibrated files would otherwise be taken for RED files on
    the next run).
    """
    lake = Path(lake)
    if not lake.is_dir():
        raise InputError(lake, None, "not a directory (the lake is a directory of RED files)"
                         if lake.exists() else "no such lake directory")
    if problem := glob_problem(pattern):
        raise InputError(lake, f"pattern {pattern!r}", problem)
    excluded = [Path(e).resolve() for e in exclude]
    found = []
    for p in lake.glob(pattern):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(lake).parts):
            continue
        if excluded and any(p.resolve().is_relative_to(e) for e in excluded):
            continue
        found.append(p)
    return sorted(found)


def _file_hash(path):
    """The SHA-1 of a file's content (hex).

    ``hashlib.file_digest`` reads into one buffer it reuses: 0.53 against 0.72 ms of CPU
    for a RED file of 0.5 MB read in blocks of 1 MiB, each a fresh bytes object (100 files
    x 3, alternated)."""
    with open(path, "rb", buffering=0) as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def plan_survey(paths, *, lake, catalog_hash, grid_plan, config, read=None):
    """Read headers and hash inputs; returns (entries, failures).

    Each entry: path, rel (path under the lake), info (see
    :func:`kspec_fluxcal.read_exposure_info`), content_hash (of the RED file) and input_hash
    (RED file content, catalog, grid build, configuration, package version and the
    exposure's instrument configuration). ``failures`` maps the path under the lake of each
    file that cannot be planned (unreadable header, duplicate EXPID) to the reason.
    ``read``: what :func:`read_for_plan` returned for ``paths`` (read here when None; the
    survey job reads a large lake on its cluster).
    """
    settings = _settings(config)
    entries, failures, seen = [], {}, {}
    read = read_for_plan(paths) if read is None else read
    for path, (info, content, failure) in zip(paths, read, strict=True):
        rel = Path(path).relative_to(lake)
        if failure is not None:
            failures[str(rel)] = failure
            continue
        if info["expid"] in seen:
            failures[str(rel)] = f"duplicate EXPID {info['expid']} (also in {seen[info['expid']]})"
            continue
        seen[info["expid"]] = rel
        # The configuration too: it is the archive row's, which groups it for the survey
        # model (an archive of exact setups from before is recalibrated on --resume).
        digest = hashlib.sha1("|".join([content, catalog_hash, grid_plan, settings,
                                        __version__, info["setup"]]).encode()).hexdigest()
        entries.append({"path": str(path), "rel": str(rel), "info": info, "input_hash": digest,
                        "content_hash": content})
    return entries, failures


def read_for_plan(paths, bar=None):
    """What planning needs of each file: ``(info, content hash, None)``, or ``(None, None,
    reason)`` for a file that cannot be read (:func:`plan_survey`); ``bar``: a
    :class:`Progress` updated per file."""
    from ..exposure import read_exposure_info
    from ..fits_bytes import read_bytes

    out = []
    for path in paths:
        try:
            # One read: the bytes the reader parses are those hashed (0.12 ms less CPU per
            # lake file of 0.5 MB than reading it again); a file that is not a regular one is
            # read (or refused) by astropy, then hashed from the disk.
            content = read_bytes(path)
            out.append((read_exposure_info(path), _file_hash(path), None) if content is None
                       else (read_exposure_info(path, content=content),
                             hashlib.sha1(content).hexdigest(), None))
        except FluxCalError as err:
            out.append((None, None, str(err)))
        except Exception as err:  # anything astropy or the OS raises: report, go on
            out.append((None, None, f"{path}: unreadable ({type(err).__name__}: {err})"))
        if bar is not None:
            bar.update(out[-1][2] is None)
    return out


#: Lakes of more RED files than this show the client's reading of them for the plan
#: (~4 ms a file: 2 s).
PLAN_PROGRESS = 500


#: Lakes of more RED files than this are read for the plan on the cluster, in ``plan-*``
#: tasks of :data:`PLAN_BATCH` files: the client reads and hashes ~250 files a second (its
#: headers, through astropy, hold the GIL), a minute for 15000 before any work starts.
PLAN_ON_CLUSTER = 5000
PLAN_BATCH = 250


def _read_on_cluster(client, paths, progress):
    """:func:`read_for_plan` of ``paths`` in ``plan-<n>-<token>`` tasks on the cluster (the
    token names the batch's files, sizes and modification times: equal keys, equal work)."""
    batches = [[str(p) for p in paths[i:i + PLAN_BATCH]]
               for i in range(0, len(paths), PLAN_BATCH)]
    futures = {client.submit(read_for_plan, batch, retries=2,
                             key=f"plan-{k}-{token(*map(_identity, batch))}"): k
               for k, batch in enumerate(batches)}
    read, bar = [None] * len(batches), Progress(len(paths), progress, "RED files", "read")
    with as_completed_pairs(client, futures) as pairs:
        for future, result in pairs:
            k = futures[future]
            check_scheduler(client, future, result)
            if future.status != "finished":  # its workers kept dying: unreadable here
                result = [(None, None, f"{p}: {task_failure(result)}") for p in batches[k]]
            read[k] = result
            for _, _, failure in result:
                bar.update(failure is None)
            future.release()
    return [item for batch in read for item in batch]


def _identity(path):
    """A file as a task key names it: path, size, modification time (None: gone, which
    its reading reports)."""
    try:
        stat = os.stat(path)
    except OSError:
        return path, None
    return path, stat.st_size, stat.st_mtime_ns


# ----------------------------------------------------------------------------- tasks


def _library_task(grid_path, wave_range, config, cache_dir=None, line_spreads=None):
    """The template library of a configuration (see :func:`kspec_fluxcal.prepare_library`):
    read from the disk cache when an earlier job prepared it, pre-blurred for the
    ``line_spreads`` of its exposures where that pays."""
    import dask

    from ..grid import open_grid
    from ..templates import prepare_library

    # Synchronous inside a task: by default, Dask code running in a worker submits its
    # graph back to the cluster (here, the grid's chunks as tasks on other workers), which
    # costs transfers and can stall when every worker thread is busy preparing a library.
    with dask.config.set(scheduler="synchronous"):
        return prepare_library(open_grid(grid_path), wave_range, config, cache_dir=cache_dir,
                               line_spreads=line_spreads)


def _library_range(info):
    """The library range serving an exposure (from its header information)."""
    from ..templates import library_range

    return library_range(info["wave_range"], info["lsf"])


def _calibrate_task(path, out_path, catalog, library, config, setup_key, input_hash, utc_offset,
                    expid, provenance=None):
    """Calibrate one exposure; never raises for bad data: returns a status dict
    (:func:`kspec_fluxcal.survey.tasks.run_task`; "no standards" when none is usable)."""
    return Packed(run_task(expid, _calibrate, path, out_path, catalog, library, config,
                           setup_key, input_hash, utc_offset, provenance, no_standards=True))


def _calibrate(path, out_path, catalog, library, config, setup_key, input_hash, utc_offset,
               provenance):
    """The work of a calibrate task: calibrate, write the product; returns its archive
    record, notes and quality."""
    from ..exposure import open_exposure
    from ..pipeline import calibrate
    from ..products import write_calibrated
    from .archive import archive_record

    exposure = open_exposure(path)
    catalog, xp = ((catalog.catalog, catalog.xp) if isinstance(catalog, SimpleNamespace)
                   else (catalog, None))
    result = calibrate(exposure, catalog, library, config, xp=xp)
    result.calibrated.attrs["setup"] = setup_key
    write_calibrated(result.calibrated, out_path, overwrite=True, stars=result.stars)
    record = archive_record(result.calibrated, result.stars, result.calibration,
                            source=str(path), input_hash=input_hash, utc_offset=utc_offset,
                            provenance=provenance)
    return {"record": record, "notes": result.warnings,
            "nstar": int(result.calibration.attrs["fcalnstr"]), "quality": _quality(result)}


def _quality(result):
    """The quality record of a calibrated exposure (see :attr:`SurveyReport.quality`)."""
    attrs = result.calibration.attrs
    return {"grade": str(attrs.get("fcalqual", "")), "used": int(attrs.get("fcalnstr", 0)),
            "standards": int(result.stars.sizes.get("star", 0)),
            "fcalrms": float(attrs.get("fcalrms", np.nan)),
            "fcalmerr": float(attrs.get("fcalmerr", np.nan)),
            "fcallsf": float(attrs.get("fcallsf", np.nan))}


# ----------------------------------------------------------------------------- the job


def run_survey(lake, *, catalog, grid, out, config=None, scheduler=None, workers=None,
               threads_per_worker=1, performance_report=None, resume=False, pattern=None,
               progress=True, client=None, dashboard_address="127.0.0.1:8787",
               flush_every=FLUSH_EVERY, flush_interval=FLUSH_INTERVAL, xp=None, cache_dir=None):
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
        Skip exposures archived with the same inputs whose output file exists; without it
        every exposure is recalibrated and its archive row replaced.
    progress : bool
        Print the plan, the dashboard link, progress and the summary on stdout.
    client : distributed.Client, optional
        Use this client (tests, notebooks) instead of creating one; it is left open.
    dashboard_address : str
        Of the LocalCluster started when neither ``scheduler`` nor ``client`` is given.
    flush_every, flush_interval : int, float
        Results are committed to the archive in batches: when ``flush_every`` are waiting
        (fewer when that ends the archive's rows on a chunk boundary) or ``flush_interval``
        seconds after the previous commit, whichever comes first (default 64 and 10 s: a
        commit costs ~0.05 s and ~1.5 ms per record, see
        :data:`~kspec_fluxcal.survey.tasks.FLUSH_EVERY`). A killed job loses at most the
        uncommitted batch (recalibrated by ``resume``).
    xp : path-like, optional
        Gaia XP spectra of the standards (:func:`kspec_fluxcal.xp.read_xp`), read once and
        sent to every worker; part of every exposure's input hash.
    cache_dir : path-like, False or None
        Where the workers keep template libraries (see
        :func:`kspec_fluxcal.prepare_library`; None: the default location, as the workers
        see it).

    Returns
    -------
    SurveyReport
    """
    start = time.time()
    config = config if isinstance(config, Config) else load_config(config)
    out = Path(out)
    check_output_directory(out)
    out.mkdir(parents=True, exist_ok=True)
    # One job per output directory: two would both commit at the archive's row count and
    # one job's rows would be lost.
    with exclusive(out):
        planned = []  # the run's report once planned
        try:
            report = _survey(Path(lake), out, config, catalog=catalog, grid=grid,
                             resume=resume, xp=xp, cache_dir=cache_dir, pattern=pattern,
                             progress=progress, flush=(flush_every, flush_interval),
                             planned=planned,
                             cluster=dict(client=client, scheduler=scheduler, workers=workers,
                                          threads_per_worker=threads_per_worker,
                                          dashboard_address=dashboard_address,
                                          performance_report=performance_report))
        finally:
            # Also when interrupted: the notes and quality of what finished (committed to
            # the archive in the same finally of the collection) are not lost.
            if planned:
                quality = planned[0].save()
    report.elapsed = time.time() - start
    if progress:
        print(report.summary(), flush=True)
        print(f"archive: {report.archive}\nper-exposure quality: {quality}", flush=True)
    return report


def _survey(lake, out, config, *, catalog, grid, resume, pattern, progress, flush, cluster,
            planned, xp=None, cache_dir=None):
    """The job of :func:`run_survey`, under its lock: plan, then compute what is to do. The
    RED files are read for the plan here, or, in a lake of more than
    :data:`PLAN_ON_CLUSTER`, on the cluster. The report is appended to ``planned`` as
    soon as it exists."""
    from ..catalog import read_catalog
    from ..grid import open_grid
    from ..xp import read_xp

    catalog_path = Path(catalog)
    grid_ds = open_grid(grid)
    paths = discover(lake, pattern or config.survey.pattern, exclude=(out,))
    if not paths:
        raise InputError(lake, None, f"no RED file matches {pattern or config.survey.pattern!r}")
    inputs = SimpleNamespace(catalog=read_catalog(catalog_path),
                             xp=None if xp is None else read_xp(xp), grid=grid,
                             grid_plan=str(grid_ds.attrs.get("build_plan")), cache_dir=cache_dir,
                             # absolute: a worker's working directory may be another
                             catalog_path=catalog_path.absolute(),
                             xp_path=None if xp is None else Path(xp).absolute())
    catalog_hash = _file_hash(catalog_path) + ("" if xp is None else _file_hash(xp))
    inputs.catalog_hash = catalog_hash

    def plan(read):
        job = _plan(paths, read, lake=lake, out=out, config=config, resume=resume,
                    progress=progress, catalog_hash=catalog_hash, grid_plan=inputs.grid_plan)
        planned.append(job.report)
        return job

    def work(client, job):
        _work(client, job, inputs, config, out, progress, flush)

    if len(paths) <= PLAN_ON_CLUSTER:
        job = plan(read_for_plan(paths, Progress(len(paths), progress and len(paths) >
                                                 PLAN_PROGRESS, "RED files", "read")))
        if job.todo or job.model_work:
            job.report.dashboard = on_cluster(lambda client: work(client, job),
                                              progress=progress, **cluster)
        return job.report
    jobs = []

    def read_then_work(client):
        jobs.append(plan(_read_on_cluster(client, paths, progress)))
        if jobs[0].todo or jobs[0].model_work:
            work(client, jobs[0])

    dashboard = on_cluster(read_then_work, progress=progress, **cluster)
    jobs[0].report.dashboard = dashboard
    return jobs[0].report


def _plan(paths, read, *, lake, out, config, resume, progress, catalog_hash, grid_plan):
    """The plan of the job from the files' ``read`` (:func:`read_for_plan`): its entries,
    report, archive writer, the exposures to calibrate (``todo``) and whether the survey
    model has work (``model_work``); the plan's line printed."""
    from ..pipeline import output_name
    from .archive import ArchiveWriter

    entries, failed = plan_survey(paths, lake=lake, catalog_hash=catalog_hash,
                                  grid_plan=grid_plan, config=config, read=read)
    writer = ArchiveWriter(out / "archive.zarr")
    report = SurveyReport(failed=dict(failed), archive=writer.path, out=out,
                          planned=[entry["info"]["expid"] for entry in entries])
    todo = []
    for entry in entries:
        target = out / Path(entry["rel"]).parent / output_name(entry["rel"])
        entry["out"] = str(target)
        if resume and writer.is_current(entry["info"]["expid"], entry["input_hash"]) \
                and _whole_product(target):
            report.skipped.append(entry["info"]["expid"])
        else:
            todo.append(entry)
    if progress:
        configurations = len({e["info"]["setup"] for e in entries})
        print(f"{len(paths)} RED files, {len(todo)} to calibrate, {len(report.skipped)} up to "
              f"date, {len(failed)} refused (unreadable or duplicate); {configurations} "
              "instrument configuration(s) in the lake",
              flush=True)
    model_work = config.model.enabled and _model_pending(out, entries, writer, config)
    return SimpleNamespace(entries=entries, report=report, writer=writer, todo=todo,
                           model_work=model_work)


def _whole_product(path):
    """Whether a calibrated file is there and whole, as far as its size tells: FITS files
    are whole 2880-byte records, so a product cut short after it was written (a copy, a
    full disk) is calibrated again on resume. Opening each (~4 ms) would check more, but
    would cost a lake of 10^5 exposures minutes before any work."""
    from ..fits_file import BLOCK

    try:
        size = path.stat().st_size
    except OSError:
        return False
    return size > 0 and size % BLOCK == 0


def _work(client, job, inputs, config, out, progress, flush):
    """The job's work on the cluster: the first pass, the survey model, the fallback (a
    lost scheduler, whatever Dask raised for it, is said as such)."""
    try:
        with long_lived_frozen():
            _first_pass_and_model(client, job, inputs, config, out, progress, flush)
    except SchedulerLostError:
        raise
    except Exception as err:
        if client.status != "running":
            raise scheduler_lost(client) from err
        raise


def _first_pass_and_model(client, job, inputs, config, out, progress, flush):
    utc = config.survey.utc_offset
    # Read by a task (checked on the client first), not scattered: when every worker holding
    # a scattered copy died at once (an OOM kill, a node), it was gone, and every exposure
    # still to do failed ("already forgotten"); a task's result the scheduler makes again.
    # XP spectra travel with the catalog to the first pass, as one object.
    tag = inputs.catalog_hash[:16]
    catalog_future = client.submit(_read_inputs, inputs.catalog_path, None,
                                   key=f"catalog-{tag}")
    first = catalog_future if inputs.xp is None else client.submit(
        _read_inputs, inputs.catalog_path, inputs.xp_path, key=f"catalog-xp-{tag}")
    _run_graph(client, job.todo, first, (inputs.grid, inputs.grid_plan, inputs.cache_dir),
               config, job.writer, job.report, utc, progress, flush)
    if config.model.enabled:
        from .model_job import run_model

        run_model(client, job.entries, job.writer, job.report, config, out=out, utc=utc,
                  catalog=catalog_future, provenance=_provenance(config, inputs.grid_plan),
                  progress=progress, flush=flush)
    if config.survey.fallback:
        from .fallback import run_fallback

        run_fallback(client, job.todo, job.writer, job.report, config, utc, progress)


def _read_inputs(catalog_path, xp_path):
    """The catalog (with XP spectra: both, as one object) read on a worker."""
    from ..catalog import read_catalog
    from ..xp import read_xp

    catalog = read_catalog(catalog_path)
    return catalog if xp_path is None else SimpleNamespace(catalog=catalog, xp=read_xp(xp_path))


def _model_pending(out, entries, writer, config):
    """True when the survey model has work although no exposure is to calibrate (its
    options changed since the exposures were calibrated with it)."""
    from .model_job import stale_exposures

    return bool(stale_exposures(out, entries, writer, config))


def _settings(config):
    """The configuration as hashed into each exposure's inputs: [model] options change the
    survey model, not an exposure's own calibration (the model has its own identity)."""
    return json.dumps({k: v for k, v in config.to_dict().items() if k != "model"},
                      sort_keys=True)


def _provenance(config, grid_plan):
    """The archive rows' provenance: grid build and configuration hash (all options)."""
    return {"grid_id": grid_plan, "config_hash": config.digest()}


def _run_graph(client, todo, catalog_future, templates, config, writer, report, utc, progress,
               flush):
    """The first pass: one library task per configuration, one calibrate task per exposure,
    committed as they finish. ``templates`` is (grid store, its build plan, the library
    cache)."""
    grid_path, grid_plan, cache_dir = templates
    settings = _settings(config)
    by_range = {}
    for entry in todo:
        by_range.setdefault(_library_range(entry["info"]), []).append(entry)
    provenance = _provenance(config, grid_plan)
    tag = token(Path(grid_path).resolve(), grid_plan, settings)
    entries, libraries = [], []
    for wave_range, group in by_range.items():
        spreads = [entry["info"]["lsf"] for entry in group]  # the library pre-blurred for them
        library = client.submit(_library_task, str(grid_path), wave_range, config, cache_dir,
                                spreads, retries=2, key=f"library-{wave_range[0]:.0f}-"
                                f"{wave_range[1]:.0f}-{token(tag, [s.coeffs for s in spreads])}")
        entries += group
        libraries += [library] * len(group)
    # One graph for every exposure's task (one message to the scheduler, the configuration
    # pickled once), each still its own named task with its retries, in this order.
    n = len(entries)
    tasks = client.map(
        _calibrate_task, [e["path"] for e in entries], [e["out"] for e in entries],
        [catalog_future] * n, libraries, [config] * n, [e["info"]["setup"] for e in entries],
        [e["input_hash"] for e in entries], [utc] * n, [e["info"]["expid"] for e in entries],
        [provenance] * n, retries=2,
        key=[f"calibrate-{e['info']['expid']}-"
             f"{token(e['input_hash'], Path(e['out']).resolve())}" for e in entries]) \
        if entries else []
    futures = dict(zip(tasks, entries, strict=True))

    def handle(entry, result):
        expid = entry["info"]["expid"]
        report.fitted.append(expid)
        if result["status"] != "ok":
            entry["failure"] = result
            report.failed[expid] = result["reason"]
            return None
        report.calibrated.append(expid)
        report.quality[expid] = result["quality"]
        return result["record"]

    collect(client, futures, writer, report, handle, flush, Progress(len(futures), progress))
