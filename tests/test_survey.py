"""The survey job on a real dask.distributed LocalCluster (2 worker processes, loopback).

One cluster, one small simulated lake (8 exposures of two setups, 1024 and 1340 pixels, 8
fibers) and one uninterrupted reference run are shared by the module; every other run is
compared with the reference, bit for bit (archive arrays and calibrated FITS data; only
timestamps may differ).
"""

from __future__ import annotations

import csv
import datetime
import glob
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from astropy.io import fits
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

from kspec_fluxcal import cli
from kspec_fluxcal._lock import exclusive
from kspec_fluxcal.config import Config
from kspec_fluxcal.errors import FluxCalError, FluxCalWarning, InputError
from kspec_fluxcal.exposure import configuration_key, open_exposure
from kspec_fluxcal.grid.build import build_grid
from kspec_fluxcal.sim import Setup, compare_with_truth, simulate_survey, write_synthetic_grid
from kspec_fluxcal.survey import (
    WORKER_MALLOC_ENV,
    SurveyReport,
    discover,
    local_cluster,
    run_survey,
    write_notes,
)
from kspec_fluxcal.survey.archive import ArchiveWriter, open_archive

#: Seed of the kill points of the interrupted-job test.
KILL_SEED = 20261101
N_EXPOSURES = 8
#: Archive columns that legitimately differ between runs of the same inputs.
VOLATILE = ("calibrated_at", "source")


# ----------------------------------------------------------------------------- fixtures


class GraphRecorder(SchedulerPlugin):
    """Records, on the scheduler, what the survey's graph looked like when it ran."""

    name = "kspec-test-graph-recorder"

    def __init__(self, scheduler):
        self.scheduler = scheduler  # LocalCluster: the scheduler lives in this process
        self.dependencies = {}  # key -> keys it depended on
        self.processing_on = {}  # key -> workers it was sent to, in order
        self.holders = {}  # dependency key -> workers holding it when a task was sent
        self.computed = set()  # keys run by a worker (not scattered)

    def transition(self, key, start, finish, *args, **kwargs):
        ts = self.scheduler.tasks.get(key)
        if ts is None or finish != "processing":
            return
        self.computed.add(key if isinstance(key, str) else repr(key))
        self.dependencies[key] = {d.key for d in ts.dependencies}
        self.processing_on.setdefault(key, []).append(ts.processing_on.address)
        for dep in ts.dependencies:
            self.holders.setdefault(dep.key, set()).update(w.address for w in dep.who_has)


@pytest.fixture(scope="module")
def bosz(tmp_path_factory):
    return write_synthetic_grid(tmp_path_factory.mktemp("bosz") / "bosz", small=True, workers=2)


@pytest.fixture(scope="module")
def cube(bosz, tmp_path_factory):
    return build_grid(bosz, tmp_path_factory.mktemp("cube") / "grid.zarr", progress=False)


SETUPS = (Setup("a", pixels=1024, fibers=8), Setup("b", pixels=1340, fibers=8))


@pytest.fixture(scope="module")
def survey(bosz, tmp_path_factory):
    """The simulated lake: two setups in turn, so both prepare tasks are exercised."""
    out = simulate_survey(tmp_path_factory.mktemp("survey") / "sv", exposures=N_EXPOSURES,
                          nights=2, seed=3, grid=bosz,
                          setups=SETUPS)
    return out, json.loads((out / "survey.json").read_text())


@pytest.fixture(scope="module")
def cluster():
    # LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0",
    # processes=True), with the survey's malloc settings for the workers.
    with local_cluster(2, 1, "127.0.0.1:0") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    # Not the default scheduler: other tests keep their synchronous one.
    with Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def reference(survey, cube, cluster, client, tmp_path_factory):
    """An uninterrupted run, with the scheduler's view of its graph recorded."""
    sv, _ = survey
    out = tmp_path_factory.mktemp("reference") / "out"
    recorder = GraphRecorder(cluster.scheduler)
    cluster.scheduler.add_plugin(recorder)
    try:
        report = run_survey(sv / "lake", catalog=sv / "catalog.csv", grid=cube, out=out,
                            client=client, progress=False)
    finally:
        cluster.scheduler.remove_plugin(name=recorder.name)
    return out, report, recorder


@pytest.fixture
def workers_back(client):
    """Tests that kill workers leave the cluster with its two workers again."""
    yield
    client.wait_for_workers(2, timeout=60)


def _run(survey, cube, out, client, **kwargs):
    sv, _ = survey
    kwargs.setdefault("progress", False)
    return run_survey(kwargs.pop("lake", sv / "lake"), catalog=sv / "catalog.csv", grid=cube,
                      out=out, client=client, **kwargs)


def _run_with(killer, survey, cube, out, client):
    """:func:`_run` while ``killer`` (a thread's target) acts on the cluster."""
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        return _run(survey, cube, out, client)
    finally:
        thread.join()


def _survey_args(survey, cube, out, *extra, lake=None):
    sv, _ = survey
    return ["survey", str(lake or sv / "lake"), "--catalog", str(sv / "catalog.csv"),
            "--grid", str(cube), "--out", str(out), *extra]


# ----------------------------------------------------------------------------- helpers


def _quality_rows(out):
    """quality.csv's rows by EXPID."""
    with open(out / "quality.csv", newline="") as f:
        return {row["expid"]: row for row in csv.DictReader(f)}


def _raw_rows(out):
    """Rows ever committed to the archive (a duplicate append would show here)."""
    return int(ArchiveWriter(out / "archive.zarr").rows)


def _archive_table(out):
    """The archive's current rows as numpy arrays by column, sorted by EXPID."""
    ds = open_archive(out / "archive.zarr").compute()
    order = np.argsort(ds["expid"].values)
    return {name: np.asarray(ds[name].values)[order]
            for name in [*ds.data_vars, *ds.coords] if ds[name].dims[:1] == ("exposure",)}


def _assert_rows_equal(table, ref, expids=None):
    """Bitwise equality of archive rows (NaN == NaN), except timestamps and source paths."""
    pick = slice(None) if expids is None else np.isin(ref["expid"], list(expids))
    mine = slice(None) if expids is None else np.isin(table["expid"], list(expids))
    for name, values in ref.items():
        if name in VOLATILE:
            continue
        a, b = table[name][mine], values[pick]
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b, err_msg=name)  # NaN-aware, exact
        else:
            assert np.array_equal(a, b), name


def _outputs(out):
    """Calibrated products under ``out``. glob skips hidden entries: the job's temporary
    stores, which may vanish while they are listed (rglob then raised, 1 run in many)."""
    return sorted(Path(p).relative_to(out)
                  for p in glob.glob(str(out / "**" / "*_fluxcal.fits"), recursive=True))


def _assert_fits_equal(a, b):
    """Every HDU's data and header identical, HISTORY timestamps aside."""
    diff = fits.FITSDiff(str(a), str(b), ignore_keywords=["HISTORY"])
    assert diff.identical, diff.report()
    with fits.open(a) as ha, fits.open(b) as hb:
        # HISTORY cards start with a timestamp (add_history): compare the text after it.
        history = [[str(c)[20:] for c in h[0].header.get("HISTORY", [])] for h in (ha, hb)]
        assert history[0] == history[1]


def _modified_copy(src, dst, expid, *, lose_standards=False, header=None):
    """A copy of a RED file with another EXPID (and header changes, or unmatched standards)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with fits.open(src) as hdul:
        hdul[0].header["EXPID"] = expid
        for key, value in (header or {}).items():
            hdul[0].header[key] = value
        if lose_standards:  # ids absent from the catalog, positions 1 degree away
            table = hdul["FIBRES"].data
            standard = np.char.strip(table["TYPE"].astype(str)) == "C"
            table["OBJID"][standard] = 1 + np.arange(standard.sum())
            table["RA"][standard] += 1.0
        hdul.writeto(dst)
    return Path(dst)


def _lake_file(survey, expid):
    sv, manifest = survey
    entry = next(e for e in manifest["exposures"] if e["expid"] == expid)
    return sv / entry["path"], entry


def _expids(survey, setup=None):
    _, manifest = survey
    return [e["expid"] for e in manifest["exposures"] if setup in (None, e["setup"])]


# ----------------------------------------------------------------------------- plain runs


def test_discover_skips_hidden_files_and_the_output_directory(tmp_path):
    for rel in ("n1/a.fits", "n1/.b.fits", ".hidden/c.fits", "out/d_fluxcal.fits", "e.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    found = discover(tmp_path, "**/*.fits", exclude=(tmp_path / "out",))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["n1/a.fits"]
    with pytest.raises(InputError, match="no such lake"):
        discover(tmp_path / "none")


def test_file_hash_is_the_sha1_of_the_whole_file(tmp_path):
    # Part of every exposure's input hash (resume): any size, one buffer's worth or more.
    import hashlib

    from kspec_fluxcal.survey.job import _file_hash

    rng = np.random.default_rng(1)
    for size in (0, 1, 2880, (1 << 18) + 7, 600_000):
        path = tmp_path / f"f{size}"
        path.write_bytes(rng.bytes(size))
        assert _file_hash(path) == hashlib.sha1(path.read_bytes()).hexdigest()



def test_plan_reads_each_file_once_and_hashes_what_it_read(red_file, tmp_path, monkeypatch):
    # Each file's bytes are read once and hashed, a plain file's parsed (astropy reads one
    # with a long string's CONTINUE cards): the same info and hash as read apart.
    import pickle

    from kspec_fluxcal import fits_bytes
    from kspec_fluxcal.exposure import read_exposure_info
    from kspec_fluxcal.survey.job import _file_hash, read_for_plan

    plain, other = red_file(name="plain.fits"), red_file(name="other.fits",
                                                         header={"OBSERVER": "x" * 100})
    assert fits_bytes.read_plain(str(plain), ("FIBRES",)) is not None
    assert fits_bytes.read_plain(str(other), ("FIBRES",)) is None
    expected = [(read_exposure_info(p), _file_hash(p), None) for p in (plain, other)]
    reads = []
    monkeypatch.setattr(fits_bytes, "read_bytes", lambda path, read=fits_bytes.read_bytes: (
        reads.append(path), read(path))[1])
    got = read_for_plan([plain, other, tmp_path / "missing.fits"])
    assert pickle.dumps(got[:2]) == pickle.dumps(expected)
    assert reads[:3] == [plain, other, tmp_path / "missing.fits"]  # once each
    assert got[2][:2] == (None, None) and "missing.fits" in got[2][2]

def test_tasks_give_the_free_heap_back_every_few_tasks(monkeypatch):
    # Every TRIM_EVERY-th task, failed or not, ends with malloc_trim(0); without glibc, none.
    from kspec_fluxcal.survey import cluster
    from kspec_fluxcal.survey.tasks import run_task

    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    def broken():
        raise ValueError("a bug")

    monkeypatch.setattr(cluster, "_tasks_done", itertools.count(1))
    monkeypatch.setattr(cluster.ctypes, "CDLL", lambda name: Libc())
    results = [run_task(f"e{k}", broken if k % 2 else dict) for k in range(2 * cluster.TRIM_EVERY)]
    assert [r["status"] for r in results[:2]] == ["ok", "failed"]
    assert calls == [0, 0]

    def no_glibc(name):
        raise OSError("no C library here")

    monkeypatch.setattr(cluster.ctypes, "CDLL", no_glibc)
    for _ in range(cluster.TRIM_EVERY):
        run_task("e", dict)
    assert calls == [0, 0]


def test_task_results_travel_pickled_once():
    # A task's result is one pickle to size and send; the client receives the dict itself,
    # arrays bit for bit, or unpacks it when it shares the worker's process.
    import pickle
    from types import SimpleNamespace

    from dask.sizeof import sizeof
    from distributed.protocol import deserialize, serialize

    from kspec_fluxcal.survey.tasks import Packed, outcome

    cal = np.linspace(0.5, 2.0, 3000, dtype=np.float32)
    result = {"expid": "e1", "status": "ok", "notes": ["a note"], "quality": {"grade": "A"},
              "record": {"cal": cal, "cal_mask": cal > 1.0, "row": {"expid": "e1"},
                         "star": {"teff": [5800.0, 6100.0]}}}
    packed = Packed(result)
    assert sizeof(packed) >= len(packed.blob) > cal.nbytes
    for received in (pickle.loads(pickle.dumps(packed)), deserialize(*serialize(packed))):
        assert type(received) is dict and received.keys() == result.keys()
        assert received["record"]["cal"].dtype == np.float32
        assert received["record"]["cal"].tobytes() == cal.tobytes()
        assert received["record"]["star"] == result["record"]["star"]
    future = SimpleNamespace(status="finished", release=lambda: None)
    report = SimpleNamespace(notes={})
    unpacked = outcome(future, packed, "e1", report)
    assert type(unpacked) is dict and unpacked["quality"] == {"grade": "A"}
    assert report.notes == {"e1": ["a note"]}


def test_long_lived_objects_frozen_while_the_job_works():
    # The job's work runs with the objects alive before it frozen (not scanned by full
    # collections), given back to the collector after it, also when it fails; a process
    # that froze objects itself keeps them frozen.
    import gc

    from kspec_fluxcal.survey.tasks import long_lived_frozen

    gc.unfreeze()
    try:
        alive = [object() for _ in range(1000)]
        with pytest.raises(RuntimeError), long_lived_frozen():
            assert gc.get_freeze_count() >= len(alive)
            raise RuntimeError("the work failed")
        assert gc.get_freeze_count() == 0
        gc.freeze()
        frozen = gc.get_freeze_count()
        with long_lived_frozen():
            assert gc.get_freeze_count() >= frozen
        assert gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()


def test_library_task_prepares_the_library_pre_blurred_for_its_exposures(cube):
    """The job's library task gets the line spreads of its configuration's exposures: the
    library the workers receive is pre-blurred for the narrowest (issue 14)."""
    from kspec_fluxcal.grid import open_grid
    from kspec_fluxcal.lsf import LineSpread
    from kspec_fluxcal.survey.job import _library_task
    from kspec_fluxcal.templates import prepare_library

    spreads = [LineSpread.constant(13.0), LineSpread.constant(10.0)]
    library = _library_task(str(cube), (3000.0, 9000.0), Config(), None, spreads)
    alone = prepare_library(open_grid(cube), (3000.0, 9000.0), line_spreads=spreads[1:])
    assert "blurred_norm" in library
    assert library.attrs["library_key"] == alone.attrs["library_key"]


def test_commits_end_on_the_archives_chunk_boundaries(monkeypatch):
    """After a commit that ends inside a chunk of the archive's rows (a resume, a commit made
    by time), the next one is shortened to end on a chunk boundary (64 rows): a commit that
    starts inside a chunk decodes and encodes again the chunks it shares with the last."""
    import contextlib
    from types import SimpleNamespace

    from kspec_fluxcal.survey import tasks

    class Future:
        status = "finished"

        def release(self):
            pass

    class Writer:
        batch_size = ArchiveWriter.batch_size

        def __init__(self, rows):
            self.rows, self.batches = rows, []

        def append(self, records):
            if records:
                self.batches.append(len(records))
                self.rows += len(records)

    def commits(rows, n, every):
        results = [(Future(), {"expid": f"e{i}", "status": "ok"}) for i in range(n)]
        monkeypatch.setattr(tasks, "as_completed_pairs",
                            lambda client, futures: contextlib.nullcontext(iter(results)))
        writer = Writer(rows)
        tasks.collect(SimpleNamespace(status="running"),
                      {f: {"info": {"expid": r["expid"]}} for f, r in results}, writer,
                      SimpleNamespace(notes={}, checkpoint=lambda: None), lambda e, r: r,
                      flush=(every, 1e9))
        return writer.batches

    assert commits(0, 150, 64) == [64, 64, 22]
    assert commits(37, 200, 64) == [27, 64, 64, 45]
    assert commits(60, 20, 6) == [4, 6, 6, 4]



def _fails(x):
    raise ValueError(f"bad {x}")


def _held(name):
    """Runs until the Dask Event ``name`` is set (a task that is still running when the test
    cancels it, and frees its worker when told to)."""
    from distributed import Event

    Event(name).wait(60)


@pytest.mark.cluster
def test_results_are_gathered_as_as_completed_gives_them(client, monkeypatch):
    """Finished, failed and cancelled tasks' (future, result) pairs, gathered in batches
    (straight from the workers of this machine's cluster) or, when a batch cannot be
    gathered, one by one, are as_completed's with results; left early, the tasks still to
    run are cancelled."""
    from distributed import Event, as_completed

    from kspec_fluxcal.survey.cluster import as_completed_pairs, gather_directly

    def submitted(tag):
        futures = client.map(lambda x: x * 2, range(6), key=[f"double-{tag}-{k}" for k in range(6)])
        futures.append(client.submit(_fails, 7, key=f"fails-{tag}"))
        # Kept for a worker that does not exist: cancelled before it can run (a sleep started
        # before the cancellation reached its worker held it for 30 s, as_completed waiting)
        futures.append(client.submit(time.sleep, 30, key=f"sleeps-{tag}",
                                     workers=["tcp://127.0.0.1:9"], allow_other_workers=False))
        client.cancel(futures[-1])
        return futures

    def seen(pairs):  # a failure's (type, exception, traceback): the traceback apart
        return sorted((f.key, f.status, repr(r[:2] if isinstance(r, tuple) else r))
                      for f, r in pairs)

    assert gather_directly(client)
    expected = seen(as_completed(submitted("a"), loop=client.loop, with_results=True,
                                 raise_errors=False))
    with as_completed_pairs(client, submitted("b")) as pairs:
        assert seen(pairs) == [(key.replace("-a", "-b"), status, result.replace("-a", "-b"))
                               for key, status, result in expected]
    assert [status for _, status, _ in expected] == ["finished"] * 6 + ["error", "cancelled"]

    def gather_fails(*args, **kwargs):  # e.g. a worker holding a result died since
        raise OSError("lost")

    monkeypatch.setattr(client, "gather", gather_fails)  # each result then asked for alone
    with as_completed_pairs(client, submitted("d")) as pairs:
        assert seen(pairs) == [(key.replace("-a", "-d"), status, result.replace("-a", "-d"))
                               for key, status, result in expected]
    monkeypatch.undo()
    release = Event("release-c", client=client)
    slow = [client.submit(time.sleep, 0.01, key="nap-c"),
            client.submit(_held, "release-c", key="sleeps-c")]
    try:
        with pytest.raises(KeyboardInterrupt), as_completed_pairs(client, slow) as pairs:
            next(pairs)
            raise KeyboardInterrupt
        client.gather(client.map(time.sleep, [0.01], key=["after-c"]))  # a worker free again
        assert slow[1].status == "cancelled"
    finally:
        release.set()  # the cancelled task's worker free for the next tests


def test_results_are_gathered_straight_from_workers_on_this_machine_only():
    from types import SimpleNamespace

    from kspec_fluxcal.survey.cluster import gather_directly

    def client(scheduler, workers, direct=None):
        def info(n_workers):
            if workers is None:
                raise OSError("no answer")
            return {"workers": dict.fromkeys(workers, {})}
        return SimpleNamespace(direct_to_workers=direct, scheduler_info=info,
                               scheduler=SimpleNamespace(address=scheduler))

    local = ["tcp://127.0.0.1:4001", "tcp://[::1]:4002", "tcp://localhost:4003",
             "inproc://10.1.2.3/77/1"]
    assert gather_directly(client("tcp://127.0.0.1:8786", local))
    assert not gather_directly(client("tcp://127.0.0.1:8786", [*local, "tcp://10.0.0.5:4004"]))
    assert not gather_directly(client("tcp://node7:8786", local))  # a host name: unknown
    assert not gather_directly(client("tcp://127.0.0.1:8786", None))
    assert gather_directly(client("tcp://10.0.0.5:8786", [], direct=True))  # as it was told
    assert not gather_directly(client("tcp://127.0.0.1:8786", local, direct=False))

def test_a_directory_that_is_not_an_archive_is_refused(tmp_path):
    (tmp_path / "archive.zarr").mkdir()
    with pytest.raises(InputError, match="not a calibration archive"):
        ArchiveWriter(tmp_path / "archive.zarr")


def test_cluster_settings_give_way_to_the_users():
    """The survey's cluster settings replace distributed's defaults, not a user's values."""
    import dask
    import distributed  # noqa: F401 (its defaults)

    from kspec_fluxcal.survey.cluster import TUNED, _tuned

    assert _tuned() == TUNED
    key = "distributed.admin.system-monitor.interval"
    with dask.config.set({key: "3s"}):
        assert _tuned() == {k: v for k, v in TUNED.items() if k != key}
    with dask.config.set({key: dask.config.get(key)}):  # distributed's own: ours
        assert _tuned() == TUNED


@pytest.mark.cluster
def test_survey_on_local_cluster(survey, reference, client):
    """Every exposure calibrated once, archived once, and calibrated correctly."""
    sv, manifest = survey
    out, report, _ = reference
    # Both setups cover 3500-8500 A: one template library serves them, prepared by one task
    # (on one worker; pre-blurred there for both setups' line spreads) and passed to the
    # others, never re-prepared per exposure or setup.
    cached = client.run(lambda: sorted(__import__("kspec_fluxcal.templates",
                                                  fromlist=["_LIBRARIES"])._LIBRARIES._items))
    held = [key for keys in cached.values() for key in keys]
    assert len(held) == 2 and held[1].startswith(f"{held[0]}-blur"), cached
    # The workers run with the survey's malloc settings (set before they were spawned).
    env = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC_ENV})
    assert all(e == WORKER_MALLOC_ENV for e in env.values()), env
    # ... and without the statistical profiler, whose history grew their memory by ~0.15 MB
    # per exposure: the workers kept no call tree.
    kept = client.run(lambda dask_worker: len(dask_worker.profile_history)
                      + len(dask_worker.profile_keys_history))
    assert not any(kept.values()), kept
    # ... and with their memory checked every MEMORY_MONITOR_INTERVAL, by themselves and by
    # their nannies (distributed's 100 ms woke each ten times a second).
    from dask.utils import parse_timedelta

    from kspec_fluxcal.survey.cluster import MEMORY_MONITOR_INTERVAL

    for nanny in (False, True):
        every = client.run(lambda dask_worker: dask_worker.periodic_callbacks[
            "memory_monitor"].callback_time, nanny=nanny)
        assert set(every.values()) == {1000 * parse_timedelta(MEMORY_MONITOR_INTERVAL)}, every
    # ... sampling the system every SYSTEM_MONITOR_INTERVAL, and with the modules of their
    # tasks imported and frozen as they started (a worker's full garbage collections scan only
    # what came later).
    from kspec_fluxcal.survey.cluster import SYSTEM_MONITOR_INTERVAL

    sampled = client.run(lambda dask_worker: dask_worker.periodic_callbacks[
        "monitor"].callback_time)
    assert set(sampled.values()) == {1000 * parse_timedelta(SYSTEM_MONITOR_INTERVAL)}, sampled
    frozen = client.run(lambda: __import__("gc").get_freeze_count())
    assert all(n > 10_000 for n in frozen.values()), frozen
    expids = _expids(survey)
    assert report.ok, report.failed
    assert sorted(report.calibrated) == sorted(expids)
    assert report.skipped == [] and report.fallback == []
    assert report.dashboard and report.dashboard.startswith("http://127.0.0.1:")
    assert _raw_rows(out) == N_EXPOSURES
    table = _archive_table(out)
    assert list(table["expid"]) == sorted(expids)
    assert set(table["fcalsrc"]) == {"standards"}
    # Each row names its instrument configuration (pixels, fibers, range to 100 A).
    configuration = {s.name: configuration_key(s.wavelength, s.fibers) for s in SETUPS}
    setups = {e["expid"]: configuration[e["setup"]] for e in manifest["exposures"]}
    assert [setups[e] for e in table["expid"]] == list(table["setup"])
    assert set(table["setup"]) == {"n1024-f8-3500-8500", "n1340-f8-3500-8500"}
    assert np.all(table["n_stars_used"] >= 1)
    # Per-Angstrom calibrations of both setups land on the same archive grid.
    inside = np.all(table["cal_mask"], axis=0)
    assert inside.sum() > 1000 and np.all(np.isfinite(table["cal"][:, inside]))
    assert _outputs(out) == sorted(Path(e["path"]).relative_to("lake").with_name(
        f"{e['expid']}_fluxcal.fits") for e in manifest["exposures"])
    for entry in manifest["exposures"]:
        rel = Path(entry["path"]).relative_to("lake")
        metrics = compare_with_truth(out / rel.with_name(f"{entry['expid']}_fluxcal.fits"),
                                     sv / entry["truth"])
        assert abs(metrics["level_cal"]) < 0.02 and metrics["cal_shape"] < 0.02, metrics


@pytest.mark.cluster
def test_graph_has_named_tasks_a_catalog_task_and_library_futures(survey, reference):
    _, _, graph = reference
    prepare = sorted(k for k in graph.computed if k.startswith("library-"))
    calibrate = sorted(k for k in graph.computed if k.startswith("calibrate-"))
    catalog = sorted(k for k in graph.computed if k.startswith("catalog-"))
    # One library task for the configuration (both setups: 3500-8500 A, served by the
    # 3000-9000 A library), one calibrate task per exposure, one catalog task.
    assert [k.rsplit("-", 1)[0] for k in prepare] == ["library-3000-9000"]
    assert [k.rsplit("-", 1)[0] for k in calibrate] == sorted(
        f"calibrate-{e}" for e in _expids(survey))
    assert len(catalog) == 1
    assert graph.computed == set(prepare) | set(calibrate) | set(catalog), graph.computed
    print(f"graph: {len(graph.computed)} tasks for {N_EXPOSURES} exposures "
          f"({len(graph.computed) / N_EXPOSURES:.2f} per exposure)")
    # Each calibrate task depends on the library and the one catalog task's result: both
    # are futures (a task the scheduler can run again), not data embedded in the task.
    for key in calibrate:
        deps = graph.dependencies[key]
        assert len(deps) == 2
        (mine,) = [d for d in deps if d.startswith("library-")]
        assert deps - {mine} == set(catalog)
    # Both workers calibrated exposures.
    assert len({graph.processing_on[k][-1] for k in calibrate}) == 2


@pytest.mark.cluster
def test_every_worker_killed_at_once_loses_no_exposure(survey, cube, reference, client,
                                                       tmp_path, workers_back):
    """SIGKILL both workers at once after the first results (an OOM kill of the node): a
    scattered catalog died with them and every exposure still to do failed ('already
    forgotten'); the catalog is a task the scheduler runs again, and all are calibrated as
    in the undisturbed run."""
    out = tmp_path / "out"
    pids = client.run(os.getpid)
    killed = []

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if len(_outputs(out)) >= 2:
                for pid in pids.values():
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)
                return
            time.sleep(0.005)

    report = _run_with(killer, survey, cube, out, client)
    assert killed, "the run finished before the workers could be killed"
    assert report.ok, report.failed
    assert sorted(report.calibrated) == sorted(_expids(survey))
    _assert_rows_equal(_archive_table(out), _archive_table(reference[0]))


@pytest.mark.cluster
def test_worker_killed_mid_task_is_retried_elsewhere(survey, cube, reference, cluster,
                                                     client, tmp_path, workers_back):
    """SIGKILL a worker while it runs a calibrate task, after the first results are in: the
    nanny restarts it, the task runs again on a live worker, and the results equal the
    undisturbed run's, every exposure archived exactly once."""
    ref_out = reference[0]
    out = tmp_path / "out"
    pids = client.run(os.getpid)
    killed = {}

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if len(_outputs(out)) >= 2:
                busy = {w: [k for k in keys if str(k).startswith("calibrate-")]
                        for w, keys in client.processing().items()}
                victim = next((w for w, keys in busy.items() if keys and w in pids), None)
                if victim is not None:
                    os.kill(pids[victim], signal.SIGKILL)
                    killed.update(worker=victim, keys=busy[victim])
                    return
            time.sleep(0.005)

    recorder = GraphRecorder(cluster.scheduler)
    cluster.scheduler.add_plugin(recorder)
    try:
        report = _run_with(killer, survey, cube, out, client)
    finally:
        cluster.scheduler.remove_plugin(name=recorder.name)
    assert killed, "the run finished before a worker could be killed"
    assert report.ok, report.failed
    assert sorted(report.calibrated) == sorted(_expids(survey))
    # Tasks the dead worker held were sent again, to a live worker, and finished.
    retried = [k for k in killed["keys"] if len(recorder.processing_on.get(k, ())) > 1]
    assert retried, (killed, recorder.processing_on)
    for key in retried:
        assert recorder.processing_on[key][0] == killed["worker"]
        assert recorder.processing_on[key][-1] != killed["worker"]
    assert _raw_rows(out) == N_EXPOSURES
    _assert_rows_equal(_archive_table(out), _archive_table(ref_out))
    assert _outputs(out) == _outputs(ref_out)
    for rel in _outputs(ref_out):
        _assert_fits_equal(out / rel, ref_out / rel)


def test_bad_exposures_are_reported_and_do_not_stop_the_others(survey, cube, reference,
                                                               client, tmp_path, capsys):
    """Through the CLI: files truncated inside the data and inside the headers (refused at
    planning), one without its FIBRES table (fails in its task, on a worker, without taking
    the library task down: that task reads no exposure), one whose
    standards are not in the catalog and a duplicate EXPID are each reported with their
    reason; the good exposures are calibrated and archived as in the reference; exit
    status 1."""
    ref_out = reference[0]
    lake = tmp_path / "lake"
    good = _expids(survey)[:2]
    for expid in good:
        src, entry = _lake_file(survey, expid)
        dst = lake / Path(entry["path"]).relative_to("lake")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    src, _ = _lake_file(survey, good[0])
    bad = lake / "bad"
    data = _modified_copy(src, tmp_path / "tmp" / "a.fits", "BAD_TRUNC").read_bytes()
    bad.mkdir()
    (bad / "trunc_data.fits").write_bytes(data[: int(0.6 * len(data))])
    (bad / "trunc_head.fits").write_bytes(data[:2880])
    _modified_copy(src, bad / "nostd.fits", "BAD_NO_STD", lose_standards=True)
    with fits.open(_modified_copy(src, tmp_path / "tmp" / "b.fits", "BAD_NO_FIBRES")) as hdul:
        del hdul["FIBRES"]
        (lake / "00first").mkdir()
        hdul.writeto(lake / "00first" / "no_fibres.fits")
    shutil.copy(src, bad / "duplicate.fits")

    code = cli.main(_survey_args(survey, cube, tmp_path / "out", "--scheduler",
                                 client.scheduler.address, lake=lake))
    text = capsys.readouterr().out
    assert code == 1
    # Configurations a (1024 pixels) and b (1340), which share one template library.
    assert ("7 RED files, 4 to calibrate, 0 up to date, 3 refused (unreadable or duplicate); "
            "2 instrument configuration(s)") in text
    assert "2 calibrated (0 from the archive), 0 skipped as up to date, 5 failed" in text
    failed = {line.split(":", 1)[0].split()[-1]: line for line in text.splitlines()
              if line.strip().startswith("FAILED")}
    assert set(failed) == {"bad/trunc_data.fits", "bad/trunc_head.fits", "BAD_NO_STD",
                           "BAD_NO_FIBRES", "bad/duplicate.fits"}
    assert "truncated" in failed["bad/trunc_data.fits"]
    assert "truncated" in failed["bad/trunc_head.fits"]
    assert "FIBRES" in failed["BAD_NO_FIBRES"]
    assert "no usable standard star" in failed["BAD_NO_STD"]
    assert "no catalog match" in failed["BAD_NO_STD"]
    assert f"duplicate EXPID {good[0]}" in failed["bad/duplicate.fits"]
    # Failures (and notes) are also in OUT/notes.json, named in the summary.
    saved = json.loads((tmp_path / "out" / "notes.json").read_text())
    assert set(saved["failed"]) == set(failed)
    assert f"notes and failures: {tmp_path / 'out' / 'notes.json'}" in text
    # Non-TTY progress: whole lines, no carriage returns.
    assert "\r" not in text
    # BAD_NO_STD is counted apart: the survey model could still calibrate such an exposure.
    assert "4/4 exposures done (1 failed, 1 without a usable standard)" in text
    table = _archive_table(tmp_path / "out")
    assert sorted(table["expid"]) == sorted(good)
    _assert_rows_equal(table, _archive_table(ref_out), good)


def test_archive_fallback_for_an_exposure_without_usable_standards(survey, cube, reference,
                                                                  client, tmp_path):
    """[survey] fallback = true: an exposure whose standards are not in the catalog gets
    FCALSRC='archive', calibrated from the median of the archived calibrations of its setup
    within the window; one too far in time from any is still reported as failed."""
    ref_out = reference[0]
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    src, entry = _lake_file(survey, _expids(survey, "a")[0])
    lake = tmp_path / "lake"
    _modified_copy(src, lake / "near.fits", "FALLBACK_NEAR", lose_standards=True)
    _modified_copy(src, lake / "far.fits", "FALLBACK_FAR", lose_standards=True,
                   header={"MJD-OBS": entry["mjd"] + 30.0})
    config = Config().replace(survey__fallback=True)
    report = _run(survey, cube, out, client, lake=lake, config=config)
    assert report.calibrated == ["FALLBACK_NEAR"] and report.fallback == ["FALLBACK_NEAR"]
    assert list(report.failed) == ["FALLBACK_FAR"]
    assert "no usable standard star" in report.failed["FALLBACK_FAR"]
    assert "no archived calibration of setup" in report.failed["FALLBACK_FAR"]

    table = _archive_table(out)
    assert _raw_rows(out) == N_EXPOSURES + 1
    row = list(table["expid"]).index("FALLBACK_NEAR")
    assert table["fcalsrc"][row] == "archive" and table["n_stars_used"][row] == 0
    assert table["setup"][row] == configuration_key(SETUPS[0].wavelength, SETUPS[0].fibers)
    # Expected: the median over the configuration's standards rows of cal x exptime (per
    # Angstrom, on the archive grid), brought to this exposure's pixels and exposure time.
    same = (table["setup"] == table["setup"][row]) & (table["fcalsrc"] == "standards")
    assert same.sum() == len(_expids(survey, "a"))
    curve = np.median(table["cal"][same] * table["exptime"][same, None], axis=0)
    calibrated = open_exposure(out / "near_fluxcal.fits")
    wave = calibrated["wavelength"].values
    expected = np.interp(wave, open_archive(out / "archive.zarr")["wavelength"].values, curve)
    expected /= calibrated.attrs["exptime"] * np.gradient(wave)
    inside = np.isfinite(expected)
    assert inside.sum() > 0.99 * wave.size
    np.testing.assert_allclose(calibrated["cal"].values[inside], expected[inside], rtol=1e-9)
    # Its archive row is that calibration again (interpolated back onto the archive grid).
    ratio = table["cal"][row] / (curve / table["exptime"][row])
    assert abs(np.nanmedian(ratio) - 1) < 1e-3 and np.nanmax(np.abs(ratio - 1)) < 0.05
    with fits.open(out / "near_fluxcal.fits") as hdul:
        header = hdul[0].header
        assert header["FCALSRC"] == "archive" and header["FCALNSTR"] == 0
        assert any("archived calibration" in str(h) for h in header["HISTORY"])


@pytest.mark.cluster
def test_a_large_lake_is_planned_on_the_cluster(survey, cube, reference, client, tmp_path,
                                                monkeypatch, capsys):
    """Above PLAN_ON_CLUSTER files, the RED files are read for the plan in plan-* tasks (a
    client reading 10^5 headers would keep every worker idle for minutes): the same plan,
    the same archive rows to the bit, progress as files are read; an unreadable file is
    refused as the client would refuse it."""
    from distributed import get_task_stream

    import kspec_fluxcal.survey.job as job

    monkeypatch.setattr(job, "PLAN_ON_CLUSTER", 0)
    monkeypatch.setattr(job, "PLAN_BATCH", 3)
    lake = tmp_path / "lake"
    shutil.copytree(survey[0] / "lake", lake)
    (lake / "broken.fits").write_bytes(b"not a FITS file")
    with get_task_stream(client=client) as stream:
        report = _run(survey, cube, tmp_path / "out", client, lake=lake, progress=True)
    plans = sorted(str(t["key"]) for t in stream.data if str(t["key"]).startswith("plan-"))
    assert len(plans) == -(-(N_EXPOSURES + 1) // 3)  # ceil: 9 files in batches of 3
    assert sorted(report.calibrated) == sorted(reference[1].calibrated)
    assert list(report.failed) == ["broken.fits"] and "not a FITS file" in report.failed[
        "broken.fits"]
    _assert_rows_equal(_archive_table(tmp_path / "out"), _archive_table(reference[0]))
    out = capsys.readouterr().out
    assert f"{N_EXPOSURES + 1}/{N_EXPOSURES + 1} RED files read (1 failed)" in out
    assert f"{N_EXPOSURES + 1} RED files, {N_EXPOSURES} to calibrate" in out


def test_resume_skips_current_exposures_and_recalibrates_changed_ones(survey, cube, reference,
                                                                     client, tmp_path, capsys):
    """Resume works from the input hash (file content, not its path); without --resume every
    exposure is recalibrated and its row replaced, one current row per EXPID throughout."""
    sv, _ = survey
    ref_out = reference[0]
    lake, out = tmp_path / "lake", tmp_path / "out"
    shutil.copytree(sv / "lake", lake)  # moved lake, same contents: still up to date
    shutil.copytree(ref_out, out)
    ref = _archive_table(ref_out)

    notes_before = json.loads((out / "notes.json").read_text())["notes"]
    assert notes_before  # the reference run's skipped stars and warnings
    assert cli.main(_survey_args(survey, cube, out, "--resume", lake=lake)) == 0
    text = capsys.readouterr().out
    assert "8 RED files, 0 to calibrate, 8 up to date" in text
    assert "0 calibrated (0 from the archive), 8 skipped as up to date, 0 failed" in text
    assert "dashboard" not in text  # nothing to compute: no cluster started
    assert _raw_rows(out) == N_EXPOSURES
    # The whole survey stays on record, not only this run's (none) exposures.
    assert _quality_rows(out) == _quality_rows(ref_out)
    assert json.loads((out / "notes.json").read_text())["notes"] == notes_before

    changed, lost, cut = _expids(survey)[:3]
    path = lake / Path(_lake_file(survey, changed)[1]["path"]).relative_to("lake")
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["AIRMASS"] = 1.7
    rel = Path(_lake_file(survey, lost)[1]["path"]).relative_to("lake")
    (out / rel.with_name(f"{lost}_fluxcal.fits")).unlink()
    rel = Path(_lake_file(survey, cut)[1]["path"]).relative_to("lake")
    product = out / rel.with_name(f"{cut}_fluxcal.fits")
    os.truncate(product, product.stat().st_size // 2 + 1)  # a damaged copy: done again
    report = _run(survey, cube, out, client, lake=lake, resume=True)
    assert sorted(report.calibrated) == sorted([changed, lost, cut])
    assert sorted(report.skipped) == sorted(set(_expids(survey)) - {changed, lost, cut})
    assert _raw_rows(out) == N_EXPOSURES + 3
    assert cli.main(["info", str(product)]) == 0
    table = _archive_table(out)
    assert sorted(table["expid"]) == sorted(_expids(survey))  # one current row per EXPID
    row = list(table["expid"]).index(changed)
    assert table["airmass"][row] == 1.7 and table["input_hash"][row] != ref["input_hash"][row]
    _assert_rows_equal(table, ref, set(_expids(survey)) - {changed})
    assert sorted(_quality_rows(out)) == sorted(_expids(survey))

    report = _run(survey, cube, out, client, lake=lake,  # no resume: everything again
                  performance_report=tmp_path / "perf.html")
    assert sorted(report.calibrated) == sorted(_expids(survey)) and report.skipped == []
    assert (tmp_path / "perf.html").stat().st_size > 10_000
    assert _raw_rows(out) == 2 * N_EXPOSURES + 3
    again = _archive_table(out)
    assert sorted(again["expid"]) == sorted(_expids(survey))
    _assert_rows_equal(again, table)
    assert np.all(again["calibrated_at"] >= table["calibrated_at"])


def test_archive_plot_command(reference, tmp_path, capsys):
    out = reference[0]
    assert cli.main(["archive", "plot", str(out / "archive.zarr"), "--out",
                     str(tmp_path / "plots")]) == 0
    assert capsys.readouterr().out.count("wrote ") == 4  # the survey's two setups, apart
    assert sorted(p.relative_to(tmp_path / "plots").as_posix()
                  for p in (tmp_path / "plots").rglob("*.png")) == [
        f"{setup}/{name}" for setup in ("n1024-f8-3500-8500", "n1340-f8-3500-8500")
        for name in ("throughput_image.png", "throughput_vs_time.png")]


# ----------------------------------------------------------------------------- killed jobs


def _group_alive(pgid):
    """Live (non-zombie) processes of a process group."""
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _kill_group(proc):
    """SIGKILL the job and its LocalCluster (its own session), and wait until all are gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, f"orphans left: {_group_alive(proc.pid)}"
        time.sleep(0.1)


def _new_outputs(out, since):
    """Outputs newer than ``since``, listed while the job writes: os.walk skips directories
    that vanish under it (temporary ones), which Path.rglob does not."""
    found = []
    for root, _, files in os.walk(out):
        for name in files:
            if name.endswith("_fluxcal.fits") and not name.startswith("."):
                try:
                    if os.stat(os.path.join(root, name)).st_mtime_ns > since:
                        found.append(Path(root) / name)
                except FileNotFoundError:  # renamed or removed since the listing
                    pass
    return found


def _check_partial_archive(out, ref_out, ref):
    """A killed job's archive: readable, and only complete exposures, equal to the reference."""
    if not (out / "archive.zarr").exists():
        return 0
    table = _archive_table(out)
    # Rows are committed once each: runs after the first resume, so nothing is replaced.
    assert _raw_rows(out) == len(set(table["expid"])) == len(table["expid"])
    _assert_rows_equal(table, ref, set(table["expid"]))
    for expid in table["expid"]:
        rel = next(r for r in _outputs(ref_out) if r.name == f"{expid}_fluxcal.fits")
        _assert_fits_equal(out / rel, ref_out / rel)
    return len(table["expid"])


@pytest.mark.cluster
def test_killed_job_resumes_to_identical_results(survey, cube, reference, client, tmp_path,
                                                 capsys, report_line):
    """The CLI job (with its own LocalCluster) SIGKILLed three times at seeded points, each
    time after some calibrated files appeared, plus a seeded delay that lands the kill in a
    task, a transfer or an archive commit; the first run is a plain one, the next ones use
    --resume. After each kill the archive is readable and holds only complete exposures,
    identical to the reference; a last --resume finishes the survey, each exposure
    archived exactly once, archive and files bitwise equal to the uninterrupted run."""
    ref_out = reference[0]
    ref = _archive_table(ref_out)
    out = tmp_path / "out"
    rng = np.random.default_rng(KILL_SEED)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = []
    for attempt in range(3):
        archived = _check_partial_archive(out, ref_out, ref)
        todo = N_EXPOSURES - archived
        # Kill after `after` new files (0: during start-up), then `delay` seconds more.
        after = int(rng.integers(1, todo)) if todo > 1 else 0
        delay = float(rng.uniform(0.0, 0.3))
        since = time.time_ns()
        extra = ["--workers", "2", "--quiet"] + (["--resume"] if attempt else [])
        with open(tmp_path / f"run{attempt}.log", "w") as stream:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kspec_fluxcal", *_survey_args(survey, cube, out, *extra)],
                stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                deadline = time.monotonic() + 120
                while len(_new_outputs(out, since)) < after and proc.poll() is None:
                    assert time.monotonic() < deadline, "the job made no progress"
                    time.sleep(0.005)
                time.sleep(delay if after else 3.0 + delay)
                finished = proc.poll() is not None
            finally:
                _kill_group(proc)
        assert not finished, (tmp_path / f"run{attempt}.log").read_text()
        committed = _check_partial_archive(out, ref_out, ref)
        log.append(f"kill {attempt + 1}: after {after} new file(s) + {delay:.3f} s -> "
                   f"{committed}/{N_EXPOSURES} archived, {len(_outputs(out))} files")

    capsys.readouterr()
    code = cli.main(_survey_args(survey, cube, out, "--resume", "--scheduler",
                                 client.scheduler.address))
    text = capsys.readouterr().out
    assert code == 0, text
    assert "0 failed" in text and "skipped as up to date" in text
    assert _raw_rows(out) == N_EXPOSURES  # each exposure committed exactly once overall
    table = _archive_table(out)
    _assert_rows_equal(table, ref)
    assert _outputs(out) == _outputs(ref_out)
    for rel in _outputs(ref_out):
        _assert_fits_equal(out / rel, ref_out / rel)
    for line in log:
        report_line(f"{Path(__file__).name}: {line}")


def test_notes_go_to_a_file_named_in_the_summary(tmp_path):
    """Issue 16: the summary said '(SurveyReport.notes)', which a CLI user cannot read.
    Notes and failures are kept in OUT/notes.json, per EXPID, across runs: an exposure
    calibrated again gets its new notes, one skipped keeps its old ones."""
    first = SurveyReport(calibrated=["E1", "E2"], failed={"E3": "no usable standard star"},
                         notes={"E1": ["fiber 3 skipped"], "E2": ["a note"]})
    path = write_notes(tmp_path, first)
    assert path == tmp_path / "notes.json"
    assert "2 exposure(s) with notes in this run; notes and failures: " + str(path) in \
        first.summary()
    assert "SurveyReport.notes" not in first.summary()
    second = SurveyReport(calibrated=["E2", "E3"], fitted=["E2", "E3"], skipped=["E1"],
                          notes={"E3": ["other"]})
    write_notes(tmp_path, second)
    saved = json.loads(path.read_text())
    assert saved["notes"] == {"E1": ["fiber 3 skipped"], "E3": ["other"]}
    assert saved["failed"] == {}
    assert "1 exposure(s) with notes in this run" in second.summary()


def test_a_lost_scheduler_stops_the_job_with_its_own_error():
    """A task cancelled because the scheduler is gone is not a failure of its exposure (they
    were recorded as failed and the job went on to a confusing error 20 s later)."""
    from types import SimpleNamespace

    from kspec_fluxcal.errors import SchedulerLostError
    from kspec_fluxcal.survey.tasks import check_scheduler

    client = SimpleNamespace(status="running", scheduler=SimpleNamespace(address="tcp://h:1"))
    done = SimpleNamespace(status="finished")
    cancelled = SimpleNamespace(status="cancelled")
    check_scheduler(client, done, {})
    check_scheduler(client, cancelled, RuntimeError("worker died thrice"))  # its own failure
    with pytest.raises(SchedulerLostError, match=r"lost the Dask scheduler \(tcp://h:1\).*"
                       r"--resume"):
        check_scheduler(client, cancelled, "cancelled for reason: scheduler-connection-lost")
    client.status = "connecting"
    with pytest.raises(SchedulerLostError):
        check_scheduler(client, cancelled, None)


def test_notes_and_quality_are_saved_as_the_run_goes(tmp_path):
    """A job killed by SIGKILL runs no clean-up: notes.json and quality.csv are saved at
    archive commits (at most every CHECKPOINT s), so that it loses at most that much."""
    report = SurveyReport(out=tmp_path, planned=["E1", "E2"], fitted=["E1"],
                          calibrated=["E1"], notes={"E1": ["a note"]},
                          quality={"E1": {"grade": "A", "used": 2, "standards": 2,
                                          "fcalrms": 0.01, "fcalmerr": 0.02, "fcallsf": 1.0}})
    report.checkpoint()
    assert json.loads((tmp_path / "notes.json").read_text())["notes"] == {"E1": ["a note"]}
    assert "E1,calibrated,A" in (tmp_path / "quality.csv").read_text()
    report.notes["E2"] = ["later"]
    report.checkpoint()  # within CHECKPOINT s of the last save: nothing written
    assert "E2" not in (tmp_path / "notes.json").read_text()
    report.save()
    assert json.loads((tmp_path / "notes.json").read_text())["notes"]["E2"] == ["later"]


def test_an_earlier_model_stages_notes_go_once_it_succeeds(tmp_path):
    first = SurveyReport(calibrated=["E1"], fitted=["E1"], planned=["E1"], notes={"E1": [
        "fiber 3 skipped", "survey model recalibration failed, own calibration kept: x"]})
    write_notes(tmp_path, first)
    second = SurveyReport(calibrated=["E1"], planned=["E1"])  # recalibrated, not refitted
    write_notes(tmp_path, second)
    assert json.loads((tmp_path / "notes.json").read_text())["notes"] == {
        "E1": ["fiber 3 skipped"]}


def test_a_summary_lists_the_first_failures_and_counts_the_rest():
    """5080 duplicate EXPIDs made a summary of 5080 lines."""
    report = SurveyReport(failed={f"F{k:03d}.fits": "duplicate EXPID" for k in range(60)})
    lines = report.summary().splitlines()
    assert sum(line.strip().startswith("FAILED") for line in lines) == report.LISTED
    assert lines[-1].strip() == f"... and {60 - report.LISTED} more failure(s)"


def test_notes_and_quality_keep_the_survey_across_runs(tmp_path):
    """A resumed or interrupted run keeps the notes and quality rows of the exposures it
    did not redo; one only recalibrated with the survey model keeps its first-pass notes;
    failures that no longer hold (the file was fixed, or left the lake) are dropped."""
    quality = {"grade": "A", "used": 2, "standards": 2, "fcalrms": 0.01, "fcalmerr": 0.02,
               "fcallsf": 1.01}
    first = SurveyReport(
        calibrated=["E1", "E2"], fitted=["E1", "E2", "E3"], planned=["E1", "E2", "E3", "E4"],
        failed={"E3": "no usable standard star", "night/bad.fits": "truncated"},
        notes={"E1": ["fiber 3 skipped"], "E2": ["a note"]},
        quality={"E1": quality, "E2": {**quality, "grade": "B"}})
    write_notes(tmp_path, first)
    first.write_quality(tmp_path / "quality.csv")
    # E1 up to date; E2 only recalibrated with the model, from the model alone (no fit);
    # E3 fixed and calibrated; E4 never reached; night/bad.fits replaced by a good file E5.
    second = SurveyReport(
        calibrated=["E2", "E3", "E5"], fitted=["E3", "E5"], skipped=["E1"],
        planned=["E1", "E2", "E3", "E4", "E5"], notes={"E2": ["model note"]},
        quality={"E2": {**quality, "fcalrms": np.nan, "fcallsf": np.nan, "source": "model"},
                 "E3": quality, "E5": quality})
    write_notes(tmp_path, second)
    saved = json.loads((tmp_path / "notes.json").read_text())
    assert saved["notes"] == {"E1": ["fiber 3 skipped"], "E2": ["a note", "model note"]}
    assert saved["failed"] == {}
    assert "rms n/a, model error 2.0%, LSF n/a, model" in second.summary()
    second.write_quality(tmp_path / "quality.csv")
    rows = _quality_rows(tmp_path)
    assert sorted(rows) == ["E1", "E2", "E3", "E5"]
    assert rows["E1"]["quality"] == "A" and rows["E2"]["source"] == "model"
    assert all(row["status"] == "calibrated" for row in rows.values())
    # E1 leaves the lake, E3 fails again with a reason that needs quoting.
    third = SurveyReport(fitted=["E3"], planned=["E2", "E3", "E5"],
                         failed={"E3": 'bad "header", line 2'})
    third.write_quality(tmp_path / "quality.csv")
    rows = _quality_rows(tmp_path)
    assert sorted(rows) == ["E2", "E3", "E5"]
    assert rows["E3"]["status"] == "failed" and rows["E3"]["reason"] == 'bad "header", line 2'


def _comm_sizeof_warnings():
    """Warnings distributed logs when it cannot size a message (as for the deeply nested
    profile data a performance report fetches), in the process this runs in."""
    import logging

    from distributed.sizeof import safe_sizeof

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("distributed.sizeof")
    logger.addHandler(handler)
    try:
        nested = {}
        for _ in range(500):
            nested = {"children": nested}
        assert safe_sizeof(nested, default_size=-1) == -1  # sizeof recursed too deep
    finally:
        logger.removeHandler(handler)
    return len(records)


@pytest.mark.cluster
def test_no_sizeof_warning_from_message_sizes(client):
    """Issue 16: 'distributed.sizeof - WARNING - Sizeof calculation for object of type 'dict'
    failed. Defaulting to -1 B' in every demo run: distributed's harmless estimate of a
    message's size (it then serializes it off the event loop), silenced in the workers of
    the survey's LocalCluster and in the process that runs its scheduler."""
    assert set(client.run(_comm_sizeof_warnings).values()) == {0}
    assert _comm_sizeof_warnings() == 0


def test_interrupted_jobs_messages_in_flight_are_not_tracebacks():
    """An interrupted survey closed its cluster while the client's loop was gathering a
    finished task's result, or a worker's heartbeat was under way: tornado or the worker
    logged the lost connection with a traceback after the job's one-line message. Those
    records are dropped, others are not."""
    import logging

    from kspec_fluxcal.survey.cluster import quiet_known_messages

    quiet_known_messages()
    logger = logging.getLogger("tornado.application")

    def shown(message):
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None)
        return all(f.filter(record) for f in logger.filters)

    assert not shown("Exception in callback functools.partial(<bound method IOLoop."
                     "_discard_future_result of <AsyncIOMainLoop>>, <Task finished "
                     "name='Task-567' coro=<as_completed._track_future() done, defined at "
                     "distributed/client.py:5687> exception=CommClosedError('Stream is "
                     "closed')>)")
    assert shown("Exception in callback <function something_else at 0x1>")
    worker = logging.getLogger("distributed.worker")
    record = worker.makeRecord(worker.name, logging.ERROR, __file__, 0,
                               "Failed to communicate with scheduler during heartbeat.", (), None)
    assert not all(f.filter(record) for f in worker.filters)


# ----------------------------------------------------------------------------- one writer


def _lock_of(pid, started):
    return json.dumps({"host": socket.gethostname(), "pid": pid, "started": started,
                       "command": "kspec-fluxcal survey (another job)"})


def _now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@pytest.fixture
def other_process():
    """A live process that is not this one (the owner of another job's lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_lock_refuses_a_second_writer(survey, cube, reference, client, tmp_path, capsys,
                                             other_process):
    """Issue 16: two jobs on one --out lost archive rows. A job finding the lock of a live
    process refuses before any work, with one line naming the lock and its owner."""
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "survey.lock"
    started = _now()
    lock.write_text(_lock_of(other_process.pid, started))
    code = cli.main(_survey_args(survey, cube, out, "--scheduler", client.scheduler.address))
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.splitlines() == [
        f"kspec-fluxcal: error: {lock}: another survey job is writing to {out}: pid "
        f"{other_process.pid} on this host ({socket.gethostname()}), started {started} "
        "(kspec-fluxcal survey (another job)); wait for it to "
        "finish (a lock left by a job that died is taken over automatically)"]
    assert sorted(p.name for p in out.iterdir()) == ["survey.lock"]  # nothing written
    assert json.loads(lock.read_text())["pid"] == other_process.pid  # its lock untouched
    # The same pid, but the lock is older than the process: the pid was reused, the job that
    # wrote the lock is gone.
    lock.write_text(_lock_of(other_process.pid, "2026-01-01T00:00:00+00:00"))
    with pytest.warns(FluxCalWarning, match="took over the lock"), exclusive(out) as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_stale_lock_is_taken_over_with_a_note_and_released(survey, cube, reference, client,
                                                            tmp_path):
    """A lock left by a job that died (same host, no such process) is taken over, with a
    note; the run ends without a lock, also when it fails."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "survey.lock").write_text(_lock_of(dead.pid, _now()))
    with pytest.warns(FluxCalWarning, match=rf"took over the lock {out / 'survey.lock'} of "
                                            rf"pid {dead.pid} .*no longer running"):
        report = _run(survey, cube, out, client, resume=True)
    assert report.ok and len(report.skipped) == N_EXPOSURES
    assert not (out / "survey.lock").exists()
    with pytest.raises(InputError, match="no RED file matches"):
        _run(survey, cube, out, client, pattern="*.none")
    assert not (out / "survey.lock").exists()


def test_two_concurrent_jobs_lose_no_rows(survey, cube, reference, client, tmp_path):
    """Two jobs started together on the same --out: one runs, the other is refused; every
    exposure the running one reports calibrated is archived."""
    out = tmp_path / "out"
    outcomes = [None, None]
    gate = threading.Barrier(2)

    def job(k):
        gate.wait()
        try:
            outcomes[k] = _run(survey, cube, out, client)
        except FluxCalError as err:
            outcomes[k] = err

    threads = [threading.Thread(target=job, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [o for o in outcomes if isinstance(o, FluxCalError)]
    reports = [o for o in outcomes if not isinstance(o, FluxCalError)]
    assert len(refused) == 1 and len(reports) == 1, outcomes
    assert "another survey job is writing to" in str(refused[0])
    table = _archive_table(out)
    assert sorted(table["expid"]) == sorted(reports[0].calibrated) == sorted(_expids(survey))
    assert _raw_rows(out) == N_EXPOSURES


def test_progress_counts_exposures_without_standards_apart(capsys, monkeypatch):
    """A first pass counted the exposures without a usable standard as failed ('25/25
    exposures done (7 failed)'), which the survey model then calibrated: the job ended with
    1 failure."""
    from kspec_fluxcal.survey.tasks import Progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    bar = Progress(4, True)
    for ok, no_standards in ((True, False), (False, True), (False, True), (False, False)):
        bar.update(ok, no_standards=no_standards)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("4/4 exposures done (1 failed, 2 without a usable standard), ")
    bar = Progress(1, True)
    bar.update(False)
    assert capsys.readouterr().out.startswith("1/1 exposures done (1 failed), ")
