"""Dask imported by xarray only when something is a Dask array.

xarray asks, for every variable it makes, whether the data is a Dask array
(``isinstance(data, array_type("dask"))`` in ``as_compatible_data``), and answering imports
``dask.array`` whole: 0.3-0.5 s of a single-exposure command's ~1 s start-up, for a command
that has no Dask array. It also asks of lazily indexed arrays whether they are Dask
collections (``is_dask_collection``), which imports Dask itself (~0.1 s more). No Dask array
or collection can exist before Dask is imported, so until then the answers are "no" without
importing anything; afterwards they are Dask's.

This fills xarray's cache of duck-array modules and wraps its ``is_dask_collection``
(``xarray.namedarray.pycompat`` and ``.utils``, not public API) before xarray looks Dask up;
where either is not found (another xarray), it is left as it is and xarray behaves as it
always does.
"""

from __future__ import annotations

import sys

__all__ = ["defer_dask_lookup"]


def defer_dask_lookup():
    """Let xarray import Dask only once something has imported ``dask.array``.

    Returns
    -------
    bool
        Whether the look-up is deferred (False: xarray had looked Dask up already, or its
        cache was not found).
    """
    try:
        from xarray.namedarray import pycompat

        cache = pycompat._cached_duck_array_modules
        base = pycompat.DuckArrayModule
    except (ImportError, AttributeError):
        return False
    if not isinstance(cache, dict) or "dask" in cache:
        return False

    class DaskOnDemand(base):
        """xarray's record of Dask: its array type read from ``sys.modules`` while Dask is not
        imported, xarray's own record (which imports it) for everything else."""

        def __init__(self):
            self._record = None

        def _real(self):
            if self._record is None:
                self._record = base("dask")
                cache["dask"] = self._record  # later look-ups go straight to it
            return self._record

        @property
        def type(self):
            # (an import of dask.array under way has no Array yet: not a reason to record
            # Dask as missing for good)
            if not hasattr(sys.modules.get("dask.array"), "Array"):
                return ()
            return self._real().type

        module = property(lambda self: self._real().module)
        version = property(lambda self: self._real().version)
        available = property(lambda self: self._real().available)

    cache["dask"] = DaskOnDemand()
    _defer_collection_test()
    return True


def _defer_collection_test():
    """xarray's ``is_dask_collection`` (called, through ``is_duck_dask_array``, by its module's
    own global look-up) answers False without importing Dask while Dask is not imported."""
    try:
        from xarray.namedarray import utils
    except ImportError:
        return
    original = getattr(utils, "is_dask_collection", None)
    if original is None or getattr(original, "deferred", False):
        return

    def is_dask_collection(x):
        return "dask" in sys.modules and original(x)

    is_dask_collection.deferred = True
    utils.is_dask_collection = is_dask_collection
