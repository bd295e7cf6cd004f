"""The survey job's Dask cluster: a LocalCluster of worker processes set up for it (malloc
settings, a quiet sizeof logger), or a running scheduler; and running the job's work on it.
"""

from __future__ import annotations

import contextlib
import logging
import os

from .errors import FluxCalError

__all__ = ["local_cluster", "quiet_message_sizes", "dask_setup", "WORKER_MALLOC_ENV"]


#: glibc malloc settings of LocalCluster workers. Distributed's nannies set
#: MALLOC_TRIM_THRESHOLD_=65536 so that freed memory goes back to the OS; setting it also
#: freezes glibc's mmap threshold at 128 KiB, so every array above that (a 14 x 4096 float64
#: image is 460 KiB) is a fresh mmap whose pages fault in again: a calibrate task took 45 %
#: longer (0.43 s instead of 0.30 s, 14 fibers x 4096 pixels). With the mmap threshold at
#: 8 MiB the task is as fast as in a plain process, and memory is still returned in 8 MiB
#: steps (large arrays are mmapped and unmapped when freed).
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(8 << 20),
                     "MALLOC_MMAP_THRESHOLD_": str(8 << 20)}


class _MessageSizeFilter(logging.Filter):
    """Drops distributed's warning that it could not size a message ("... Defaulting to -1
    B"): the deeply nested profile data fetched for a performance report make dask's sizeof
    recurse too deep, and distributed then serializes the message off the event loop, as it
    does for a large one. Nothing is wrong, but the line appeared in every demo run. Other
    sizeof failures (of data, with other defaults) still warn."""

    def filter(self, record):
        return "Defaulting to -1 B" not in record.getMessage()


def quiet_message_sizes():
    """Install :class:`_MessageSizeFilter` in this process (once)."""
    logger = logging.getLogger("distributed.sizeof")
    if not any(isinstance(f, _MessageSizeFilter) for f in logger.filters):
        logger.addFilter(_MessageSizeFilter())


def dask_setup(worker):
    """Preload hook of the workers :func:`local_cluster` starts (``distributed.worker.preload``).

    Parameters
    ----------
    worker : distributed.Worker
        The starting worker (unused: the filter is per process).
    """
    quiet_message_sizes()


def local_cluster(workers=None, threads_per_worker=1, dashboard_address="127.0.0.1:8787"):
    """A LocalCluster of worker processes set up for the survey job.

    Parameters
    ----------
    workers : int, optional
        Worker processes (default: one per core).
    threads_per_worker : int
    dashboard_address : str
        ``"127.0.0.1:0"`` for any free port.

    Returns
    -------
    distributed.LocalCluster
        Its workers get :data:`WORKER_MALLOC_ENV`, and run :func:`dask_setup` when they start.
    """
    import dask
    from distributed import LocalCluster

    # glibc reads MALLOC_* once, at process start: they must be in the environment the
    # nannies spawn workers with ("pre-spawn-environ"). A value already in os.environ (left
    # there by an earlier cluster's nannies) would take precedence over the configuration.
    saved = {k: os.environ.pop(k) for k in WORKER_MALLOC_ENV if k in os.environ}
    quiet_message_sizes()  # the scheduler runs in this process
    preload = [*dask.config.get("distributed.worker.preload", []), __name__]
    try:
        with dask.config.set({**{f"distributed.nanny.pre-spawn-environ.{k}": v
                                 for k, v in WORKER_MALLOC_ENV.items()},
                              "distributed.worker.preload": preload}):
            return LocalCluster(n_workers=workers or os.cpu_count() or 1,
                                threads_per_worker=threads_per_worker,
                                dashboard_address=dashboard_address, processes=True)
    finally:
        os.environ.update(saved)


def _start_client(scheduler, workers, threads_per_worker, dashboard_address):
    from distributed import Client

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except OSError as err:
            raise FluxCalError(f"cannot connect to the scheduler at {scheduler}: {err}") from None
    cluster = local_cluster(workers, threads_per_worker, dashboard_address)
    return Client(cluster), cluster


def _on_cluster(work, *, client, scheduler, workers, threads_per_worker, dashboard_address,
                performance_report, progress):
    """Run ``work(client)`` on the caller's client, or on one started (and closed) here;
    returns the dashboard link."""
    from distributed import performance_report as perf_report

    owns_client = client is None
    cluster = None
    if owns_client:
        client, cluster = _start_client(scheduler, workers, threads_per_worker,
                                        dashboard_address)
    try:
        if progress:
            print(f"dashboard: {client.dashboard_link}", flush=True)
        ctx = (perf_report(filename=str(performance_report)) if performance_report
               else contextlib.nullcontext())
        # as_current: the performance report finds its client through Client.current(),
        # and a caller's client need not be the default one.
        with client.as_current(), ctx:
            work(client)
        return client.dashboard_link
    finally:
        if owns_client:
            client.close()
            if cluster is not None:
                cluster.close()
