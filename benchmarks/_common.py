"""Shared helpers of the benchmark scripts (not part of the package).

Imported before numpy (``import _common`` sorts first among the scripts' third-party
imports), it limits BLAS to one thread unless set, as the command line does: a benchmark's
"workers" are the cores it uses, and the package's matrix products gain nothing from more.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import resource
import shutil
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

#: Repository root (this file is ``<root>/benchmarks/_common.py``).
ROOT = Path(__file__).resolve().parents[1]
#: Where generated data are cached: ``<root>/store/bench`` (git-ignored) whatever the working
#: directory; the environment variable KSPEC_BENCH_DIR overrides it.
CACHE = Path(os.environ.get("KSPEC_BENCH_DIR", ROOT / "store" / "bench"))


def load_note():
    """The machine's load averages (it is shared: context for the timings)."""
    one, five, fifteen = os.getloadavg()
    return (f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on "
            f"{os.cpu_count()} cores")


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


def best_of(func, repeat=3, setup=None):
    """Run ``func()`` ``repeat`` times (``setup()`` before each, untimed).

    Returns
    -------
    best : float
        The shortest wall time, s (the machine is shared: the best run is the least disturbed).
    times : list of float
        Every run's wall time, s.
    result
        ``func``'s return value of the last run.
    cpu : list of float
        Every run's CPU time of this process, s (``time.process_time``: excludes the time the
        process waited for a core; child processes are not counted).
    """
    times, cpu, result = [], [], None
    for _ in range(repeat):
        if setup is not None:
            setup()
        c0 = time.process_time()
        with Timer() as t:
            result = func()
        cpu.append(time.process_time() - c0)
        times.append(t.seconds)
    return min(times), times, result, cpu


def fmt_times(times, cpu=None):
    """'1.23 s (runs: 1.23, 1.30, 1.25 s[; CPU best 1.20 s])'."""
    text = f"{min(times):.3g} s (runs: {', '.join(f'{t:.3g}' for t in times)} s"
    if cpu is not None:
        text += f"; CPU best {min(cpu):.3g} s"
    return text + ")"


def profile_top(func, n=10, sort="tottime", restrict=None):
    """Profile one call of ``func()``; the ``n`` top functions by ``sort`` as text.

    ``restrict``: a regular expression on "file:line(function)" (e.g. package module names)
    applied before taking the top ``n``.
    """
    prof = cProfile.Profile()
    prof.enable()
    func()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.strip_dirs().sort_stats(sort)
    if restrict:
        stats.print_stats(restrict, n)
    else:
        stats.print_stats(n)
    lines = out.getvalue().splitlines()
    # Drop pstats' preamble up to the column header.
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(ln for ln in lines[start:] if ln.strip())


def reference_grid(full=True, workers=2):
    """The 520-point reference subgrid as a synthetic BOSZ-layout directory (cached).

    ``full``: the synth command's default grid (500-320000 A, 150000 rows per file);
    otherwise trimmed to 2500-26000 A (enough for the optical cube and the photometry).
    Either way 610 files: 500 'mp' spectra (520 points less 20 holes) and 110 'ap' twins.
    """
    from kspec_fluxcal.sim import write_synthetic_grid

    out = CACHE / ("bosz_r10000_full" if full else "bosz_r10000_optical")
    kwargs = {} if full else {"wave_min": 2500.0, "wave_max": 26000.0}
    return write_synthetic_grid(out, workers=workers, **kwargs)


def reference_cube(workers=2):
    """The Zarr cube of :func:`reference_grid` (optical, cached)."""
    return _cube(reference_grid(full=False, workers=workers), CACHE / "bosz_r10000_optical.zarr",
                 workers)


def demo_grid(workers=2):
    """The demo's synthetic grid, as ``simulate_survey(grid=None)`` writes it (cached).

    Written once through a one-exposure survey and copied to ``CACHE/demo_grid`` so that
    later surveys pass ``grid=<dir>`` instead of writing their own.
    """
    from kspec_fluxcal.sim import GENERATOR_VERSION, SYNTHETIC_MARKER, simulate_survey

    out = CACHE / "demo_grid"
    marker = out / SYNTHETIC_MARKER
    if marker.exists() and f"version {GENERATOR_VERSION} " in marker.read_text():
        return out
    for stale in (out, CACHE / "demo_grid.zarr"):  # another version of the stellar model
        shutil.rmtree(stale, ignore_errors=True)
    tmp = CACHE / "demo_grid_survey"
    simulate_survey(tmp, exposures=1, nights=1, seed=0, overwrite=True, workers=workers)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(tmp / "grid", partial)
    os.replace(partial, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def demo_cube(workers=2):
    """The Zarr cube of :func:`demo_grid` (cached)."""
    return _cube(demo_grid(workers), CACHE / "demo_grid.zarr", workers)


def _cube(source, out, workers):
    """``build_grid`` of ``source``, cached at ``out``: rebuilt when the cached store was built
    from other inputs or by a version with another store layout."""
    from kspec_fluxcal.errors import GridError
    from kspec_fluxcal.grid.build import build_grid

    try:
        return build_grid(source, out, workers=workers, progress=False)
    except GridError as err:
        if "was built from other inputs" not in str(err):
            raise
        return build_grid(source, out, workers=workers, progress=False, overwrite=True)


#: The real spectra (CALSPEC, CK04) beside the repository (never copied into it); the
#: environment variable KSPEC_SHARED_REAL overrides it.
SHARED_REAL = Path(os.environ.get("KSPEC_SHARED_REAL", ROOT.parent / "shared" / "real"))
#: The CK04 box converted for the benchmarks: F/G/K dwarfs and subgiants, every metallicity.
CK04_BOX = {"teff_range": (4500.0, 7500.0), "loggs": (3.0, 3.5, 4.0, 4.5, 5.0)}


def ck04_grid():
    """The CK04 grid of :data:`CK04_BOX` in the BOSZ layout (converted once, cached)."""
    from kspec_fluxcal.constants import CK04_MARKER
    from kspec_fluxcal.sim import convert_ck04

    out = CACHE / "ck04_bosz"
    if (out / CK04_MARKER).exists():
        return out
    return convert_ck04(SHARED_REAL / "ck04", out, overwrite=True, **CK04_BOX)


def ck04_cube(workers=2):
    """The Zarr cube of :func:`ck04_grid` (cached)."""
    return _cube(ck04_grid(), CACHE / "ck04.zarr", workers)


#: Largest shift of each end of a simulated exposure's wavelength range, Angstrom, and the range
#: of the factor on each of its three LSF FWHM values (:func:`own_setups`).
END_SHIFT = 3.0
LSF_SCALE = (0.95, 1.05)


def own_setups(n, seed):
    """``n`` setups (dicts, as simulate_survey takes them) of the default configuration, each
    with its own wavelength solution (both ends moved by up to :data:`END_SHIFT`) and line
    spread (FWHM values scaled within :data:`LSF_SCALE`): exposures as real ones are, every
    arc solution and focus a little different, one instrument configuration."""
    import numpy as np

    from kspec_fluxcal.sim import DEFAULT_SETUP

    rng = np.random.default_rng(seed)
    ends = rng.uniform(-END_SHIFT, END_SHIFT, (n, 2))
    scales = rng.uniform(*LSF_SCALE, (n, 3))
    return [{"name": f"own{i:04d}", "pixels": DEFAULT_SETUP.pixels,
             "fibers": DEFAULT_SETUP.fibers,
             "wave_min": float(DEFAULT_SETUP.wave_min + ends[i, 0]),
             "wave_max": float(DEFAULT_SETUP.wave_max + ends[i, 1]),
             "fwhm_pixels": [float(f) for f in np.asarray(DEFAULT_SETUP.fwhm_pixels)
                             * scales[i]]}
            for i in range(n)]
