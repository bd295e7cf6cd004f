"""Fit the 3 standard stars of a 4096-pixel exposure against the 520-point reference grid
(500 existing templates), with the setup prepared beforehand: time on one core, the ratio to a
straightforward per-template loop, and a profile of where the time goes.

    python benchmarks/fit_speed.py

Targets (issue 4): ``fit_standards`` under 0.3 s on one core (for scale: DESI's
match_templates takes ~0.5 s per star against ~150 templates), and at least 30x faster than
the reference design's loop.

What is timed
-------------
* ``fit_standards(exposure, catalog, library, config)`` with ``library =
  template_library(grid, exposure, config)`` computed before timing (the prepared template
  library is given; the templates are brought to the exposure's pixels and line spread
  inside the fit, as every exposure needs): colour Teff, RV by
  cross-correlation, continuum normalisation, scoring, RV refinement, rescoring, lattice
  refinement from several starts, photometric scale and reddening, calibration vectors. Best
  of 3 runs after a warm-up (the machine is shared). Once with the default configuration
  (templates scored only inside each star's colour-Teff window, +/-750 K) and once with the
  window opened to the whole grid (every template scored).
* The reference loop, for each template separately: convolve the template (on the grid's
  ln(lambda) sampling) with ``scipy.ndimage.gaussian_filter1d`` (one sigma, at the centre of
  the range) and resample it with ``np.interp`` to the exposure's pixels; normalise its
  continuum with the package's ``continuum.fit_continuum`` (one spectrum); then for each star
  an FFT cross-correlation in ln(lambda) for the RV (peak + parabola), a shift with
  ``np.interp`` and chi^2 with a free amplitude. The raw templates are in memory before timing
  (no I/O), the observed spectra are normalised and Fourier transformed once outside the loop.
  It is timed on a subset of templates (best of 3) and extrapolated linearly to the grid.
  The loop does less than ``fit_standards`` (no refinement, photometry or calibration
  vectors), so the ratio understates the gain.

Runs on one core: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS = 1 are set before numpy is imported.
The reference cube is cached under store/bench (KSPEC_BENCH_DIR overrides); building it the
first time takes a few minutes.
"""

from __future__ import annotations

import csv
import warnings

import _common  # noqa: F401 (first: BLAS threads set before numpy loads)
import dask
import numpy as np
import scipy.ndimage
import xarray as xr
from _common import (
    CACHE,
    best_of,
    fmt_times,
    load_note,
    profile_top,
    reference_cube,
    reference_grid,
)

from kspec_fluxcal.catalog import read_catalog
from kspec_fluxcal.config import Config, continuum_options
from kspec_fluxcal.constants import FWHM_PER_SIGMA, SPEED_OF_LIGHT_KMS
from kspec_fluxcal.continuum import fit_continuum
from kspec_fluxcal.exposure import open_exposure
from kspec_fluxcal.fit.exposure_templates import template_library
from kspec_fluxcal.fit.matching import score_templates
from kspec_fluxcal.fit.standards import fit_standards
from kspec_fluxcal.grid import PARAMS, open_grid
from kspec_fluxcal.lsf import exposure_lsf
from kspec_fluxcal.masks import region_mask
from kspec_fluxcal.sim import CATALOG_HEADER, GridStars, Setup, simulate_exposure
from kspec_fluxcal.templates import library_spectra

SEED = 4
N_LOOP = 40  # templates timed in the reference loop
PACKAGE_MODULES = (r"(standards|matching|continuum|photometry|templates|grid|catalog|reddening"
                   r"|calibration)\.py")


def make_exposure(grid_dir):
    """A simulated 4096-pixel, 14-fiber exposure with 3 standards from the grid (cached)."""
    out = CACHE / "fit_speed"
    fits_path, cat_path, truth_path = out / "exposure.fits", out / "catalog.csv", out / "truth.npz"
    if not (fits_path.exists() and cat_path.exists() and truth_path.exists()):
        out.mkdir(parents=True, exist_ok=True)
        sim = simulate_exposure(np.random.default_rng(SEED), GridStars(grid_dir),
                                setup=Setup(pixels=4096, fibers=14), n_standards=3,
                                dead_fiber=False)
        sim.hdulist.writeto(fits_path, overwrite=True)
        with open(cat_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CATALOG_HEADER)
            writer.writerows([row[c] for c in CATALOG_HEADER] for row in sim.catalog)
        np.savez(truth_path, **sim.truth)
    return open_exposure(fits_path), read_catalog(cat_path), dict(np.load(truth_path))


# ----------------------------------------------------------------------------- reference loop


def observed_normalised(exposure, catalog_fibers, config, wave):
    """Continuum-normalised standards and inverse variances, as the package makes them."""
    flux = exposure["flux"].values[catalog_fibers]
    var = exposure["variance"].values[catalog_fibers]
    good = exposure["good"].values[catalog_fibers]
    mask = good & region_mask(wave, config.masks.telluric) & (flux > 0)
    cont = fit_continuum(flux, wave, mask, **continuum_options(config))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = flux / cont
        ivar = np.where(mask & np.isfinite(norm), cont**2 / var, 0.0)
    return np.nan_to_num(norm), ivar


class LogGrid:
    """FFT cross-correlation on a uniform ln(lambda) grid (one per setup)."""

    def __init__(self, wave, rv_max):
        self.ln = np.log(wave)
        self.n = wave.size
        self.grid = np.linspace(self.ln[0], self.ln[-1], self.n)
        self.step = self.grid[1] - self.grid[0]
        self.nfft = 2 * self.n
        self.lag_max = int(np.ceil(np.log1p(rv_max / SPEED_OF_LIGHT_KMS) / self.step))

    def spectrum(self, norm, weight):
        sig = np.interp(self.grid, self.ln, np.where(weight > 0, 1.0 - norm, 0.0))
        sig -= sig.mean()
        return np.fft.rfft(sig, self.nfft)

    def rv(self, f_obs, f_tmpl):
        ccf = np.fft.irfft(f_obs * np.conj(f_tmpl), self.nfft)
        lags = np.arange(-self.lag_max, self.lag_max + 1)
        values = ccf[lags % self.nfft]
        k = int(np.argmax(values))
        shift = float(lags[k])
        if 0 < k < values.size - 1:  # parabola through the peak
            a, b, c = values[k - 1], values[k], values[k + 1]
            den = a - 2 * b + c
            if den < 0:
                shift += 0.5 * (a - c) / den
        return SPEED_OF_LIGHT_KMS * np.expm1(shift * self.step)


def loop_reference(raw, ln_in, wave, lsf, resolving_power, obs_norm, obs_ivar, options, logs):
    """Per template: prepare, normalise; per star: RV by FFT, shift, chi^2. Returns scores."""
    mid = 0.5 * (wave[0] + wave[-1])
    dln = float(np.median(np.diff(ln_in)))
    sigma_ln = np.sqrt((lsf.fwhm(mid) / mid) ** 2 - (1.0 / resolving_power) ** 2) / FWHM_PER_SIGMA
    sigma_px = sigma_ln / dln
    ln_out = np.log(wave)
    f_obs = [logs.spectrum(obs_norm[s], obs_ivar[s]) for s in range(obs_norm.shape[0])]
    scores = np.full((obs_norm.shape[0], raw.shape[0]), np.nan)
    for t in range(raw.shape[0]):
        conv = scipy.ndimage.gaussian_filter1d(raw[t], sigma_px)
        prepared = np.interp(ln_out, ln_in, conv)
        tnorm = prepared / fit_continuum(prepared, wave, **options)
        ok = np.isfinite(tnorm)
        tnorm = np.where(ok, tnorm, 1.0)
        f_t = logs.spectrum(tnorm, ok.astype(float))
        for s in range(obs_norm.shape[0]):
            rv = logs.rv(f_obs[s], f_t)
            shifted = np.interp(ln_out, ln_out + np.log1p(rv / SPEED_OF_LIGHT_KMS), tnorm)
            w = obs_ivar[s]
            a = np.sum(w * obs_norm[s] * shifted) / np.sum(w * shifted**2)
            scores[s, t] = np.sum(w * (obs_norm[s] - a * shifted) ** 2)
    return scores


def loop_breakdown(raw, ln_in, wave, lsf, resolving_power, obs_norm, obs_ivar, options, logs):
    """Seconds per template of the loop's three parts (best of 3 each)."""
    mid = 0.5 * (wave[0] + wave[-1])
    dln = float(np.median(np.diff(ln_in)))
    sigma_px = np.sqrt((lsf.fwhm(mid) / mid) ** 2 - (1.0 / resolving_power) ** 2) \
        / FWHM_PER_SIGMA / dln
    ln_out = np.log(wave)
    n = raw.shape[0]

    def prepare():
        return [np.interp(ln_out, ln_in, scipy.ndimage.gaussian_filter1d(r, sigma_px))
                for r in raw]

    prepared = prepare()

    def continuum():
        return [p / fit_continuum(p, wave, **options) for p in prepared]

    normed = [np.where(np.isfinite(t), t, 1.0) for t in continuum()]
    f_obs = [logs.spectrum(obs_norm[s], obs_ivar[s]) for s in range(obs_norm.shape[0])]

    def score():
        for tnorm in normed:
            f_t = logs.spectrum(tnorm, np.ones(tnorm.size))
            for s in range(obs_norm.shape[0]):
                rv = logs.rv(f_obs[s], f_t)
                shifted = np.interp(ln_out, ln_out + np.log1p(rv / SPEED_OF_LIGHT_KMS), tnorm)
                w = obs_ivar[s]
                a = np.sum(w * obs_norm[s] * shifted) / np.sum(w * shifted**2)
                np.sum(w * (obs_norm[s] - a * shifted) ** 2)

    return {name: best_of(func)[0] / n for name, func in
            (("prepare", prepare), ("continuum", continuum), ("score", score))}


# ----------------------------------------------------------------------------- main


def main():
    warnings.simplefilter("ignore")
    cube = reference_cube()
    grid = open_grid(cube)
    exposure, catalog, truth = make_exposure(reference_grid(full=False))
    config = Config()
    wave = exposure["wavelength"].values
    lsf = exposure_lsf(exposure, config)
    with dask.config.set(scheduler="synchronous"):
        setup = template_library(grid, exposure, config, cache_dir=False)
    ntemplate = setup.sizes["template"]
    wide = config.replace(teff_window=1e5)
    setup_wide = setup  # the same library: the window is applied in the fit

    def fit():
        return fit_standards(exposure, catalog, setup, config)

    def fit_wide():
        return fit_standards(exposure, catalog, setup_wide, wide)

    stars = fit()  # warm-up (imports, caches)
    fit_wide()
    best, times, stars, cpu = best_of(fit)
    best_wide, times_wide, _, cpu_wide = best_of(fit_wide)

    # Templates inside some star's colour-Teff window (what the default fit scores).
    t_templates = setup["template_teff"].values
    tc = stars["teff_colour"].values
    window = config.fit.teff_window
    scored = int(np.sum(np.any(np.abs(t_templates[None, :] - tc[:, None]) <= window, axis=0)))

    # Reference loop on a subset of templates, spread over the grid.
    obs_norm, obs_ivar = observed_normalised(exposure, stars["fiber"].values, config, wave)
    lo, hi = wave[0] - 50.0, wave[-1] + 50.0
    gw = grid["wavelength"].values
    sel = np.flatnonzero((gw >= lo) & (gw <= hi))
    stacked = grid["flux"].isel(wavelength=sel).stack(template=PARAMS)
    exists = grid["exists"].stack(template=PARAMS).values
    pick = np.flatnonzero(exists)[np.linspace(0, exists.sum() - 1, N_LOOP).astype(int)]
    raw = stacked.isel(template=pick).transpose("template", "wavelength").values.astype(np.float64)
    ln_in = np.log(gw[sel])
    logs = LogGrid(wave, config.fit.rv_max)
    options = continuum_options(config)
    rp = float(grid.attrs["resolving_power"])

    def loop():
        return loop_reference(raw, ln_in, wave, lsf, rp, obs_norm, obs_ivar, options, logs)

    loop()  # warm-up
    best_loop, times_loop, _, cpu_loop = best_of(loop)
    per_template = best_loop / N_LOOP
    loop_all = per_template * ntemplate
    parts = loop_breakdown(raw, ln_in, wave, lsf, rp, obs_norm, obs_ivar, options, logs)

    # The vectorised scan alone: every template against the 3 stars (single amplitude).
    rv = stars["rv"].values
    norm_t = xr.DataArray(library_spectra(setup, wave, lsf), dims=("template", "wavelength"),
                          coords={"wavelength": wave})

    def scan():
        coords = {"wavelength": wave}
        return score_templates(xr.DataArray(obs_norm, dims=("star", "wavelength"), coords=coords),
                               xr.DataArray(obs_ivar, dims=("star", "wavelength"), coords=coords),
                               norm_t, xr.DataArray(rv, dims="star")).values

    scan()
    best_scan, times_scan, _, cpu_scan = best_of(scan)

    nstar = stars.sizes["star"]
    print(f"exposure: {wave.size} pixels, {exposure.sizes['fiber']} fibers, {nstar} standards; "
          f"grid: {grid['exists'].size} points, {ntemplate} existing templates "
          f"(20 holes), R = {rp:g}")
    print("one core (OMP/OPENBLAS threads = 1); shared 2-core machine: best of 3 runs; "
          + load_note())
    print(f"fit_standards, default config ({scored} of {ntemplate} templates inside the stars' "
          f"+/-{window:g} K colour-Teff windows): {fmt_times(times, cpu)}  (target < 0.3 s) "
          f"-> {best / nstar * 1e3:.0f} ms per star")
    print(f"fit_standards, window opened (all {ntemplate} templates scored): "
          f"{fmt_times(times_wide, cpu_wide)}")
    print(f"reference per-template loop (gaussian_filter1d + interp, fit_continuum, FFT RV, "
          f"shift, chi^2; {nstar} stars): {per_template * 1e3:.1f} ms/template measured on "
          f"{N_LOOP} templates ({fmt_times(times_loop, cpu_loop)}) -> {loop_all:.2f} s "
          f"extrapolated to {ntemplate}")
    print(f"  loop breakdown per template: prepare (gaussian_filter1d + interp) "
          f"{parts['prepare'] * 1e3:.2f} ms, fit_continuum {parts['continuum'] * 1e3:.2f} ms, "
          f"FFT + RV + shift + chi^2 for {nstar} stars {parts['score'] * 1e3:.2f} ms")
    print(f"vectorised scan alone (score_templates, {ntemplate} templates x {nstar} stars, "
          f"single amplitude): {fmt_times(times_scan, cpu_scan)} = "
          f"{best_scan / ntemplate * 1e3:.3f} ms/template vs the loop's "
          f"{per_template * 1e3:.2f} ms ({per_template * ntemplate / best_scan:.0f}x)")
    print(f"ratio loop({ntemplate}) / fit_standards: {loop_all / best:.0f}x default, "
          f"{loop_all / best_wide:.0f}x all templates scored (target >= 30x); "
          f"per scored template: loop {per_template * 1e3:.2f} ms vs vectorised "
          f"{best_wide / ntemplate * 1e3:.3f} ms")
    print("fitted vs true standards:")
    for k in range(nstar):
        fiber = int(stars["fiber"].values[k])
        j = int(np.flatnonzero(truth["std_fiber"] == fiber)[0])
        print(f"  fiber {fiber:2d}: Teff {stars['teff'].values[k]:6.0f} (true "
              f"{truth['std_teff'][j]:6.0f})  logg {stars['logg'].values[k]:.2f} "
              f"({truth['std_logg'][j]:.2f})  [M/H] {stars['feh'].values[k]:+.2f} "
              f"({truth['std_feh'][j]:+.2f})  RV {stars['rv'].values[k]:+7.1f} "
              f"({truth['std_rv'][j]:+7.1f})  E(B-V) {stars['ebv'].values[k]:.3f} "
              f"({truth['std_ebv'][j]:.3f})  S/N {stars['snr'].values[k]:.0f}  "
              f"{stars['status'].values[k]}")
    print("end: " + load_note())
    print("profile of one fit_standards call (default config), top 10 by own time:")
    print(profile_top(fit, 10, "tottime"))
    print("the same, package functions by cumulative time (what calls the above):")
    print(profile_top(fit, 10, "cumulative", restrict=PACKAGE_MODULES))


if __name__ == "__main__":
    main()
