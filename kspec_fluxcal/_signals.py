"""Starting worker processes (a grid build's pool, a survey's LocalCluster) so that signals
end the command cleanly: one Ctrl-C, one message, and every process it started gone."""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["starting_workers"]


@contextlib.contextmanager
def starting_workers():
    """Signals held back while worker processes are started.

    SIGINT is blocked in this thread, and processes started meanwhile inherit the mask (also
    through threads started meanwhile, such as a LocalCluster's event loop): a terminal's
    Ctrl-C, sent to the whole process group, reaches this process alone, which ends its
    workers, instead of printing a KeyboardInterrupt traceback from each of them. SIGINT and
    SIGTERM arriving meanwhile are recorded and raised when the block ends: raised in the
    middle, they would leave a half-started worker (waiting for its start-up data, or a
    cluster that cannot be closed) to die with a traceback of its own.
    """
    from multiprocessing import resource_tracker

    # The tracker unblocks SIGINT after starting its own process: started first.
    resource_tracker.ensure_running()
    main = threading.current_thread() is threading.main_thread()
    held, previous = [], {}
    for signum in (signal.SIGINT, signal.SIGTERM) if main else ():
        previous[signum] = signal.signal(signum, lambda signum, _: held.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])
