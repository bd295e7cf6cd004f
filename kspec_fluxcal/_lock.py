"""One writer per output directory: a lock file naming its owner (host, pid, start time).

The file is created by a hard link (atomic, and safe on NFS), so of two jobs starting
together exactly one gets it, and nobody reads it half-written. A lock
whose owner is gone (same host, no such process, or the pid now belongs to a process started
after the lock) is stale: a job that was killed could not remove it. It is taken over with a
warning. A lock held on another host cannot be checked from here and is always refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import threading
import warnings
from pathlib import Path

from .errors import FluxCalWarning, OutputLockedError

__all__ = ["exclusive"]


def _owner_record():
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def _read(path):
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None


def _parse(text):
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except ValueError:
        return None


def _is_stale(owner):
    """True when the owner ran on this host and is gone (its pid free or reused since)."""
    import psutil  # a dependency of distributed

    if owner.get("host") != socket.gethostname():
        return False
    try:
        created = psutil.Process(owner["pid"]).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
    try:
        started = _dt.datetime.fromisoformat(owner["started"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return False
    # Start times are stored to the second: a process started later is another one.
    return created > started + 1.0


def _describe(owner):
    here = owner.get("host") == socket.gethostname()
    where = f"this host ({owner.get('host')})" if here else f"host {owner.get('host')}"
    return (f"pid {owner.get('pid')} on {where}, started {owner.get('started')} "
            f"({owner.get('command')})")


def _create(path, text):
    """Create ``path`` holding ``text``, or raise FileExistsError: written aside, then
    hard-linked into place, so that no reader ever sees it empty or half-written."""
    aside = Path(f"{path}.new-{os.getpid()}-{threading.get_ident()}")
    aside.write_text(text)
    try:
        os.link(aside, path)
    finally:
        aside.unlink()


def _take_over(path, seen):
    """Remove the stale lock whose content was ``seen``; False if it changed meanwhile.

    The lock is renamed aside first (atomic): if what was renamed is not the stale lock (a
    job took it over in between), that job's lock is put back.
    """
    aside = Path(f"{path}.stale-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return True
    if _read(aside) == seen:
        aside.unlink()
        return True
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    aside.unlink()
    return False


def _acquire(path, what):
    record = json.dumps(_owner_record())
    for _ in range(3):
        try:
            _create(path, record)
            return record
        except FileExistsError:
            pass
        seen = _read(path)
        if seen is None:
            continue  # released meanwhile: try again
        owner = _parse(seen)
        if owner is None:
            raise OutputLockedError(f"{path}: unreadable lock file of another job writing to "
                                    f"{what}; if no job is running, remove it")
        if not _is_stale(owner):
            raise OutputLockedError(f"{path}: another survey job is writing to {what}: "
                                    f"{_describe(owner)}; wait for it to finish (a lock left by "
                                    "a job that died is taken over automatically)")
        if _take_over(path, seen):
            warnings.warn(f"took over the lock {path} of {_describe(owner)}, which is no "
                          "longer running (a killed job?)", FluxCalWarning, stacklevel=4)
    raise OutputLockedError(f"{path}: could not take the lock of {what}: other jobs keep "
                            "taking it")


@contextlib.contextmanager
def exclusive(directory, name="survey.lock"):
    """Hold the lock file ``directory/name`` while the block runs; released on every exit.

    Parameters
    ----------
    directory : path-like
        The directory one job at a time may write to (must exist).
    name : str
        The lock file's name.

    Raises
    ------
    OutputLockedError
        When a live job (or one on another host) holds the lock; the message names the lock
        file and its owner.
    """
    path = Path(directory) / name
    record = _acquire(path, directory)
    try:
        yield path
    finally:
        # Only our own lock: never one a later job took over from us.
        if _read(path) == record:
            path.unlink()
