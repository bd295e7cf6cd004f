"""What every task of the survey job shares: the token in its key, running one exposure's
work in a worker (warnings recorded as notes, failures returned, never raised), and
collecting results on the client as they finish, committed to the archive in batches, under
a progress bar.

Task keys are ``<kind>-<EXPID>-<token>``, the token a hash of everything the task's result
depends on (inputs, configuration, output path, the model): two jobs sharing a scheduler, or
a job resubmitted while a killed one's tasks are still known to it, would otherwise be
handed each other's results under a bare ``<kind>-<EXPID>`` key; with the token, equal keys
mean equal work.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import pickle
import sys
import time
import traceback
import warnings
from pathlib import Path

from ..errors import CalibrationError, FluxCalError, FluxCalWarning, SchedulerLostError
from .cluster import as_completed_pairs, trim_heap

__all__ = ["token", "run_task", "Packed", "task_notes", "internal_error", "collect", "outcome",
           "task_failure", "check_scheduler", "scheduler_lost", "Progress", "long_lived_frozen"]


def token(*parts):
    """8 hex digits naming the inputs of a task (see the module docstring)."""
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- in the workers


def run_task(expid, work, *args, no_standards=False):
    """Run one exposure's ``work(*args)`` in a worker; never raises for bad data or a bug.

    Dask runs synchronously inside (code running in a worker would otherwise submit its
    graph back to the cluster), and warnings are recorded, not printed: a worker's stderr is
    nobody's terminal.

    Parameters
    ----------
    expid : str
    work : callable
        Returns the task's result fields (``record``, ``quality``, ...), its own ``notes``
        first (a sequence of str, optional).
    *args
        Passed to ``work``.
    no_standards : bool
        Report a :class:`~kspec_fluxcal.CalibrationError` (no usable standard star) with
        status ``"no standards"`` rather than ``"failed"``.

    Returns
    -------
    dict
        ``expid``, ``status`` (``"ok"``, ``"no standards"`` or ``"failed"``) and either the
        work's fields, ``notes`` including the warnings raised (:func:`task_notes`), or
        ``reason``.
    """
    import dask

    try:
        with dask.config.set(scheduler="synchronous"), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = work(*args)
        result["notes"] = task_notes(result.get("notes", ()), caught)
        return {"expid": expid, "status": "ok", **result}
    except FluxCalError as err:
        status = "no standards" if no_standards and isinstance(err, CalibrationError) \
            else "failed"
        return {"expid": expid, "status": status, "reason": str(err)}
    except Exception as err:  # a bug must not stop the survey: report it with its place
        return {"expid": expid, "status": "failed", "reason": internal_error(err)}
    finally:
        trim_heap()


class Packed:
    """A task's result pickled once, in the task's own thread.

    A survey task's result is a dict of ~80 items (the archive record's arrays, its row and
    per-star fields, notes, quality), and distributed walks it item by item on the worker's
    event loop: to size it when it is stored and again to serialize it for the client, which
    unpacks it item by item too. Pickled in the task, it is one bytes object to size, send
    and receive (1.1-1.6 ms less worker CPU and 0.5-1.1 ms less client CPU per task, tasks
    returning a 140 kB record; see benchmarks/HISTORY.md). Unpickled, it is the result itself
    (``__reduce__``): the client receives the dict. A client that shares the worker's
    process (a cluster of threads) receives the ``Packed``: :func:`outcome` unpacks it.
    """

    __slots__ = ("blob",)

    def __init__(self, value):
        self.blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def __reduce__(self):
        return pickle.loads, (self.blob,)

    def __sizeof__(self):  # what distributed counts in the worker's memory
        return object.__sizeof__(self) + sys.getsizeof(self.blob)

    def value(self):
        """The result."""
        return pickle.loads(self.blob)


def task_notes(first, caught):
    """Warnings raised in a task as unique strings, FluxCal's first."""
    notes = list(first)
    for w in caught:
        if issubclass(w.category, FluxCalWarning):
            text = str(w.message)
        else:
            text = f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:{w.lineno})"
        if text not in notes:
            notes.append(text)
    return notes


def internal_error(err):
    """The reason reported for an unexpected exception: its type, message and place."""
    where = traceback.extract_tb(err.__traceback__)[-1]
    return (f"internal error {type(err).__name__}: {err} "
            f"({Path(where.filename).name}:{where.lineno})")


# ----------------------------------------------------------------------------- on the client


class Progress:
    """Progress on stdout: a bar redrawn in place on a terminal, else a line per 10 %, of
    ``total`` items (``noun``, ``verb``: "exposures done", "RED files read")."""

    def __init__(self, total, enabled, noun="exposures", verb="done"):
        self.total, self.enabled, self.done, self.failed = total, enabled, 0, 0
        self.no_standards = 0
        self.noun, self.verb = noun, verb
        self.tty = sys.stdout.isatty()
        self.start = time.time()
        self._last = -1

    def update(self, ok, no_standards=False):
        """One more item done: ``ok``, or failed; ``no_standards``: an exposure without a
        usable standard, counted apart (the survey model or the fallback may calibrate it
        later: counted as failed, a first pass said '7 failed' of a job that ended with 1)."""
        self.done += 1
        self.no_standards += 1 if no_standards else 0
        self.failed += 0 if ok or no_standards else 1
        if not self.enabled:
            return
        pct = int(100 * self.done / max(self.total, 1))
        failed = f"{self.failed} failed" + (f", {self.no_standards} without a usable standard"
                                            if self.no_standards else "")
        if self.tty:
            bar = "#" * (pct // 4)
            print(f"\r[{bar:<25}] {self.done}/{self.total} {self.noun}, {failed}, "
                  f"{time.time() - self.start:.0f} s", end="", flush=True)
            if self.done == self.total:
                print()
        elif pct // 10 != self._last or self.done == self.total:
            self._last = pct // 10
            print(f"{self.done}/{self.total} {self.noun} {self.verb} ({failed}), "
                  f"{time.time() - self.start:.0f} s", flush=True)


#: Archive commits: when this many records wait (fewer when that ends the rows on a chunk
#: boundary of the archive: :meth:`~kspec_fluxcal.survey.archive.ArchiveWriter.batch_size`),
#: or this many seconds after the last one. A commit costs ~0.05 s of the client's CPU and
#: ~1.5 ms per record (every archive array written): batches of 6 (1 s at 6 exposures/s)
#: cost ~10 ms per exposure, of 64 ~2 ms.
FLUSH_EVERY, FLUSH_INTERVAL = 64, 10.0


def collect(client, futures, writer, report, handle, flush=(FLUSH_EVERY, FLUSH_INTERVAL),
            bar=None):
    """Results of tasks as they finish; archive records committed in batches.

    Parameters
    ----------
    client : distributed.Client
    futures : dict of Future to dict
        Each task's plan entry (``info`` with its ``expid``).
    writer : kspec_fluxcal.survey.archive.ArchiveWriter
    report : kspec_fluxcal.survey.SurveyReport
        Gets the tasks' notes.
    handle : callable
        ``handle(entry, result)`` -> an archive record to commit, or None.
    flush : (int, float)
        Commit when this many records wait (fewer to end on a chunk boundary of the
        archive), or this many seconds after the last commit.
    bar : Progress, optional
    """
    flush_every, flush_interval = flush
    pending, last = [], time.monotonic()
    try:
        with as_completed_pairs(client, futures) as pairs:
            for future, result in pairs:
                entry = futures[future]
                check_scheduler(client, future, result)
                result = outcome(future, result, entry["info"]["expid"], report)
                record = handle(entry, result)
                if record is not None:
                    pending.append(record)
                if bar is not None:
                    bar.update(result["status"] == "ok",
                               no_standards=result["status"] == "no standards")
                if len(pending) >= writer.batch_size(flush_every) or (
                        pending and time.monotonic() - last >= flush_interval):
                    batch, pending = pending, []
                    writer.append(batch)
                    report.checkpoint()
                    last = time.monotonic()
    finally:
        # Also on Ctrl-C or a lost scheduler: keep what has finished.
        batch, pending = pending, []
        writer.append(batch)


@contextlib.contextmanager
def long_lived_frozen():
    """The objects alive as a job's work on the cluster starts (modules, the plan, the
    cluster's own) left out of the cyclic garbage collector's passes while it runs
    (:func:`gc.freeze`): the client's process makes objects fast (the graph, Dask's
    messages, Zarr's commits), and each full collection scanned them all: 2-3 in 500
    exposures on two workers, 0.1-0.15 s each (0.40-0.95 ms of CPU per exposure; frozen,
    0.01-0.04). They are given back to the collector when the work ends, unless the process
    had frozen objects itself before (a worker sharing the process, which freezes what its
    start-up made): then every frozen object stays frozen, as the process chose."""
    own = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if own:
            gc.unfreeze()


def check_scheduler(client, future, result):
    """Raise :class:`~kspec_fluxcal.errors.SchedulerLostError` when ``future`` did not finish
    because the scheduler is gone: not a failure of its exposure or file (they were recorded
    as such, and the job went on to the survey model for a confusing error 20 s later)."""
    if future.status != "finished" and (client.status != "running"
                                        or "scheduler-connection-lost" in repr(result)):
        raise scheduler_lost(client)


def scheduler_lost(client):
    """The :class:`~kspec_fluxcal.errors.SchedulerLostError` of ``client``'s scheduler."""
    address = getattr(client.scheduler, "address", None) or "?"
    return SchedulerLostError(f"lost the Dask scheduler ({address}): the job stopped; what "
                              "finished is committed, run it again with --resume on a live "
                              "cluster")


def outcome(future, result, expid, report):
    """A finished task's result dict (a failure when the task could not run at all, e.g.
    workers kept dying); its notes go to the report and the future is released."""
    if future.status != "finished":
        result = {"expid": expid, "status": "failed", "reason": task_failure(result)}
    elif isinstance(result, Packed):
        result = result.value()
    future.release()
    if result.get("notes"):  # the first pass's and the survey model's, in one run
        report.notes.setdefault(expid, []).extend(result["notes"])
    return result


def task_failure(result):
    """The exception of a task that could not run (``as_completed(raise_errors=False)``)."""
    err = result[1] if isinstance(result, tuple) else result
    return f"task failed: {type(err).__name__}: {err}"
