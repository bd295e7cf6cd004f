"""Shared helpers of the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

CACHE = Path(os.environ.get("KSPEC_BENCH_DIR", "store/bench"))


def peak_rss_mb():
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def reference_grid(full=True, workers=2):
    """The 520-point reference subgrid as a synthetic BOSZ-layout directory (cached)."""
    from kspec_fluxcal.synthgrid import write_synthetic_grid

    out = CACHE / ("bosz_r10000_full" if full else "bosz_r10000_optical")
    kwargs = {} if full else {"wave_min": 2500.0, "wave_max": 26000.0}
    return write_synthetic_grid(out, workers=workers, **kwargs)


def reference_cube(workers=2):
    """The Zarr cube of :func:`reference_grid` (cached)."""
    from kspec_fluxcal.grid import build_grid

    out = CACHE / "bosz_r10000_optical.zarr"
    return build_grid(reference_grid(full=False, workers=workers), out, workers=workers,
                      progress=False)
