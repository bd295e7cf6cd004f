"""Accuracy of the calibration on simulated surveys: simulate -> calibrate -> compare with the
truth, per exposure and as survey medians and 90th percentiles, and scanned against the
standard stars' S/N and their number.

    python benchmarks/accuracy.py            # ~5-10 minutes on 2 cores
    python benchmarks/accuracy.py --quick    # fewer exposures, to try it out

Targets (issue 7): shape error < 1 % and absolute error < 2 % at standard-star S/N >= 30,
against the anchors SDSS ~4 % rms and BOSS ~6 %.

Metrics (``kspec_fluxcal.evaluate.compare_with_truth``; outside telluric bands, 4000-8400 A,
after a 100 A running median):

``cal_shape``
    rms of Cal / Cal_true - 1 after removing its median level: the calibration's own shape
    error, free of any science target's noise.
``shape``
    the same for the calibrated science spectra (calibrated / true flux), median over the
    exposure's science fibers. It adds each target's own photon noise (and sky residuals) to
    the calibration's error: faint galaxies and quasars stay noise-dominated even after the
    100 A median, so ``shape`` is an upper bound of the calibration's error, reached only by
    bright targets. Printed also for fibers whose target has a median S/N >= 30 per pixel
    (noiseless counts of the truth over the square root of the file's variance).
``level``
    median(calibrated / true) - 1 of the science fibers: the absolute error a user sees. It
    includes each fiber's own grey aperture loss (0.85-0.95, independent per fiber, relative
    to the mean of the standards'), which no calibration from other fibers can know.
``level_cal``
    the calibration's own level error: Cal x <aperture of the used standards> / Cal_true - 1.
``telluric``
    rms of the smoothed calibration error inside the telluric bands.
Standard stars: fitted minus true Teff, log g, [M/H], RV and E(B-V).

Surveys: the default demo-like synthetic grid (what ``simulate_survey(grid=None)`` writes:
R = 5000, Teff 5250-7250 K, log g 3.5-4.5, [M/H] -1.0 to +0.25; written once and reused),
4096 pixels, 14 fibers. A main survey with the default standard S/N range (30-150), then one
survey per S/N bin of the standards, grouped by the number of standards (1, 2 or 3; the
simulator draws it per exposure). Surveys are cached under store/bench/accuracy
(KSPEC_BENCH_DIR overrides); the calibrations are redone on every run, two exposures at a time
(one process per core).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _common import CACHE, demo_cube, demo_grid, load_note  # noqa: E402

MAIN = {"name": "main", "snr_range": (30.0, 150.0), "exposures": 30, "seed": 101}
SNR_BINS = ((15.0, 30.0), (30.0, 60.0), (60.0, 120.0), (120.0, 250.0))
SCAN_EXPOSURES = 24
TARGET_SNR = 30.0
PARAMS = ("teff", "logg", "feh", "rv", "ebv")
UNITS = {"teff": "K", "logg": "dex", "feh": "dex", "rv": "km/s", "ebv": "mag"}
LABELS = {"teff": "Teff", "logg": "logg", "feh": "[M/H]", "rv": "RV", "ebv": "E(B-V)"}


def configurations(quick):
    scale = 0.35 if quick else 1.0
    main = dict(MAIN, exposures=max(6, int(MAIN["exposures"] * scale)))
    scan = [{"name": f"snr{int(lo)}-{int(hi)}", "snr_range": (lo, hi),
             "exposures": max(6, int(SCAN_EXPOSURES * scale)), "seed": 201 + k}
            for k, (lo, hi) in enumerate(SNR_BINS)]
    return [main, *scan]


# ----------------------------------------------------------------------------- workers


def _init_worker():
    import dask

    warnings.simplefilter("ignore")
    dask.config.set(scheduler="synchronous")  # one core per worker process


def simulate(conf, grid_dir):
    """Simulate one survey unless a cached one has the same options; returns its directory."""
    from kspec_fluxcal.simulate import simulate_survey

    root = CACHE / "accuracy" / conf["name"]
    manifest = root / "survey.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        opts = info["options"]
        if (info["seed"] == conf["seed"] and opts["exposures"] == conf["exposures"]
                and opts["snr_range"] == list(conf["snr_range"])
                and opts["grid"] == str(Path(grid_dir).resolve())
                and opts["pixels"] == 4096 and opts["fibers"] == 14):
            return root
    t0 = time.perf_counter()
    simulate_survey(root, exposures=conf["exposures"], nights=4, seed=conf["seed"], fibers=14,
                    pixels=4096, grid=grid_dir, snr_range=conf["snr_range"], overwrite=True,
                    workers=1)
    print(f"  simulated {conf['name']}: {conf['exposures']} exposures in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return root


_OPENED = {}


def _opened(key, opener, path):
    if (key, path) not in _OPENED:
        _OPENED[(key, path)] = opener(path)
    return _OPENED[(key, path)]


def calibrate_one(root, entry, cube):
    """Calibrate one exposure and compare it with its truth (runs in a worker)."""
    import kspec_fluxcal as kf
    from kspec_fluxcal.evaluate import compare_with_truth

    root = Path(root)
    grid = _opened("grid", kf.open_grid, str(cube))
    catalog = _opened("catalog", kf.read_catalog, str(root / "catalog.csv"))
    out = root.parent / (root.name + "_out")
    red = root / entry["path"]
    truth_path = root / entry["truth"]
    row = {"survey": root.name, "expid": entry["expid"], "n_observed": entry["n_standards"]}
    t0 = time.perf_counter()
    try:
        result = kf.calibrate_exposure(red, catalog, grid, out=out, overwrite=True)
    except kf.FluxCalError as err:
        row["error"] = str(err)
        return row
    row["seconds"] = time.perf_counter() - t0
    truth = dict(np.load(truth_path))
    row["metrics"] = compare_with_truth(result.path, truth)
    row["science"] = row["metrics"]["fibers"]
    stars = result.stars
    fitted = []
    for k in range(stars.sizes["star"]):
        fiber = int(stars["fiber"].values[k])
        j = np.flatnonzero(np.asarray(truth["std_fiber"]) == fiber)
        if not j.size:
            continue
        j = int(j[0])
        fitted.append({
            "fiber": fiber, "status": str(stars["star_status"].values[k]),
            "used": bool(stars["used"].values[k]), "snr": float(truth["std_snr"][j]),
            **{f"fit_{p}": float(stars[p].values[k]) for p in PARAMS},
            **{f"true_{p}": float(truth[f"std_{p}"][j]) for p in PARAMS},
        })
    row["stars"] = fitted
    return row


# ----------------------------------------------------------------------------- reporting


def pct(values, q):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.percentile(values, q)) if values.size else np.nan


def pc(value, width):
    """A fraction as a percentage right-aligned in ``width`` characters ('-' for NaN)."""
    return f"{100 * value:{width}.2f}%" if np.isfinite(value) else f"{'-':>{width + 1}}"


def star_errors(rows, only_ok=True):
    """|fitted - true| of every standard star of the rows (fitted with status 'ok')."""
    out = {p: [] for p in PARAMS}
    for r in rows:
        for s in r.get("stars", []):
            if only_ok and s["status"] != "ok":
                continue
            for p in PARAMS:
                out[p].append(abs(s[f"fit_{p}"] - s[f"true_{p}"]))
    return {p: np.array(v) for p, v in out.items()}


def summary(rows, label):
    ok = [r for r in rows if "metrics" in r]
    m = {k: np.array([r["metrics"][k] for r in ok]) for k in
         ("cal_shape", "shape", "level", "level_cal", "telluric")}
    sci = [s for r in ok for s in r["science"]]
    bright = np.array([shape for _, snr, shape in sci if snr >= TARGET_SNR])
    faint = np.array([shape for _, snr, shape in sci if snr < TARGET_SNR])
    per_exp_bright = np.array([np.median([sh for _, sn, sh in r["science"] if sn >= TARGET_SNR])
                               for r in ok if any(sn >= TARGET_SNR for _, sn, _ in r["science"])])
    n_fail = len(rows) - len(ok)
    print(f"{label}: {len(ok)} exposures calibrated"
          + (f", {n_fail} FAILED" if n_fail else "") + "; median / 90th percentile:")
    print(f"  cal_shape (calibration's own shape)   {100 * pct(m['cal_shape'], 50):5.2f}% / "
          f"{100 * pct(m['cal_shape'], 90):5.2f}%   (target < 1%)")
    print(f"  shape (science fibers, all)           {100 * pct(m['shape'], 50):5.2f}% / "
          f"{100 * pct(m['shape'], 90):5.2f}%")
    print(f"  shape (science, target S/N >= {TARGET_SNR:g})     "
          f"{100 * pct(bright, 50):5.2f}% / {100 * pct(bright, 90):5.2f}%   over {bright.size} "
          f"fibers (per-exposure medians: {100 * pct(per_exp_bright, 50):.2f}% / "
          f"{100 * pct(per_exp_bright, 90):.2f}%)")
    print(f"  shape (science, target S/N < {TARGET_SNR:g})      "
          f"{100 * pct(faint, 50):5.2f}% / {100 * pct(faint, 90):5.2f}%   over {faint.size} fibers")
    print(f"  |level| (science, incl. aperture loss) {100 * pct(np.abs(m['level']), 50):5.2f}% / "
          f"{100 * pct(np.abs(m['level']), 90):5.2f}%   (signed median "
          f"{100 * pct(m['level'], 50):+.2f}%)")
    lc = np.abs(m["level_cal"])
    print(f"  |level_cal| (calibration's own level)  {100 * pct(lc, 50):5.2f}% / "
          f"{100 * pct(lc, 90):5.2f}%   (target < 2%; signed median "
          f"{100 * pct(m['level_cal'], 50):+.2f}%)")
    print(f"  telluric bands (calibration)          {100 * pct(m['telluric'], 50):5.2f}% / "
          f"{100 * pct(m['telluric'], 90):5.2f}%")
    err = star_errors(ok)
    nstars = sum(len(r["stars"]) for r in ok)
    print(f"  standards (status ok: {err['teff'].size} of {nstars}), |fitted - true| median / "
          "90th percentile:")
    print("    " + "; ".join(f"{LABELS[p]} {pct(err[p], 50):.3g} / {pct(err[p], 90):.3g} {UNITS[p]}"
                             for p in PARAMS))


def verdict(rows):
    """The targets, checked on the 90th percentiles (the medians are well inside)."""
    ok = [r for r in rows if "metrics" in r]
    cs = pct([r["metrics"]["cal_shape"] for r in ok], 90)
    br = pct([s for r in ok for _, sn, s in r["science"] if sn >= TARGET_SNR], 90)
    lc = pct([abs(r["metrics"]["level_cal"]) for r in ok], 90)
    lv = pct([abs(r["metrics"]["level"]) for r in ok], 90)
    yes = {True: "met", False: "NOT met"}
    print(f"  shape < 1%: calibration p90 {100 * cs:.2f}% {yes[bool(cs < 0.01)]}; science targets "
          f"with S/N >= {TARGET_SNR:g}, p90 {100 * br:.2f}% {yes[bool(br < 0.01)]}")
    print(f"  absolute < 2%: calibration's level p90 {100 * lc:.2f}% {yes[bool(lc < 0.02)]}; "
          f"science level incl. per-fiber aperture loss p90 {100 * lv:.2f}% "
          f"{yes[bool(lv < 0.02)]} (aperture losses are 0.85-0.95 per fiber, independent)")


def exposure_line(r):
    if "metrics" not in r:
        return f"{r['expid']} n={r['n_observed']} FAILED: {r['error']}"
    m = r["metrics"]
    stars = " ".join(
        f"[dT{s['fit_teff'] - s['true_teff']:+.0f} dg{s['fit_logg'] - s['true_logg']:+.2f} "
        f"dm{s['fit_feh'] - s['true_feh']:+.2f} dv{s['fit_rv'] - s['true_rv']:+.1f} "
        f"dE{s['fit_ebv'] - s['true_ebv']:+.3f} sn{s['snr']:.0f}"
        f"{'' if s['status'] == 'ok' and s['used'] else ' ' + s['status'][:24]}]"
        for s in r["stars"])
    return (f"{r['expid']} n={r['n_observed']}/{m['n_standards']} cal_shape "
            f"{100 * m['cal_shape']:.2f}% shape {100 * m['shape']:.2f}% level "
            f"{100 * m['level']:+.2f}% level_cal {100 * m['level_cal']:+.2f}% tell "
            f"{100 * m['telluric']:.2f}% {stars}")


def scan_table(rows_by_bin):
    head = (f"{'standards S/N':>13} {'n_std':>5} {'N':>3} {'cal_shape med/p90':>18} "
            f"{'shape med':>9} {'shape S/N>=30':>13} {'|level| med':>11} "
            f"{'|level_cal| med/p90':>19} {'tell med':>8} {'|dTeff| med':>11} {'|d[M/H]| med':>12}")
    print(head)
    for name, rows in rows_by_bin:
        for n in (1, 2, 3, None):
            sel = [r for r in rows if "metrics" in r and (n is None or r["n_observed"] == n)]
            if not sel:
                continue
            cs = [r["metrics"]["cal_shape"] for r in sel]
            sh = [r["metrics"]["shape"] for r in sel]
            br = [s for r in sel for _, sn, s in r["science"] if sn >= TARGET_SNR]
            lv = [abs(r["metrics"]["level"]) for r in sel]
            lc = [abs(r["metrics"]["level_cal"]) for r in sel]
            te = [r["metrics"]["telluric"] for r in sel]
            err = star_errors(sel)
            print(f"{name:>13} {'all' if n is None else n:>5} {len(sel):>3} "
                  f"{100 * pct(cs, 50):7.2f}% /{100 * pct(cs, 90):6.2f}% "
                  f"{100 * pct(sh, 50):8.2f}% {pc(pct(br, 50), 12)} "
                  f"{100 * pct(lv, 50):10.2f}% "
                  f"{100 * pct(lc, 50):8.2f}% /{100 * pct(lc, 90):6.2f}% "
                  f"{100 * pct(te, 50):7.2f}% {pct(err['teff'], 50):9.0f} K "
                  f"{pct(err['feh'], 50):10.3f}")


def outliers(rows, limit=0.01):
    bad = [r for r in rows if "metrics" in r and r["metrics"]["cal_shape"] > limit]
    failed = [r for r in rows if "metrics" not in r]
    print(f"exposures with cal_shape > {100 * limit:g}%: {len(bad)} of "
          f"{sum('metrics' in r for r in rows)}" + (f"; failed: {len(failed)}" if failed else ""))
    for r in failed:
        print(f"  {r['survey']}/{r['expid']}: FAILED: {r['error']}")
    rejected = [(r, s) for r in rows for s in r.get("stars", []) if s["status"] != "ok"]
    print(f"standards not used (status other than 'ok'): {len(rejected)} of "
          f"{sum(len(r.get('stars', [])) for r in rows)}")
    for r, s in rejected:
        print(f"  {r['survey']}/{r['expid']} fiber {s['fiber']:2d} S/N {s['snr']:5.1f}: "
              f"{s['status']}; " + ", ".join(f"{LABELS[p]} {s[f'fit_{p}']:.4g} "
                                            f"(true {s[f'true_{p}']:.4g})" for p in PARAMS))
    for r in bad:
        m = r["metrics"]
        print(f"  {r['survey']}/{r['expid']}: cal_shape {100 * m['cal_shape']:.2f}%, level_cal "
              f"{100 * m['level_cal']:+.2f}%, {m['n_standards']} of {r['n_observed']} standards "
              "used")
        for s in r["stars"]:
            print(f"    fiber {s['fiber']:2d} S/N {s['snr']:5.1f} {s['status'][:40]:<12} "
                  f"{'used' if s['used'] else 'not used'}: "
                  + ", ".join(f"{LABELS[p]} {s[f'fit_{p}']:.4g} (true {s[f'true_{p}']:.4g})"
                              for p in PARAMS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a third of the exposures")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    grid_dir = demo_grid()
    cube = demo_cube()
    confs = configurations(args.quick)
    print(f"grid: {grid_dir} (demo-like synthetic, R = 5000) -> {cube}")
    print("setup: 4096 pixels, 14 fibers; surveys: "
          + ", ".join(f"{c['name']} (standards S/N {c['snr_range'][0]:g}-{c['snr_range'][1]:g}, "
                      f"{c['exposures']} exposures)" for c in confs), flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker) as pool:
        roots = list(pool.map(simulate, confs, [grid_dir] * len(confs)))
        t_sim = time.perf_counter() - t_start
        jobs = []
        for conf, root in zip(confs, roots, strict=True):
            info = json.loads((root / "survey.json").read_text())
            jobs += [(conf["name"], pool.submit(calibrate_one, str(root), e, str(cube)))
                     for e in info["exposures"]]
        rows = {c["name"]: [] for c in confs}
        for name, fut in jobs:
            rows[name].append(fut.result())
    t_all = time.perf_counter() - t_start
    seconds = [r["seconds"] for rs in rows.values() for r in rs if "seconds" in r]

    main_rows = rows[confs[0]["name"]]
    print()
    print(f"=== main survey: standards S/N {confs[0]['snr_range'][0]:g}-"
          f"{confs[0]['snr_range'][1]:g}, per exposure (n = observed/used standards; "
          "d = fitted - true per standard) ===")
    for r in main_rows:
        print(exposure_line(r))
    print()
    summary(main_rows, "main survey")
    print("  anchors: SDSS ~4% rms, BOSS ~6%; targets < 1% shape, < 2% absolute at S/N >= 30")
    verdict(main_rows)
    print()
    print("=== scan: standards' S/N bin x number of standards (medians; shape S/N>=30 pools the "
          "science fibers with target S/N >= 30) ===")
    scan_table([(c["name"].replace("snr", ""), rows[c["name"]]) for c in confs[1:]])
    print()
    for c in confs[1:]:
        summary(rows[c["name"]], f"S/N bin {c['snr_range'][0]:g}-{c['snr_range'][1]:g}")
    print()
    outliers([r for rs in rows.values() for r in rs])
    print()
    print(f"time: {t_all:.0f} s total on {args.workers} processes (simulation {t_sim:.0f} s, "
          f"cached surveys are reused); calibrate_exposure median {np.median(seconds):.2f} s "
          f"per exposure; {load_note()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
