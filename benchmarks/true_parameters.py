"""What the templates limit, not the fit: accuracy surveys calibrated twice, with the
standards' parameters as fitted and set to the simulator's truth.

    python benchmarks/true_parameters.py                        # (a), (b), (c), (d); ~8 minutes
    python benchmarks/true_parameters.py --only modelB-ck04 --set feh

The second run takes every step of the fit as it is (velocity, scan, line-spread width,
scale, photometric warp, E(B-V), the vectors and their combination) but replaces the chosen
(Teff, log g, [M/H], [alpha/M]) of each standard, or those named by ``--set``, with the
truth, in both passes of the parameter choice. Where the truth calibrates better, a better
fit would gain that much; where it calibrates worse, the templates do not look like the
stars at their own parameters, and the fit's parameter "errors" are what makes them fit:
there, parameters within a given distance of the truth and the calibration's accuracy ask
for different things. Survey definitions, caches and metrics are those of ``accuracy.py``
(cross-model surveys (a)-(d)); CALSPEC stars' "truth" is their reference parameters (no
[alpha/M]: theirs stays as fitted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor

import _common  # noqa: F401 (first: BLAS threads set before numpy loads)
import numpy as np
from _common import demo_grid, load_note
from accuracy import _init_worker, metric, run_survey, simulate, star_errors, surveys

FITTED = ("teff", "logg", "feh", "alpha")
DEFAULT_SURVEYS = ("calspec-ck04", "modelB-ck04", "alpha-beyond", "isoplane")

#: Set in each worker by :func:`_install`: the parameters to replace, the truth file of every
#: exposure (by EXPID), and the standards' fibers of the exposure being fitted.
_STATE = {"set": (), "truths": {}, "fibers": None, "cache": {}}


def _install(params, truths):
    """Worker initializer: the pool's usual set-up, then the parameter choice wrapped so that
    ``params`` come out at their true values."""
    import kspec_fluxcal.fit.line_spread as line_spread
    import kspec_fluxcal.fit.standards as standards

    _init_worker()
    _STATE.update(set=tuple(params), truths=truths)
    match, choose = standards.match_standards, line_spread.choose_parameters

    def matched(exposure, catalog):
        out = match(exposure, catalog)
        _STATE["fibers"] = out["fiber"].values.copy()  # the fit's star order
        return out

    def chosen(obs, tm, scan, phot, prior, config, start=None):
        values, errors = choose(obs, tm, scan, phot, prior, config, start=start)
        if not _STATE["set"]:
            return values, errors
        truth = _truth(obs.expid)
        row = [list(truth["std_fiber"]).index(int(f)) for f in _STATE["fibers"]]
        for p in _STATE["set"]:  # a CALSPEC star has no [alpha/M]: it stays as fitted
            true = np.asarray(truth[f"std_{p}"], dtype=float)[row]
            values[p] = np.where(np.isfinite(true), true, values[p])
        return values, errors

    standards.match_standards, line_spread.choose_parameters = matched, chosen


def _truth(expid):
    if expid not in _STATE["cache"]:
        _STATE["cache"][expid] = dict(np.load(_STATE["truths"][expid]))
    return _STATE["cache"][expid]


def _calibrate(conf, params, workers):
    """The survey's rows with ``params`` set to the truth (empty: as fitted)."""
    root = simulate(conf, demo_grid())
    entries = json.loads((root / "survey.json").read_text())["exposures"]
    truths = {e["expid"]: str(root / e["truth"]) for e in entries}
    ctx = multiprocessing.get_context("spawn")
    tag = "-truth-" + "-".join(params) if params else "-fitted"
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_install,
                             initargs=(params, truths)) as pool:
        return run_survey(dict(conf, name=conf["name"] + tag), pool)


def _line(label, rows):
    cs = 100 * metric(rows, "cal_shape")
    lv = 100 * np.abs(metric(rows, "level_cal"))
    err = star_errors(rows)
    fails = sum("metrics" not in r for r in rows)
    return (f"  {label:24s} cal_shape {np.median(cs):5.2f} / {np.percentile(cs, 90):5.2f} %"
            f"   |level_cal| {np.median(lv):5.2f} %   Teff error {np.median(err['teff']):4.0f}"
            f" / {np.percentile(err['teff'], 90):4.0f} K   log g {np.median(err['logg']):.2f}"
            f" / {np.percentile(err['logg'], 90):.2f}   [M/H] {np.median(err['feh']):.2f} / "
            f"{np.percentile(err['feh'], 90):.2f}   failed {fails}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated survey names of accuracy.py "
                        f"(default {','.join(DEFAULT_SURVEYS)})")
    parser.add_argument("--set", default=",".join(FITTED),
                        help="parameters set to the truth (default all four)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    params = tuple(p for p in args.set.split(",") if p)
    if set(params) - set(FITTED) or not params:
        parser.error(f"--set takes some of {', '.join(FITTED)}")
    names = args.only.split(",") if args.only else DEFAULT_SURVEYS
    confs = {c["name"]: c for c in surveys()}
    if set(names) - set(confs):
        parser.error(f"unknown survey(s) {sorted(set(names) - set(confs))}")
    print("cal_shape median / p90, |level_cal| median, |fitted - true| median / p90 of the "
          "standards (those the truth run sets read 0)")
    for name in names:
        conf = confs[name]
        print(conf["label"])
        print(_line("as fitted", _calibrate(conf, (), args.workers)), flush=True)
        print(_line(f"true {','.join(params)}", _calibrate(conf, params, args.workers)),
              flush=True)
    print(load_note())


if __name__ == "__main__":
    main()
