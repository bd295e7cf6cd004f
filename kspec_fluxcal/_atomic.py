"""Atomic outputs: write to a temporary sibling, then rename into place.

A reader never sees a half-written product: until the rename, the final path either does not
exist or still holds the previous complete version. Also the file checks done at the
boundary before any work: inputs are regular files, outputs can be written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from .errors import FluxCalError, OutputExistsError

__all__ = ["atomic_file", "atomic_directory", "check_regular_file", "check_output_directory",
           "foreign_output"]

TEMP_PREFIX = ".kspec-tmp-"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path, directory=False, replaced=None):
    # mkstemp/mkdtemp create owner-only entries; outputs get the usual permissions, or
    # those of the file they replace (a RED file calibrated in place keeps its own).
    try:
        mode = stat.S_IMODE(os.stat(replaced).st_mode) if replaced is not None else None
    except OSError:
        mode = None
    os.chmod(path, mode if mode is not None else (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path, overwrite=False):
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    Parameters
    ----------
    path : path-like
        Final destination.
    overwrite : bool
        Replace an existing file; otherwise :class:`OutputExistsError` is raised before
        anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _publish_mode(tmp, replaced=path)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)  # a failed write names no file; the output is the one
        raise


@contextlib.contextmanager
def atomic_directory(path, overwrite=False):
    """Yield a temporary directory next to ``path``; move it to ``path`` on success.

    An existing directory is moved aside first and removed only once the new one is in
    place, so an interruption leaves either the old or the new complete version.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        old = None
        if path.exists():
            # Unique per thread too: writers in one process (a worker's threads) would
            # otherwise move their old versions onto one name.
            old = path.with_name(f"{TEMP_PREFIX}{path.name}.old-{os.getpid()}-"
                                 f"{threading.get_ident()}")
            try:
                os.replace(path, old)
            except FileNotFoundError:  # another writer moved it aside first
                old = None
        _replace_directory(tmp, path, old)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(tmp, path, old):
    """Move ``tmp`` to ``path``. Another writer of the same ``path`` may have published its
    own complete version between our moving the old one aside and now (writers of a shared
    cache): then that version stands and ours is dropped. On any other failure the old
    version (moved aside to ``old``) is put back before the error goes on."""
    try:
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def check_regular_file(path, error):
    """Raise ``error(path, None, problem)`` unless ``path`` is a regular file (or a link to
    one): reading a FIFO or a device would wait for data that never come.

    Parameters
    ----------
    path : path-like
    error : type
        An :class:`~kspec_fluxcal.errors.InputError` subclass (the kind of input).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(path, None, "no such file") from None
    if not stat.S_ISREG(mode):
        kind = next((text for test, text in _FILE_KINDS if test(mode)), "a special file")
        raise error(path, None, f"not a regular file ({kind})")


def check_output_directory(path, label="", *, for_file=False):
    """Raise :class:`FluxCalError` unless ``path`` is, or can be created as, a writable
    directory (with ``for_file``: unless the file ``path`` can be written there); checked
    before the work, not found out after it.

    Parameters
    ----------
    path : path-like
        The output directory, or with ``for_file`` the output file.
    label : str
        How the user gave it (e.g. ``"--out"``), put before the path in the message.
    for_file : bool
        ``path`` is a file to be written (its directory is checked).
    """
    path = Path(path)
    name = f"{label} {path}".strip()
    if not for_file and path.exists() and not path.is_dir():
        raise FluxCalError(f"{name}: is a file, not a directory")
    start = path.parent if for_file else path
    existing = next(p for p in (start, *start.parents) if p.exists())
    where = "" if existing == path else f"cannot be created: {existing} "
    if not existing.is_dir():
        raise FluxCalError(f"{name}: {where}is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FluxCalError(f"{name}: {where}is not writable")
    # Tried for real: access() says yes to root everywhere, and to anyone on a filesystem
    # that takes no new entries (/proc, /sys: ENOENT after the calibration, as a bare OS
    # message). A uniquely named directory, removed at once, leaves no trace.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=TEMP_PREFIX + "probe-", dir=existing))
    except OSError as err:
        raise FluxCalError(f"{name}: {where}takes no new entries "
                           f"({err.strerror or err})") from None


def foreign_output(path, ours, what):
    """Why an existing ``path`` must not be replaced, also with overwrite ('' when it may):
    it is a file, or a non-empty directory that ``ours(path)`` does not recognise as
    ``what`` the command writes. Overwriting moved a mistyped path of the user's data aside
    and deleted it."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())) or (
            path.is_dir() and ours(path)):
        return ""
    return (f"exists and is not {what}: not replaced, also not with --overwrite; choose "
            "another output or remove it yourself")
