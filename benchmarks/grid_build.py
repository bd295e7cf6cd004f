"""Build the Zarr template cube from the synth command's default grid: time with 1 and 2
workers, files/s and MB/s, and the ratio to a plain ``np.loadtxt`` loop over the same files.

    python benchmarks/grid_build.py

Issue 3: converting the 520-point BOSZ-layout grid (R = 10000, 150,000 rows per file) must be
much faster than reading it with ``np.loadtxt``; the build reads each file once, computes the
synthetic magnitudes and band extinction coefficients on the full range, trims to
3000-11000 A and writes the cube.

The grid is ``write_synthetic_grid(out)`` with no size arguments (cached under
store/bench/bosz_r10000_full; KSPEC_BENCH_DIR overrides; writing it takes ~100-165 s the first
time). It holds 610 files: the 520-point grid less 20 holes is 500 'mp' spectra, plus 110
'ap' (ATLAS9) twins at Teff >= 7500 K that the build's policy skips (MARCS preferred). The
build therefore reads 500 files, and the loadtxt loop reads the same 500 files.

Timing: ``build_grid(..., workers=N)`` (Dask processes for N > 1, synchronous for 1) into a
fresh store, best of 3 runs (the machine has 2 cores and is shared). The files are in the OS
page cache after the first run (warm cache: decompression and parsing are measured, not the
disk). ``np.loadtxt`` is slow, so it is timed on 40 of the files (spread over the grid, best of
3) and extrapolated linearly to 500; it only parses, it computes and writes nothing. The
package's own reader, ``read_bosz_spectrum``, is timed on the same 40 files for comparison.
"""

from __future__ import annotations

import os
import shutil

import _common  # noqa: F401 (first: BLAS threads set before numpy loads)
import numpy as np
from _common import CACHE, best_of, fmt_times, load_note, reference_grid

from kspec_fluxcal._dask_on_demand import defer_dask_lookup
from kspec_fluxcal.grid.build import build_grid, read_bosz_spectrum, scan_bosz

N_LOADTXT = 40


def gzip_sizes(path):
    """(compressed, uncompressed) bytes of a gzip file (ISIZE trailer; files < 4 GB)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return size, int.from_bytes(fh.read(4), "little")


def main():
    defer_dask_lookup()  # as the command line does: the build imports no Dask
    grid_dir = reference_grid(full=True)
    scan = scan_bosz(grid_dir)
    models = scan["models"]
    paths = [m["path"] for m in models]
    on_disk = sorted(grid_dir.rglob("*.txt.gz"))
    nrows = int(np.loadtxt(scan["wave_file"]).size)
    sizes = np.array([gzip_sizes(p) for p in paths], dtype=float)
    comp_mb, text_mb = sizes.sum(axis=0) / 1e6
    print(f"grid: {grid_dir}")
    print(f"  {len(on_disk)} files on disk ({len(on_disk) - len(paths)} 'ap' twins skipped by "
          f"the MARCS-first policy); the 520-point grid less 20 holes = {len(paths)} files read, "
          f"{nrows} rows each; {comp_mb:.0f} MB gzip, {text_mb:.0f} MB text")
    print("shared 2-core machine: best of 3 runs each; files in the page cache (warm); "
          + load_note())

    out_dir = CACHE / "grid_build"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for workers in (1, 2):
        out = out_dir / f"cube_w{workers}.zarr"

        def clean(out=out):
            shutil.rmtree(out, ignore_errors=True)

        def build(out=out, workers=workers):
            return build_grid(grid_dir, out, workers=workers, progress=False)

        best, times, _, cpu = best_of(build, 3, setup=clean)
        results[workers] = best
        if workers == 1:
            cpu_build = min(cpu)
        print(f"build_grid workers={workers}: {fmt_times(times, cpu if workers == 1 else None)}; "
              f"{len(paths) / best:.1f} files/s, {comp_mb / best:.1f} MB/s gzip, "
              f"{text_mb / best:.0f} MB/s text")
    print(f"speed-up 2 workers / 1: {results[1] / results[2]:.2f}x")

    sub = [paths[i] for i in np.linspace(0, len(paths) - 1, N_LOADTXT).astype(int)]
    best_lt, times_lt, _, cpu_lt = best_of(lambda: [np.loadtxt(p) for p in sub])
    per_lt = best_lt / N_LOADTXT
    best_rd, times_rd, _, cpu_rd = best_of(lambda: [read_bosz_spectrum(p, nrows) for p in sub])
    per_rd = best_rd / N_LOADTXT
    loadtxt_all = per_lt * len(paths)
    print(f"np.loadtxt loop (one core): {per_lt * 1e3:.0f} ms/file measured on {N_LOADTXT} files "
          f"({fmt_times(times_lt, cpu_lt)}) -> {loadtxt_all:.0f} s extrapolated to {len(paths)} "
          f"files ({1 / per_lt:.1f} files/s)")
    print(f"read_bosz_spectrum loop (one core, the build's reader): {per_rd * 1e3:.0f} ms/file "
          f"on the same {N_LOADTXT} files ({fmt_times(times_rd, cpu_rd)}); loadtxt / reader = "
          f"{per_lt / per_rd:.1f}x")
    print(f"ratio loadtxt loop / build_grid: {loadtxt_all / results[1]:.1f}x (1 worker), "
          f"{loadtxt_all / results[2]:.1f}x (2 workers); on CPU time (1 worker, less sensitive "
          f"to the other load): {min(cpu_lt) / N_LOADTXT * len(paths) / cpu_build:.1f}x")
    print("end: " + load_note())


if __name__ == "__main__":
    main()
