"""In-memory caches of the last few values by key, shared by a worker's threads, and values
computed once per template library (:func:`per_library`)."""

from __future__ import annotations

import collections
import threading

import numpy as np

__all__ = ["Recent", "RecentKeys", "per_library", "read_only"]


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


class RecentKeys:
    """Cache keys of arrays (e.g. a wavelength row), each made by ``make`` (the array as
    float64, C-contiguous -> a hashable key) once and given again while recently seen.

    Recent arrays are found by the wrapping sum of their bits, then checked byte for byte:
    the same key object again, its hash kept (a fresh 32 kB bytes key is hashed anew on every
    look-up: ~11 us, and rounded first for most keys: ~7 us more), equal to itself at once.
    Shared by threads: a look-up reads the table, a miss adds to it (or clears it when full,
    in one step).
    """

    def __init__(self, make, keep=8):
        self._make = make
        self._keep = keep
        self._seen = {}

    def __call__(self, array):
        """The key of ``array``."""
        array = np.ascontiguousarray(array, dtype=np.float64)
        raw, fingerprint = array.tobytes(), int(array.view(np.int64).sum())
        seen = self._seen.get(fingerprint)
        if seen is not None and seen[0] == raw:
            return seen[1]
        key = self._make(array)
        if len(self._seen) >= self._keep:
            self._seen.clear()  # other exposures' keys
        self._seen[fingerprint] = (raw, key)
        return key


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
