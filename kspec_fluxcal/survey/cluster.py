"""The survey job's Dask cluster: a LocalCluster of worker processes set up for it (malloc
settings, a quiet sizeof logger), or a running scheduler; and running the job's work on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import itertools
import logging
import os
import time
import traceback
from pathlib import Path

from .._signals import starting_workers
from ..errors import ConfigError, FluxCalError

__all__ = ["local_cluster", "on_cluster", "as_completed_pairs", "gather_directly",
           "quiet_known_messages", "dask_setup", "check_scheduler_address",
           "check_performance_report", "WORKER_MALLOC_ENV", "TRIM_EVERY", "trim_heap", "TUNED",
           "WORKER_IMPORTS"]


#: glibc malloc settings of LocalCluster workers. Distributed's nannies set
#: MALLOC_TRIM_THRESHOLD_=65536 so that freed memory goes back to the OS; setting it also
#: freezes glibc's mmap threshold at 128 KiB, so every array above that (a 14 x 4096 float64
#: image is 460 KiB) is a fresh mmap whose pages fault in again: a calibrate task took 45 %
#: longer (0.43 s instead of 0.30 s, 14 fibers x 4096 pixels). The thresholds are those
#: glibc's own adjustment stops at in a plain process: mmap above 32 MiB (its ceiling on
#: 64-bit), trim above twice that. At 8 MiB each, a calibrate task still mmapped ~10 MB per
#: exposure afresh (library-by-pixel arrays of 8-12 MB) and faulted ~2500 pages in: 9 ms of a
#: worker's ~0.19 s CPU per exposure (5 alternating runs of 100 exposures: 0.200 -> 0.190 s;
#: peak RSS unchanged, 315-330 MB). Larger arrays (the template library) are still mmapped,
#: and returned to the OS when freed.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20),
                     "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}

#: Survey tasks a worker runs between two calls of :func:`trim_heap`. Under the trim threshold
#: above, up to 64 MiB freed by a task stay with the worker, in each of its threads' heaps; a
#: lone worker's RSS rose in steps of 25-40 MB at random points (+2 to +16 % from 50 to 500
#: exposures, eight runs). Trimmed every 25 tasks, its RSS at 50 ... 500 exposures stayed
#: within 3 % (three runs; without: +13, -7 and +18 %). The trimmed pages fault in again
#: (~3.5 us each on this project's VMs): tasks of ~0.1 s, 60-150 exposures in one process,
#: faulted 346-393 pages per task trimmed every 25, 210 every 50, 95-189 never (~0.5 ms of
#: CPU per task less every 50 than every 25); the survey's workers' RSS by exposures done,
#: 50 -> 400, every 50: +4 % (one and two workers), every 25 in the same hour: +3 and +6 %.
TRIM_EVERY = 50
_tasks_done = itertools.count(1)


def trim_heap(every=TRIM_EVERY):
    """Count a finished task; every ``every``-th, give the process's free heap back to the OS.

    glibc's ``malloc_trim(0)`` releases the free pages of every arena (not only the top of the
    main heap, which the trim threshold governs). Elsewhere (another C library) nothing.
    """
    if next(_tasks_done) % every:
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


#: How often the cluster's event loops (workers, nannies, scheduler) wake to time themselves
#: (distributed's default: 20 ms). The tick only feeds the "event loop was unresponsive" log
#: line (a tick later than ``distributed.admin.tick.limit``, 3 s) and a dashboard metric; each
#: wake-up takes the GIL from the running task: at 20 ms the worker's other threads used
#: ~7.5 ms of CPU per exposure, at 1 s ~5.7 ms (3 alternating runs of 100 exposures).
TICK_INTERVAL = "1s"

#: How often each worker, and its nanny, check the worker's memory against the spill, pause
#: and terminate thresholds (``distributed.worker.memory.monitor-interval``; distributed's
#: default: 100 ms). Each check wakes the event loop (a psutil read, a coroutine) and takes
#: the GIL from the running task: at 100 ms an idle worker used ~5 ms of CPU a second on it,
#: and its nanny (in the client's process) as much again. A survey task takes ~0.2 s and
#: grows the worker's memory by tens of MB, against thresholds of GB: reacting within a
#: second instead of 0.1 s changes nothing for it.
MEMORY_MONITOR_INTERVAL = "1s"

#: How often the scheduler, the workers and their nannies sample their process's CPU and
#: memory and the host's network and disk counters (``distributed.admin.system-monitor.
#: interval``; distributed's default: 500 ms), for the dashboard's System page and the memory
#: the workers' heartbeats report. Each sample is ~0.4 ms of CPU (psutil reading /proc and
#: /sys). With it at 1 s, and the nannies' monitors off, an idle cluster of two workers used
#: 9.97 / 9.42 / 8.66 ms of CPU a second in the client's process and 7.95 / 7.24 / 7.03 ms in
#: the workers, against 15.30 / 13.37 / 13.15 and 9.75 / 9.52 / 8.93 ms before (alternated):
#: ~0.35 ms per exposure at 17 exposures a second. (The nannies' monitors are left on: turning
#: them off takes distributed's internals, for their ~0.8 ms a second at this interval.)
SYSTEM_MONITOR_INTERVAL = "1s"

#: The cluster's event-loop settings (see each constant); a value the user's Dask
#: configuration gives one of them, other than distributed's default, is kept.
TUNED = {"distributed.admin.tick.interval": TICK_INTERVAL,
         "distributed.worker.memory.monitor-interval": MEMORY_MONITOR_INTERVAL,
         "distributed.admin.system-monitor.interval": SYSTEM_MONITOR_INTERVAL}

#: Modules every survey task runs: each worker imports them as it starts (:func:`dask_setup`).
WORKER_IMPORTS = ("kspec_fluxcal.exposure", "kspec_fluxcal.pipeline", "kspec_fluxcal.products",
                  "kspec_fluxcal.survey.job")


class _DropMessage(logging.Filter):
    """Drops a logger's records that contain ``fragment`` (see :data:`QUIETED`)."""

    def __init__(self, fragment):
        super().__init__()
        self.fragment = fragment

    def filter(self, record):
        return self.fragment not in record.getMessage()


#: distributed's log messages that say nothing wrong in a survey job, by logger:
#: - "Defaulting to -1 B": dask's sizeof recursed too deep in the nested profile data fetched
#:   for a performance report, and distributed serialized the message off the event loop, as
#:   it does for a large one (the line appeared in every demo run); other sizeof failures,
#:   of data, with other defaults, still warn;
#: - "ended with CancelledError": a worker closed under a task the job had cancelled, which
#:   it does only when it is interrupted (Ctrl-C, SIGTERM): one line per running task after
#:   the interruption's own message;
#: - "as_completed._track_future": the client's loop logs, with a traceback, a result whose
#:   gather was under way when an interrupted job closed its cluster (the job cancels its
#:   tasks first, but cannot recall a request already sent); the tracking never raises for a
#:   task's own failure (``raise_errors=False``), only for a lost connection, which the job
#:   reports itself;
#: - "Failed to communicate with scheduler during heartbeat": a worker whose heartbeat was on
#:   its way as an interrupted job closed the cluster (seen 1 run in ~20 of
#:   test_interrupted_survey_leaves_nothing); a scheduler lost during the work ends the job
#:   with its own message.
QUIETED = {"distributed.sizeof": "Defaulting to -1 B",
           "distributed.worker.state_machine": "ended with CancelledError",
           "tornado.application": "coro=<as_completed._track_future()",
           "distributed.worker": "Failed to communicate with scheduler during heartbeat"}


class _DropCancelledReconnect(logging.Filter):
    """Drops the client's traceback of its reconnection, cancelled when the job closes it
    after losing the scheduler (the job says so itself: SchedulerLostError)."""

    def filter(self, record):
        err = record.exc_info[1] if record.exc_info else None
        return not (isinstance(err, asyncio.CancelledError)
                    and "_reconnect" in "".join(traceback.format_tb(err.__traceback__)))


def quiet_known_messages():
    """Install the filters of :data:`QUIETED` in this process (once)."""
    for name, fragment in QUIETED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment
                   for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))
    client = logging.getLogger("distributed.client")
    if not any(isinstance(f, _DropCancelledReconnect) for f in client.filters):
        client.addFilter(_DropCancelledReconnect())


def dask_setup(worker):
    """Preload hook of the workers :func:`local_cluster` starts (``distributed.worker.preload``).

    Installs the filters of :data:`QUIETED`, and imports :data:`WORKER_IMPORTS` as the command
    line sets itself up (:func:`kspec_fluxcal._startup.setting_up`): without the cyclic garbage
    collector, xarray's look-up of Dask deferred (a worker that only calibrates never imports
    ``dask.array``: 0.3-0.5 s of CPU per worker and job), and the objects the worker holds then
    frozen. A full collection then scans ~2e4 objects instead of ~1.3e5 (200 exposures on two
    workers: 9-12 against 75-95 ms, one per ~100 tasks).

    Parameters
    ----------
    worker : distributed.Worker
        The starting worker (unused: the filters and the imports are per process).
    """
    from .._startup import setting_up

    quiet_known_messages()
    with setting_up():
        for name in WORKER_IMPORTS:
            importlib.import_module(name)


def _tuned():
    """:data:`TUNED`, but the settings the Dask configuration gives another value than
    distributed's default (the user's)."""
    import dask

    shipped = {}
    for defaults in dask.config.defaults:
        dask.config.update(shipped, defaults)
    return {key: value for key, value in TUNED.items()
            if dask.config.get(key, None) == dask.config.get(key, None, config=shipped)}


def local_cluster(workers=None, threads_per_worker=1, dashboard_address="127.0.0.1:8787",
                  profile=False):
    """A LocalCluster of worker processes set up for the survey job.

    Parameters
    ----------
    workers : int, optional
        Worker processes (default: one per core).
    threads_per_worker : int
    dashboard_address : str
        ``"127.0.0.1:0"`` for any free port.
    profile : bool
        Run the workers' statistical profiler (the dashboard's Profile page). Off by
        default: it keeps a call tree per second and per task for the last 1000 s, which
        grew a worker's memory by ~0.15 MB per exposure (+15-20 % over 500 exposures, for
        its first ~17 minutes), and its sampling every 10 ms takes the GIL from the work.

    Returns
    -------
    distributed.LocalCluster
        Its workers get :data:`WORKER_MALLOC_ENV`, and run :func:`dask_setup` when they start;
        its event loops tick every :data:`TICK_INTERVAL`, its workers' memory is checked
        every :data:`MEMORY_MONITOR_INTERVAL`, its scheduler and workers sample the system
        every :data:`SYSTEM_MONITOR_INTERVAL` (unless the Dask configuration says otherwise:
        :data:`TUNED`).

    Raises
    ------
    ConfigError
        When ``workers`` is less than 1 (0 would have meant one per core, unasked).
    """
    import dask
    from distributed import LocalCluster

    if workers is not None and workers < 1:
        raise ConfigError(None, None, f"workers={workers}: need at least 1 (None: one per "
                          "core)")

    # glibc reads MALLOC_* once, at process start: they must be in the environment the
    # nannies spawn workers with ("pre-spawn-environ"). A value already in os.environ (left
    # there by an earlier cluster's nannies) would take precedence over the configuration.
    saved = {k: os.environ.pop(k) for k in WORKER_MALLOC_ENV if k in os.environ}
    quiet_known_messages()  # the scheduler runs in this process
    preload = [*dask.config.get("distributed.worker.preload", []), __name__]
    try:
        with dask.config.set({**{f"distributed.nanny.pre-spawn-environ.{k}": v
                                 for k, v in WORKER_MALLOC_ENV.items()},
                              **_tuned(),
                              "distributed.worker.preload": preload,
                              "distributed.worker.profile.enabled": bool(profile)}):
            return LocalCluster(n_workers=workers or os.cpu_count() or 1,
                                threads_per_worker=threads_per_worker,
                                dashboard_address=dashboard_address, processes=True)
    finally:
        os.environ.update(saved)


def check_scheduler_address(address):
    """Refuse what cannot be a scheduler's address before any work (distributed would raise
    a bare ValueError only when the job connects).

    Parameters
    ----------
    address : str
        ``SCHEME://HOST:PORT`` with one of distributed's schemes (tcp, tls, ws...), or
        ``HOST:PORT`` for tcp.

    Raises
    ------
    ConfigError
        Saying what is wrong and what is expected.
    """
    from distributed.comm import get_address_host_port, parse_address
    from distributed.comm.registry import backends

    scheme = parse_address(address)[0]
    why = ""
    if scheme in backends:
        with contextlib.suppress(ValueError):  # no port, or not a number
            host, port = get_address_host_port(address)
            if host and 0 < port < 65536:
                return
    elif scheme.startswith("http"):  # the dashboard's, the address users see in a browser
        why = f" ({scheme}:// is the dashboard's)"
    else:
        why = f" (unknown scheme {scheme}://)"
    raise ConfigError(None, None, f"{address!r} is not a scheduler address{why}; expected "
                      "tcp://HOST:PORT (the scheduler's port, 8786 by default)")


def check_performance_report(path, label=""):
    """Refuse a performance report that could not be written: it is written after the work.

    Parameters
    ----------
    path : path-like
        Where the HTML report goes.
    label : str
        How the user gave it (e.g. ``"--performance-report"``), put before the path.

    Raises
    ------
    FluxCalError
        When ``path`` is a directory, or its directory cannot be created or written.
    """
    from .._atomic import check_output_directory

    if Path(path).is_dir():
        raise FluxCalError(f"{label} {path}".strip() + ": is a directory, not a file")
    check_output_directory(path, label, for_file=True)


@contextlib.contextmanager
def _client(client, scheduler, workers, threads_per_worker, dashboard_address):
    """The caller's client (left open), or one connected to ``scheduler``, or a LocalCluster
    started here; what is started here is closed on every way out (the work's end, an error,
    Ctrl-C, a failure while the cluster itself starts), so no worker process outlives the
    job."""
    from distributed import Client

    if client is not None:
        yield client
        return
    with contextlib.ExitStack() as stack:
        if scheduler:
            check_scheduler_address(scheduler)
            try:
                own = stack.enter_context(Client(scheduler, timeout="20s"))
            except OSError as err:
                raise FluxCalError(f"cannot connect to the scheduler at {scheduler}: "
                                   f"{err}") from None
        else:
            # An interruption while the cluster starts is raised once it is on the stack.
            with starting_workers():
                cluster = stack.enter_context(local_cluster(workers, threads_per_worker,
                                                            dashboard_address))
            own = stack.enter_context(Client(cluster))
        yield own


def on_cluster(work, *, client, scheduler, workers, threads_per_worker, dashboard_address,
               performance_report, progress):
    """Run ``work(client)`` on the caller's client, or on one started (and closed) here.

    Parameters
    ----------
    work : callable
        ``work(client)``, the job's work.
    client : distributed.Client or None
        The caller's client (left open).
    scheduler : str or None
        Address of a running scheduler to connect to, when there is no ``client``.
    workers, threads_per_worker, dashboard_address
        Of the LocalCluster started otherwise (:func:`local_cluster`).
    performance_report : path-like or None
        Save Dask's HTML performance report of the work there.
    progress : bool
        Print the dashboard link.

    Returns
    -------
    str
        The dashboard link.
    """
    from distributed import performance_report as perf_report

    if performance_report:
        check_performance_report(performance_report)
    quiet_known_messages()  # the client's loop runs in this process
    with _client(client, scheduler, workers, threads_per_worker, dashboard_address) as client:
        if progress:
            print(f"dashboard: {client.dashboard_link}", flush=True)
        ctx = (perf_report(filename=str(performance_report)) if performance_report
               else contextlib.nullcontext())
        # as_current: the performance report finds its client through Client.current(),
        # and a caller's client need not be the default one.
        with client.as_current(), ctx:
            work(client)
        return client.dashboard_link


@contextlib.contextmanager
def as_completed_pairs(client, futures):
    """(future, result or exception) as they finish, never raising for a failed task.

    The results of tasks finishing close together are gathered at once (:data:`GATHER_WINDOW`),
    straight from the workers when they are on this machine (:func:`gather_directly`): each
    gathered alone through the scheduler was sent twice in the client's process (to the
    scheduler, then to the client, on its one event loop), after a request of its own. Tasks
    of 0.12 s returning a 75 kB record, 2 workers, 4 alternations of 100: the client's
    process 6.6 ms of CPU per task, 5.9 gathered straight from the workers, 3.8 in batches;
    the workers' 5.8, 5.4, 4.2 ms (gathering alone straight from the workers was measured
    before, without gain: the batches make the difference).

    Left early (Ctrl-C, SIGTERM, a lost scheduler), the tasks still to run are cancelled:
    closed under running tasks and pending results, the cluster would log each of them as
    lost work, with tracebacks, after the one-line message of the interruption.
    """
    from distributed import as_completed

    futures = list(futures)
    # The client's loop: as_completed would otherwise look for a default client, and the
    # caller's client need not be one (Client(..., set_as_default=False)).
    done = as_completed(futures, loop=client.loop) if futures else None
    try:
        yield _gathered(client, done, gather_directly(client)) if done else iter(())
    except BaseException:
        client.cancel(futures)
        raise


#: The results of tasks that finish within this many seconds of each other (looked for every
#: :data:`GATHER_POLL` s while tasks still run) are gathered together: each gathering asks the
#: scheduler where its results are, then each worker holding some of them for them. At
#: ~20 results a second (two workers), 1.5 s instead of 0.5: the client's event loop 2.22-2.24
#: instead of 2.34-2.36 ms of CPU per exposure, its process 4.0-4.5 instead of 4.6-4.8 (500
#: exposures, 2 alternated pairs); results wait on their workers ~1 s longer (~75 kB each).
GATHER_WINDOW, GATHER_POLL = 1.5, 0.05


def _gathered(client, done, direct, window=GATHER_WINDOW):
    """(future, result) of each future of ``done`` (``distributed.as_completed``) as it
    finishes: the finished ones' results gathered in batches, a failed or cancelled task's
    exception as ``as_completed(with_results=True, raise_errors=False)`` gives it."""
    for batch in _batches(done, window):
        finished = [f for f in batch if f.status == "finished"]
        try:
            results = dict(zip(finished, client.gather(finished, direct=direct), strict=True))
        except (Exception, asyncio.CancelledError):  # one failed since: each asked for alone
            results = {}
        for future in batch:
            yield future, results[future] if future in results else _alone(future)


def _alone(future):
    """The result of ``future``, or what ``as_completed(with_results=True,
    raise_errors=False)`` gives for a failed task (its exception's type, the exception and
    its traceback) or a cancelled one (the CancelledError)."""
    from concurrent.futures import CancelledError

    try:
        if future.status != "error":
            return future.result()
        err = future.exception()
        return type(err), err, future.traceback()
    except CancelledError as err:
        return err


def _batches(done, window):
    """Lists of the futures of ``done`` that finished within ``window`` seconds of the first
    of each (sooner when no task is left running)."""
    while True:
        try:
            batch = done.next_batch(block=True)
        except StopIteration:
            return
        end = time.monotonic() + window
        while done.count() and time.monotonic() < end:
            time.sleep(GATHER_POLL)
            batch += done.next_batch(block=False)
        yield batch


def gather_directly(client):
    """Whether ``client`` is to gather results straight from the workers: as it was told
    (``direct_to_workers``), else when its scheduler and every worker are on this machine
    (loopback or in-process addresses). A remote scheduler's workers may be out of the
    client's reach, which is why Dask gathers through the scheduler by default.

    Parameters
    ----------
    client : distributed.Client

    Returns
    -------
    bool
    """
    if client.direct_to_workers is not None:
        return bool(client.direct_to_workers)
    try:
        workers = list(client.scheduler_info(n_workers=-1)["workers"])
    except Exception:  # a scheduler that does not answer: Dask's default
        return False
    return all(_on_this_machine(address) for address in [client.scheduler.address, *workers])


def _on_this_machine(address):
    """Whether a Dask address (``tcp://127.0.0.1:8786``, ``inproc://...``) is this machine's."""
    import ipaddress

    from distributed.comm import get_address_host, parse_address

    try:
        if parse_address(address)[0] == "inproc":
            return True
        host = get_address_host(address)
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not known to be this machine
        return False
