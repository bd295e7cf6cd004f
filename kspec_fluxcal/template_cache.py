"""The disk cache of prepared template libraries and cubes (:mod:`kspec_fluxcal.templates`):
where it is, and its Zarr stores read back whole or written atomically."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ._atomic import atomic_directory
from ._zarr import strings_as_object, strings_as_unicode
from .errors import FluxCalWarning, GridError
from .grid import STORE_VARIABLES, check_chunks, load_checked_store

__all__ = ["CACHE_ENV", "CACHE_NAME", "default_cache_dir"]


#: Environment variable naming the directory of cached template libraries (and prepared
#: cubes); ``off`` (or an empty value) disables the disk cache.
CACHE_ENV = "KSPEC_FLUXCAL_CACHE"
#: The cache directory created next to a template grid store by default.
CACHE_NAME = ".kspec-cache"
#: Values of :data:`CACHE_ENV` (or ``cache_dir``) that turn the disk cache off.
_CACHE_OFF = ("", "off", "none", "no", "0", "false")


def default_cache_dir(grid_store=None):
    """Where prepared template libraries are kept on disk when no directory is given.

    In order: the environment variable :data:`CACHE_ENV` (``off`` for no disk cache); a
    ``.kspec-cache`` directory next to the grid store, when it can be written there;
    ``$XDG_CACHE_HOME/kspec-fluxcal`` (default ``~/.cache/kspec-fluxcal``).

    Parameters
    ----------
    grid_store : path-like, optional
        The template grid's Zarr store (``grid.attrs["store"]`` of :func:`open_grid`).

    Returns
    -------
    pathlib.Path or None
        None when the disk cache is turned off.
    """
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _CACHE_OFF else Path(value).expanduser()
    if grid_store:
        beside = Path(grid_store).resolve().parent / CACHE_NAME
        if os.access(beside if beside.is_dir() else beside.parent, os.W_OK | os.X_OK):
            return beside
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "kspec-fluxcal"


def _cache_dir(cache_dir, grid):
    """The disk cache to use: ``cache_dir`` as given, the default for None, none for False
    or 'off'."""
    if cache_dir is None:
        return default_cache_dir(grid.attrs.get("store"))
    if cache_dir is False or str(cache_dir).strip().lower() in _CACHE_OFF:
        return None
    return Path(cache_dir)


def _read_cached(path, names=STORE_VARIABLES, what="prepared-template", check=None):
    """A cached store, in memory; None (with a note) when it is damaged and must be prepared
    again: missing chunks would otherwise read as NaN templates. ``check(ds)`` returns a
    problem of the content (or None)."""
    try:
        check_chunks(path, names, hint="")
        ds = strings_as_unicode(load_checked_store(path, names, hint=""))
        problem = None if check is None else check(ds)
        if problem is None:
            return ds
    except GridError as err:
        problem = str(err).removeprefix(f"{path}: ")
    except Exception as err:  # unreadable metadata: whatever Zarr raises
        problem = f"{type(err).__name__}: {err}"
    warnings.warn(f"{path}: damaged {what} cache ({problem}); rebuilt",
                  FluxCalWarning, stacklevel=4)
    return None


def _write_cached(ds, path):
    """Keep ``ds`` as the Zarr store ``path``, atomically; never fails the caller's work.

    Concurrent writers each build their own temporary store and rename it into place: a
    reader sees a complete store or none. When another process published first, its store
    is kept and ours dropped. A directory that cannot be written costs a note, not the
    calibration.
    """
    try:
        with atomic_directory(path, overwrite=True) as tmp:
            # Every chunk written (also all-NaN ones): a missing one means damage.
            strings_as_object(ds).to_zarr(tmp, mode="w", consolidated=False,
                                          write_empty_chunks=True)
    except OSError as err:
        if not path.is_dir():  # not another writer's rename: the directory is unusable
            warnings.warn(f"{path.parent}: cannot keep a template cache there ({err}); set "
                          f"{CACHE_ENV} or --cache to a writable directory",
                          FluxCalWarning, stacklevel=4)
