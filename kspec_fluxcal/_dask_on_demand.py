"""Dask imported by xarray only when something is a Dask array.

xarray asks, for every variable it makes, whether the data is a Dask array
(``isinstance(data, array_type("dask"))`` in ``as_compatible_data``), and answering imports
``dask.array`` whole: 0.3-0.5 s of a single-exposure command's ~1 s start-up, for a command
that has no Dask array. No Dask array can exist before ``dask.array`` is imported, so until
then the answer is "no Dask array type" without importing anything; afterwards it is Dask's.

This fills xarray's cache of duck-array modules (``xarray.namedarray.pycompat``, not public
API) before xarray looks Dask up; where that cache is not found (another xarray), nothing is
changed and xarray behaves as it always does.
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
    return True
