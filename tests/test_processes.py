"""No process of the package outlives a command (issue 14).

Each command runs through its entry point in a subprocess, as a shell runs it, with a mark
in its environment that every process it starts inherits (pool workers, LocalCluster nannies
and workers, multiprocessing's resource tracker). After the command exits, no process with
the mark may remain, wherever it was reparented: after a normal run, after an error, after
Ctrl-C from a terminal (SIGINT to the whole process group), SIGINT to the command alone, and
SIGTERM.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
import uuid

import psutil
import pytest
from conftest import ENTRY_POINT

MARK = "KSPEC_FLUXCAL_TEST_MARK"
#: How long processes may take to go once the command has exited (a worker's last write).
GRACE = 10.0
#: Signals sent to interrupt a command: (name, send(proc), expected exit status).
INTERRUPTS = {
    "ctrl-c": (lambda proc: os.killpg(proc.pid, signal.SIGINT), 130),
    "sigint": (lambda proc: proc.send_signal(signal.SIGINT), 130),
    "sigterm": (lambda proc: proc.send_signal(signal.SIGTERM), 128 + signal.SIGTERM),
}


def _marked(mark):
    """Live processes whose environment carries ``mark``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def run_command(tmp_path, *args, interrupt=None, when=None, timeout=180):
    """Run ``kspec-fluxcal args``; optionally send ``interrupt`` once ``when(children)`` is
    true. Returns (exit status, output, most descendants seen at once); asserts that no
    marked process is left ``GRACE`` seconds after the command exited."""
    mark = uuid.uuid4().hex
    log = tmp_path / f"{mark}.log"
    env = {**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1"}
    most = 0
    with open(log, "w") as stream:
        # A test run started in the background by a non-interactive shell ignores SIGINT,
        # and the command would inherit that: it starts with the default disposition.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen([str(ENTRY_POINT), *map(str, args)], stdout=stream,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                children = _children(proc.pid)
                most = max(most, len(children))
                if interrupt is not None and when(children):
                    INTERRUPTS[interrupt][0](proc)
                    interrupt = None
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    deadline = time.monotonic() + GRACE
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left running: {[p.info['cmdline'] for p in left]}\n{log.read_text()}"
    if interrupt is not None:
        raise NotInterrupted(f"the command ended before the moment to interrupt it came "
                             f"(status {proc.returncode})")
    return proc.returncode, log.read_text(), most


class NotInterrupted(Exception):
    """The command finished before ``when`` was true: the interruption was never sent."""


def _children(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _workers_started(n):
    """``when``: once ``n`` Python processes besides multiprocessing's resource tracker run."""
    def started(children):
        return sum("resource_tracker" not in " ".join(_cmdline(c)) for c in children) >= n
    return started


def _cmdline(proc):
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _grid_build(inputs, tmp_path):
    return ("grid", "build", inputs["bosz"], "--out", tmp_path / "g.zarr", "--workers", "2")


def _survey(inputs, tmp_path, *extra):
    sv = inputs["survey"]
    return ("survey", sv / "lake", "--catalog", sv / "catalog.csv", "--grid", inputs["cube"],
            "--out", tmp_path / "out", "--workers", "2", *extra)


def test_grid_build_pool_ends_with_the_build(command_inputs, tmp_path):
    code, output, most = run_command(tmp_path, *_grid_build(command_inputs, tmp_path))
    assert code == 0, output
    assert most >= 2  # the pool's workers ran


@pytest.mark.cluster
def test_survey_cluster_ends_with_the_job(command_inputs, tmp_path):
    code, output, most = run_command(tmp_path, *_survey(command_inputs, tmp_path))
    assert code == 0, output
    assert "4 calibrated" in output and most >= 2


@pytest.mark.parametrize(("args", "status"), [
    pytest.param(lambda i, t: ("calibrate", i["red"], "--catalog", i["catalog"], "--grid",
                               i["cube"], "--out", t / "cal"), 0, id="calibrate"),
    pytest.param(lambda i, t: ("info", i["red"]), 0, id="info"),
    pytest.param(lambda i, t: ("calibrate", i["red"], "--catalog", t / "missing.csv", "--grid",
                               i["cube"], "--out", t / "cal"), 1, id="error"),
])
def test_single_process_commands_leave_nothing(command_inputs, tmp_path, args, status):
    code, output, _ = run_command(tmp_path, *args(command_inputs, tmp_path))
    assert code == status, output


@pytest.fixture(scope="module")
def larger_grid(tmp_path_factory):
    """A BOSZ-layout grid of ~50 files: its build lasts long enough (~0.5 s with 2 workers)
    to be interrupted once the pool's workers exist (the small grid's 18 files are built in
    a few hundredths of a second)."""
    from kspec_fluxcal.sim import write_synthetic_grid

    return write_synthetic_grid(tmp_path_factory.mktemp("larger_grid"), small=True,
                                teffs=range(5000, 8001, 250), workers=2)


@pytest.mark.parametrize("interrupt", INTERRUPTS)
def test_interrupted_grid_build_leaves_nothing(larger_grid, tmp_path, interrupt):
    # A build can end before its pool's workers are seen (a busy machine): tried again.
    for attempt in range(3):
        where = tmp_path / str(attempt)
        where.mkdir()
        try:
            code, output, _ = run_command(where, *_grid_build({"bosz": larger_grid}, where),
                                          interrupt=interrupt, when=_workers_started(2))
            break
        except NotInterrupted:
            continue
    else:
        pytest.fail("the build always ended before its workers were seen")
    assert code == INTERRUPTS[interrupt][1], output
    assert "Traceback" not in output


@pytest.mark.cluster
@pytest.mark.parametrize(("interrupt", "moment"), [
    ("ctrl-c", "start-up"), ("sigterm", "start-up"), ("sigint", "calibrating")])
def test_interrupted_survey_leaves_nothing(command_inputs, tmp_path, interrupt, moment):
    """Interrupted once the cluster's worker processes exist (its nannies run in the
    command's own process: they may still be starting), or once a first exposure is
    calibrated."""
    out = tmp_path / "out"
    # glob skips the hidden temporary stores, which may vanish while they are listed.
    when = (_workers_started(2) if moment == "start-up"
            else lambda _: bool(glob.glob(str(out / "*" / "KS*_fluxcal.fits"))))
    code, output, _ = run_command(tmp_path, *_survey(command_inputs, tmp_path, "--quiet"),
                                  interrupt=interrupt, when=when)
    assert code == INTERRUPTS[interrupt][1], output
    assert "Traceback" not in output and "Fatal" not in output
