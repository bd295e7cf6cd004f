"""Prepare the 520-template reference cube for a 4096-pixel setup: time, peak memory, and the
ratio to convolving and resampling each template separately (the reference design's loop).

    python benchmarks/prepare_templates.py

Target (issue 3): under 10 s on one core.
"""

from __future__ import annotations

import _common  # noqa: F401 (first: BLAS threads set before numpy loads)
import dask
import numpy as np
import scipy.interpolate
import scipy.ndimage
from _common import Timer, peak_rss_mb, reference_cube

from kspec_fluxcal.constants import FWHM_PER_SIGMA
from kspec_fluxcal.grid import open_grid
from kspec_fluxcal.lsf import LineSpread
from kspec_fluxcal.templates import prepare_templates


def loop_reference(grid, wave_out, lsf, n):
    """Per template: load, convolve (gaussian_filter1d, sigma at mid-range), interp1d."""
    flux = grid["flux"].stack(t=("teff", "logg", "feh", "alpha"))
    exists = grid["exists"].stack(t=("teff", "logg", "feh", "alpha")).values
    wave = grid["wavelength"].values
    step = np.median(np.diff(wave))
    lin = np.arange(wave[0], wave[-1], step)
    out = []
    for i in np.flatnonzero(exists)[:n]:
        f = flux.isel(t=i).values.astype(float)
        f = np.interp(lin, wave, f)
        sigma = np.sqrt(lsf.fwhm(6000.0) ** 2 - (6000.0 / 10000) ** 2) / FWHM_PER_SIGMA / step
        f = scipy.ndimage.gaussian_filter1d(f, sigma)
        out.append(scipy.interpolate.interp1d(lin, f)(wave_out))
    return np.array(out)


def main():
    cube = reference_cube()
    grid = open_grid(cube)
    n = int(grid["exists"].sum())
    wave = np.linspace(3600.0, 8400.0, 4096)
    lsf = LineSpread((5.0, 3.0, 0.5), "FWHMPC")
    with dask.config.set(scheduler="synchronous"):
        prepare_templates(grid, wave, lsf).load()  # warm-up (imports, caches)
        base = peak_rss_mb()
        with Timer() as t:
            prepared = prepare_templates(grid, wave, lsf).load()
        peak = peak_rss_mb()
        nloop = 40
        with Timer() as tl:
            loop_reference(grid, wave, lsf, nloop)
    per_loop = tl.seconds / nloop * n
    print(f"templates: {n} existing of {grid['exists'].size} grid points; "
          f"{grid.sizes['wavelength']} grid wavelengths -> 4096 pixels")
    print(f"prepare_templates (one core, synchronous): {t.seconds:.2f} s "
          f"(target < 10 s); prepared cube {prepared['flux'].nbytes / 1e6:.1f} MB")
    print(f"peak RSS {peak:.0f} MB (before {base:.0f} MB)")
    print(f"per-template loop (gaussian_filter1d + interp1d, constant sigma): "
          f"{tl.seconds / nloop * 1e3:.1f} ms/template -> {per_loop:.2f} s for {n} "
          f"(measured on {nloop}); ratio loop / vectorised = {per_loop / t.seconds:.1f}x")


if __name__ == "__main__":
    main()
