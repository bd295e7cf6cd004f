"""A process's start: its imports and inputs opened without the modules it does not use
(Dask's array module, NumPy's f2py and testing) nor the cyclic garbage collector, and what they
leave frozen.

Used by the command line (each command's set-up) and by the survey's workers as they start
(:func:`kspec_fluxcal.survey.cluster.dask_setup`).
"""

from __future__ import annotations

import contextlib
import gc

from ._dask_on_demand import defer_dask_lookup
from ._numpy_on_demand import defer_numpy_submodules

__all__ = ["setting_up"]


@contextlib.contextmanager
def setting_up():
    """Imports and inputs opened without unused modules (Dask's, NumPy's) nor the cyclic
    garbage collector, whose passes over the ~10^6 long-lived objects the imports create are
    ~0.15 s of a 1 s start-up; those objects are then frozen (never scanned again: a full
    collection of a survey worker's ~1.2e5 objects took 70-90 ms, one every 100-200 tasks)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        defer_dask_lookup()  # first: before xarray makes a variable (it imports xarray)
        defer_numpy_submodules()  # before SciPy copies NumPy's namespace
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
