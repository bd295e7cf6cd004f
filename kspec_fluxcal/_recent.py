"""In-memory caches of the last few values by key, shared by a worker's threads, and values
computed once per template library (:func:`per_library`)."""

from __future__ import annotations

import collections
import threading

import numpy as np

__all__ = ["Recent", "per_library", "read_only"]


class Recent:
    """The last few values by key, shared by threads (a worker's threads calibrate exposures
    at once): what each in-memory cache of the package keeps."""

    def __init__(self, size):
        self.size = size
        self._items = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        """The value kept for ``key`` (now the most recent), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value):
        """Keep ``value`` for ``key``; the oldest beyond ``size`` are forgotten."""
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self):
        with self._lock:
            self._items.clear()

    def __len__(self):
        return len(self._items)


def per_library(cache, build, library, *args):
    """``build(library, *args)``, computed once per library and ``args``.

    Parameters
    ----------
    cache : Recent
        Where the values are kept, by the library's ``library_key`` and ``args`` (hashable).
    build : callable
        Computes the value, shared by every caller: it must not be modified (:func:`read_only`).
    library : xarray.Dataset
        From :func:`kspec_fluxcal.templates.prepare_library` (one without a ``library_key``
        is computed each time).
    """
    key = None if "library_key" not in library.attrs else (library.attrs["library_key"], *args)
    value = None if key is None else cache.get(key)
    if value is None:
        value = build(library, *args)
        if key is not None:
            cache.put(key, value)
    return value


def read_only(array):
    """A read-only view of ``array`` (a value shared through :func:`per_library`)."""
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view
