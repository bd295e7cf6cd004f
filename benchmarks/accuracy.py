"""Accuracy of the calibration on simulated surveys: simulate -> calibrate -> compare with the
truth. Cross-model surveys first (standards NOT from the templates' model: the real accuracy),
then the self-consistency ones (standards from the template grid itself).

    python benchmarks/accuracy.py            # ~10-15 minutes on 2 cores (first run longer)
    python benchmarks/accuracy.py --quick    # 8 exposures per survey, no S/N scan
    python benchmarks/accuracy.py --quick --only calspec-ck04,calspec-ck04-xp   # (a), (a-xp)

Targets (issue 7): shape error < 1 % and absolute error < 2 % at standard-star S/N >= 30,
against the anchors SDSS ~4 % rms and BOSS ~6 %. Issue 11: measure them cross-model.

Cross-model surveys (issue 11), >= 20 exposures each, standards' S/N 20-300 (but (g)),
1-3 standards:

(a)  ``calspec-ck04``: real CALSPEC F/G stars (and BD+26 2606, "A5", fitted at 6590 K) with
     the CK04 templates, on the IsoPlane setup (~10 A FWHM, WCS only): the only instrument
     where CK04's 20 A sampling and CALSPEC's R ~ 800 are meaningful.
(a-xp) ``calspec-ck04-xp``: (a) calibrated with the standards' simulated Gaia XP spectra
     (``simulate_survey(xp=True)``: the truth at XP's resolution and sampling, noise for the
     star's G, a smooth per-star systematic of ~1 % rms, 2-3 % below 400 nm, unknown to the
     fitter). Issue 15's target: cal_shape median < 0.5 %.
(a') ``calspec-synth``: the same simulated exposures with the synthetic (demo) templates.
(b)  ``modelB-ck04``: stars of the second synthetic model family (computed at their own,
     off-grid parameters) with CK04 templates, IsoPlane. Family B rather than A, so that the
     same star population also feeds (d) and (e), where the templates are family A.
(c)  ``alpha-beyond``: family-A model stars with [alpha/M] 0.3-0.5 (the demo grid stops at
     +0.25) and Teff, log g, [M/H] all at least a quarter step from the grid's nodes, with the
     demo templates, default setup (4096 pixels).
(d)  ``isoplane``: family-B stars, demo templates, the IsoPlane setup with instrument realism:
     true LSF 1.00-1.05 x the header's, a 2 % per-fiber FWHM scatter (FIBRES LSF_SCALE) and
     the pixel box on top of the Gaussian.
(e)  ``mixed``: as (d), with the IsoPlane, default (4096 px) and large (30 fibers x 2048 px)
     setups in turn.
(f)  ``ck04-synth``: CK04 spectra as stars (``GridStars``, interpolated inside the demo
     grid's box), synthetic templates, IsoPlane. The simulator only samples CK04's 20 A steps
     (``source_sharper`` 1; a warning once per survey): the stars' lines come out ~25 A FWHM
     where the header says ~10 A, the IsoPlane being where this is least wrong.
(g)  ``calspec-bright``: as (a), the standards at S/N 300-1000 (bright standards).
(h)  ``beyond-synth``: model-B stars just beyond the demo grid's box (Teff 4850-7650 K, log g
     3.2-4.8, [M/H] -1.3 to +0.5, each outside 5250-7250 K, 3.5-4.5, -1.0 to +0.25 in one at
     least), synthetic templates, (d)'s IsoPlane and realism (its control inside the grid).
     A table per star: what is beyond, fitted against true, flags.
(i)  ``bosz-ck04``: the two real BOSZ 2024 spectra (6000 K, log g 4.0; 4750 K, log g 4.5;
     [M/H] 0; R = 5000) as standards at exactly their parameters (``GridNodes``), CK04
     templates, IsoPlane. (i') ``bosz-synth``: the same exposures with the synthetic
     templates, where the 4750 K star is beyond the grid's Teff edge.
(j)  ``humid``: (d)'s survey (its seed), water 2-8 x the line list's reference column and
     airmass 1.0-2.8 (``airmass_range``, ``pwv_range``; default 1.0-2.0, 0.4-2.5).
(k)  ``isoplane-fiber-arc``: (d)'s exposures (its seed) with a round fiber's line spread
     (``lsf_shape="fiber"``) and arc errors of 0.1 px rms (``arc_error``: shift and tilt).
(l)  ``isoplane-2nd``: (d)'s exposures with second-order light (``second_order=0.05``).

Self-consistency: the demo-like synthetic grid (R = 5000, Teff 5250-7250 K, log g 3.5-4.5,
[M/H] -1.0 to +0.25) as stars and templates, 4096 px, 14 fibers: a ``main`` survey
(standards' S/N 30-150), then one survey per S/N bin.

Metrics (``kspec_fluxcal.sim.compare_with_truth``; outside telluric bands, 4000-8400 A,
after a 100 A running median): ``shape_snr10`` (science fibers with S/N > 10: the headline),
``cal_shape`` (the calibration's own shape error), ``level_cal`` (its level error),
``telluric_science`` (the bands as science targets see them), the same two without the
targets' noise (``*_noiseless``) and under a perfect calibration of the same data (noise
floor, ``evaluate.with_true_calibration``), standards' fitted minus true parameters, failures.

Surveys are simulated once and cached under store/bench/accuracy (KSPEC_BENCH_DIR overrides;
CALSPEC and CK04 are read from ../shared/real, KSPEC_SHARED_REAL overrides); the calibrations
are redone on every run, two exposures at a time, with the package's default settings
(``--config FILE``: another). An exposure that raises anything is reported, not fatal.
Then the survey job calibrates each survey again (``run_survey``, 2-worker LocalCluster,
survey model on; ``--no-survey-job``: not): the model averages the standards' own errors
(noise, template and XP errors), not what they all share; it serves a setup with at least
``[model] min_exposures`` exposures (not survey (e)'s three setups of ~7).

Importable: :func:`surveys` (the definitions), :func:`run_survey` (simulate, cached, and
calibrate one: its rows), :func:`report` (a cross-model block).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import sys
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import _common  # noqa: F401 (first: BLAS threads set before numpy loads)
import numpy as np
from _common import CACHE, SHARED_REAL, ck04_cube, demo_cube, demo_grid, load_note

SNR_BINS = ((15.0, 30.0), (30.0, 60.0), (60.0, 120.0), (120.0, 250.0))
SCAN_EXPOSURES = 24
TARGET_SNR = 30.0
PARAMS = ("teff", "logg", "feh", "rv", "ebv")
UNITS = {"teff": "K", "logg": "dex", "feh": "dex", "rv": "km/s", "ebv": "mag"}
LABELS = {"teff": "Teff", "logg": "logg", "feh": "[M/H]", "rv": "RV", "ebv": "E(B-V)"}
#: Instrument realism of surveys (d) and (e).
REALISM = {"lsf_scale": (1.0, 1.05), "fiber_lsf_scatter": 0.02, "pixel_integration": True}
#: Demo-grid nodes that survey (c)'s stars keep a quarter step away from.
DEMO_NODES = {"teff": list(range(5250, 7251, 250)), "logg": [3.5, 4.0, 4.5],
              "feh": [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25]}
CROSS = {"snr_range": (20.0, 300.0), "n_standards": (1, 3), "nights": 4}
#: The demo grid's box, and survey (h)'s stars' box around it (each star outside the former).
DEMO_BOX = {p: (v[0], v[-1]) for p, v in DEMO_NODES.items()}
BEYOND_BOX = {"teff": (4850.0, 7650.0), "logg": (3.2, 4.8), "feh": (-1.3, 0.5)}


def surveys(quick=False):
    """The benchmark's surveys, cross-model first.

    Each is a dict: ``name``, ``label``, ``sim`` (the simulated survey's name, maybe shared),
    ``templates`` ('ck04' or 'demo'), ``cross`` (cross-model or not) and the simulation's
    ``exposures``, ``seed``, ``setups`` (names), ``standards`` (a :func:`make_source` spec),
    ``snr_range``, ``n_standards``, ``options``.
    """
    n = 8 if quick else 20
    cross = [
        {"name": "calspec-ck04", "label": "(a) CALSPEC F/G stars, CK04 templates, IsoPlane",
         "sim": "calspec-isoplane", "templates": "ck04", "setups": ["isoplane"],
         "standards": {"kind": "calspec"}, "seed": 1101, "options": {"xp": True}},
        {"name": "calspec-ck04-xp", "label": "(a-xp) as (a), calibrated with the standards' "
         "Gaia XP spectra", "sim": "calspec-isoplane", "templates": "ck04",
         "setups": ["isoplane"], "standards": {"kind": "calspec"}, "seed": 1101,
         "options": {"xp": True}, "use_xp": True},
        {"name": "calspec-synth", "label": "(a') CALSPEC F/G stars, synthetic templates, IsoPlane",
         "sim": "calspec-isoplane", "templates": "demo", "setups": ["isoplane"],
         "standards": {"kind": "calspec"}, "seed": 1101, "options": {"xp": True}},
        {"name": "modelB-ck04", "label": "(b) model-B stars (off-grid), CK04 templates, IsoPlane",
         "sim": "modelB-isoplane", "templates": "ck04", "setups": ["isoplane"],
         "standards": {"kind": "model", "family": "B"}, "seed": 1102},
        {"name": "alpha-beyond", "label": "(c) model-A stars, [alpha/M] 0.3-0.5 and between "
         "nodes, synthetic templates, 4096 px", "sim": "alpha-beyond", "templates": "demo",
         "setups": ["default"], "standards": {"kind": "model", "family": "A",
                                              "ranges": {"alpha": (0.3, 0.5)},
                                              "nodes": DEMO_NODES, "node_distance": 0.25},
         "seed": 1103},
        {"name": "isoplane", "label": "(d) model-B stars, synthetic templates, IsoPlane (WCS "
         "only), LSF x1.00-1.05, fiber LSF 2 %, pixel box", "sim": "isoplane-real",
         "templates": "demo", "setups": ["isoplane"], "options": REALISM,
         "standards": {"kind": "model", "family": "B"}, "seed": 1104},
        {"name": "mixed", "label": "(e) model-B stars, synthetic templates, IsoPlane + 4096 px "
         "+ 30x2048 px setups, same realism", "sim": "mixed-real", "templates": "demo",
         "setups": ["isoplane", "default", "large"], "options": REALISM,
         "standards": {"kind": "model", "family": "B"}, "seed": 1105},
        {"name": "ck04-synth", "label": "(f) CK04 spectra as stars (inside the demo grid), "
         "synthetic templates, IsoPlane", "sim": "ck04-isoplane", "templates": "demo",
         "setups": ["isoplane"], "standards": {"kind": "ck04"}, "seed": 1106},
        {"name": "calspec-bright", "label": "(g) CALSPEC F/G stars at S/N 300-1000, CK04 "
         "templates, IsoPlane", "sim": "calspec-bright", "templates": "ck04",
         "setups": ["isoplane"], "standards": {"kind": "calspec"}, "seed": 1107,
         "snr_range": (300.0, 1000.0)},
        {"name": "beyond-synth", "label": "(h) model-B stars beyond the demo grid's edges, "
         "synthetic templates, IsoPlane with (d)'s realism", "sim": "beyond-real",
         "templates": "demo", "setups": ["isoplane"], "options": REALISM,
         "standards": {"kind": "model", "family": "B", "ranges": BEYOND_BOX,
                       "beyond": DEMO_BOX}, "seed": 1108},
        {"name": "bosz-ck04", "label": "(i) real BOSZ 2024 spectra (6000 K / 4.0, 4750 K / 4.5, "
         "[M/H] 0), CK04 templates, IsoPlane", "sim": "bosz-isoplane", "templates": "ck04",
         "setups": ["isoplane"], "standards": {"kind": "nodes", "dir": "bosz2024_r5000"},
         "seed": 1109},
        {"name": "bosz-synth", "label": "(i') as (i), synthetic templates (4750 K is beyond "
         "the grid)", "sim": "bosz-isoplane", "templates": "demo", "setups": ["isoplane"],
         "standards": {"kind": "nodes", "dir": "bosz2024_r5000"}, "seed": 1109},
        {"name": "humid", "label": "(j) as (d), water 2-8 x the reference column, airmass "
         "1.0-2.8", "sim": "isoplane-humid", "templates": "demo", "setups": ["isoplane"],
         "standards": {"kind": "model", "family": "B"}, "seed": 1104,
         "options": {**REALISM, "airmass_range": (1.0, 2.8), "pwv_range": (2.0, 8.0)}},
        {"name": "isoplane-fiber-arc", "label": "(k) as (d), a fiber-image LSF, arc errors 0.1 px",
         "sim": "isoplane-fiber-arc", "templates": "demo", "setups": ["isoplane"],
         "options": {**REALISM, "lsf_shape": "fiber", "arc_error": 0.1},
         "standards": {"kind": "model", "family": "B"}, "seed": 1104},
        {"name": "isoplane-2nd", "label": "(l) as (d), second-order light 0.05", "sim":
         "isoplane-2nd05", "templates": "demo", "setups": ["isoplane"], "seed": 1104, "options":
         {**REALISM, "second_order": 0.05}, "standards": {"kind": "model", "family": "B"}},
    ]
    for conf in cross:
        conf.update({**CROSS, **conf}, exposures=n, cross=True)
        conf.setdefault("options", {})
    base = {"templates": "demo", "setups": ["default"], "standards": {"kind": "grid"},
            "options": {}, "n_standards": (1, 3), "nights": 4, "cross": False}
    main = {**base, "name": "main", "label": "main (self-model: demo grid stars and templates)",
            "sim": "main", "snr_range": (30.0, 150.0), "exposures": 10 if quick else 30,
            "seed": 101}
    scan = [] if quick else [
        {**base, "name": f"snr{int(lo)}-{int(hi)}", "label": f"S/N bin {lo:g}-{hi:g}",
         "sim": f"snr{int(lo)}-{int(hi)}", "snr_range": (lo, hi), "exposures": SCAN_EXPOSURES,
         "seed": 201 + k} for k, (lo, hi) in enumerate(SNR_BINS)]
    return [*cross, main, *scan]


# ----------------------------------------------------------------------------- workers


def _init_worker():
    import dask

    warnings.simplefilter("ignore")
    dask.config.set(scheduler="synchronous")  # one core per worker process


def make_source(spec):
    """A star source from a spec of :func:`surveys` (None: the grid itself): ``grid``, ``calspec``,
    ``ck04`` (the converted CK04 grid, interpolated), ``nodes`` (a BOSZ-layout directory of
    ``../shared/real`` at its own points) or ``model``."""
    from _common import ck04_grid

    from kspec_fluxcal.sim import CalspecStars, GridNodes, GridStars, ModelStars

    if spec["kind"] == "grid":
        return None
    if spec["kind"] == "calspec":
        return CalspecStars(SHARED_REAL / "calspec")
    if spec["kind"] == "ck04":
        return GridStars(ck04_grid())
    if spec["kind"] == "nodes":
        return GridNodes(SHARED_REAL / spec["dir"])
    return ModelStars(spec["family"], ranges=spec.get("ranges"), nodes=spec.get("nodes"),
                      node_distance=spec.get("node_distance", 0.2), beyond=spec.get("beyond"))


def _setups(names):
    from kspec_fluxcal.sim import DEFAULT_SETUP, ISOPLANE_SETUP, LARGE_SETUP

    table = {"isoplane": ISOPLANE_SETUP, "default": DEFAULT_SETUP, "large": LARGE_SETUP}
    return [table[n] for n in names]


def _signature(conf, grid_dir):
    from kspec_fluxcal.sim import GENERATOR_VERSION

    keys = ("exposures", "seed", "setups", "standards", "snr_range", "n_standards", "options",
            "nights")
    sig = {k: conf[k] for k in keys}
    sig["grid"] = str(Path(grid_dir).resolve())
    sig["model"] = GENERATOR_VERSION  # the stellar model of the stars
    return json.loads(json.dumps(sig))  # tuples -> lists, as read back


def simulate(conf, grid_dir):
    """Simulate one survey unless a cached one has the same definition; returns its directory."""
    from kspec_fluxcal.sim import simulate_survey

    root = CACHE / "accuracy" / conf["sim"]
    stamp = root / "bench.json"
    signature = _signature(conf, grid_dir)
    if stamp.exists() and json.loads(stamp.read_text()) == signature:
        return root
    t0 = time.perf_counter()
    simulate_survey(root, exposures=conf["exposures"], nights=conf["nights"], seed=conf["seed"],
                    grid=grid_dir, snr_range=conf["snr_range"], setups=_setups(conf["setups"]),
                    standard_source=make_source(conf["standards"]),
                    n_standards=conf["n_standards"], overwrite=True, workers=1,
                    **conf["options"])
    stamp.write_text(json.dumps(signature))
    print(f"  simulated {conf['sim']}: {conf['exposures']} exposures in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return root


_OPENED = {}


def _opened(key, opener, path):
    if (key, path) not in _OPENED:
        _OPENED[(key, path)] = opener(path)
    return _OPENED[(key, path)]


def _failure(row, err):
    """Record why an exposure failed: the per-star reasons of a CalibrationError, else the
    exception's type and message."""
    import kspec_fluxcal as kf

    row["error"] = f"{type(err).__name__}: {err}"
    if isinstance(err, kf.CalibrationError) and err.reasons:
        row["reasons"] = [str(v) for v in err.reasons.values()]
    elif isinstance(err, kf.FluxCalError):
        row["reasons"] = [str(err).split(" (")[0]]
    else:
        row["reasons"] = [f"{type(err).__name__} (unexpected)"]
        row["traceback"] = traceback.format_exc(limit=4)
    return row


def calibrate_one(name, root, entry, cube, use_xp=False, config=None):
    """Calibrate one exposure and compare it with its truth (runs in a worker); never raises.
    ``use_xp``: with the survey's XP spectra (``xp.csv``); ``config``: a TOML file (None: the
    defaults)."""
    import kspec_fluxcal as kf
    from kspec_fluxcal.sim import compare_with_truth, with_true_calibration
    from kspec_fluxcal.xp import read_xp

    root = Path(root)
    row = {"survey": name, "expid": entry["expid"], "n_observed": entry["n_standards"],
           "setup": entry["setup"]}
    t0 = time.perf_counter()
    try:
        grid = _opened("grid", kf.open_grid, str(cube))
        catalog = _opened("catalog", kf.read_catalog, str(root / "catalog.csv"))
        out = root.parent / f"{root.name}_out_{name}"
        xp = _opened("xp", read_xp, str(root / "xp.csv")) if use_xp else None
        result = kf.calibrate_exposure(root / entry["path"], catalog, grid, out=out,
                                       overwrite=True, xp=xp, config=config)
        truth = dict(np.load(root / entry["truth"]))
        row["metrics"] = compare_with_truth(result.path, truth)
        # The floor the targets' noise sets: the same data under a perfect calibration.
        row["metrics"]["floor"] = compare_with_truth(
            with_true_calibration(kf.open_exposure(result.path), truth), truth)
    except Exception as err:  # the benchmark reports every failure, it never stops on one
        return _failure(row, err)
    row["seconds"] = time.perf_counter() - t0
    row["science"] = row["metrics"]["fibers"]
    names = truth.get("std_name", np.full(len(truth["std_fiber"]), ""))
    used = dict(zip(result.stars["fiber"].values.tolist(),
                    np.asarray(result.stars["used"].values, bool).tolist(), strict=True))
    flags = dict(zip(result.stars["fiber"].values.tolist(),
                     [str(v) for v in result.stars["flags"].values], strict=True))
    xp_of = {int(f): (bool(u), float(r), float(q)) for f, u, r, q in zip(
        result.stars["fiber"].values, result.stars["xp_used"].values,
        result.stars["xp_ratio"].values, result.stars["xp_rms"].values, strict=True)}
    row["sharper"] = float(truth.get("source_sharper", np.nan))
    row["stars"] = [{**s, "used": used.get(s["fiber"], False), "flags": flags.get(s["fiber"], ""),
                     "name": str(names[list(truth["std_fiber"]).index(s["fiber"])]),
                     **dict(zip(("xp_used", "xp_ratio", "xp_rms"),
                                xp_of.get(s["fiber"], (False, np.nan, np.nan)), strict=True))}
                    for s in row["metrics"]["stars"]]
    return row


def run_survey(conf, pool=None, workers=2, config=None):
    """Simulate (cached) and calibrate every exposure of one survey; returns its rows.

    Parameters
    ----------
    conf : dict
        One of :func:`surveys`.
    pool : concurrent.futures.Executor, optional
        Where to calibrate (default: a new pool of ``workers`` spawned processes).
    """
    grid_dir, cube = demo_grid(), {"demo": demo_cube, "ck04": ck04_cube}[conf["templates"]]()
    root = simulate(conf, grid_dir)
    entries = json.loads((root / "survey.json").read_text())["exposures"]
    if pool is None:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as own:
            return run_survey(conf, own, config=config)
    futures = [pool.submit(calibrate_one, conf["name"], str(root), e, str(cube),
                           conf.get("use_xp", False), config) for e in entries]
    return [f.result() for f in futures]


def survey_job(conf, workers=2, config=None):
    """The survey's exposures calibrated by the survey job (``run_survey`` on a LocalCluster,
    the survey model on; ``config`` a TOML file, None: the defaults): each exposure's
    metrics and FCALSRC (whether the model served its setup). The model averages the
    standards' own errors (noise, each star's template and XP errors) over the survey; it
    cannot remove what all stars share."""
    from distributed import Client

    import kspec_fluxcal as kf
    from kspec_fluxcal.sim import compare_with_truth
    from kspec_fluxcal.survey import local_cluster
    from kspec_fluxcal.survey import run_survey as survey_run

    root = CACHE / "accuracy" / conf["sim"]
    cube = {"demo": demo_cube, "ck04": ck04_cube}[conf["templates"]]()
    out = root.parent / f"{root.name}_survey_{conf['name']}"
    shutil.rmtree(out, ignore_errors=True)
    with warnings.catch_warnings(), local_cluster(workers, 1, "127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        warnings.simplefilter("ignore")
        survey_run(root / "lake", catalog=root / "catalog.csv", grid=cube, out=out,
                   client=client, progress=False, config=config,
                   xp=root / "xp.csv" if conf.get("use_xp") else None)
    rows = []
    for entry in json.loads((root / "survey.json").read_text())["exposures"]:
        path = out / Path(entry["path"]).relative_to("lake").with_name(
            f"{entry['expid']}_fluxcal.fits")
        if not path.exists():
            rows.append({"expid": entry["expid"], "missing": True})
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = compare_with_truth(path, dict(np.load(root / entry["truth"])))
            source = kf.open_exposure(path).attrs.get("fcalsrc", "")
        rows.append({"expid": entry["expid"], "missing": False, "metrics": metrics,
                     "source": source})
    return rows


def report_survey_job(conf, rows, alone):
    """One line: cal_shape alone (per exposure) and from the survey job."""
    shape = metric(rows, "cal_shape")
    sources = Counter(r["source"] for r in rows if not r["missing"])
    missing = sum(r["missing"] for r in rows)
    label = conf["label"].split(")")[0] + ")" if conf["label"].startswith("(") else ""
    print(f"  {label:7s} {conf['name']:16s} cal_shape alone {pc(np.median(alone), 5)} / "
          f"{pc(pct(alone, 90), 5)}  survey job {pc(np.median(shape), 5)} / "
          f"{pc(pct(shape, 90), 5)}   FCALSRC {dict(sources)}"
          + (f", {missing} missing" if missing else ""))


# ----------------------------------------------------------------------------- reporting


def pct(values, q):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.percentile(values, q)) if values.size else np.nan


def pc(value, width):
    """A fraction as a percentage right-aligned in ``width`` characters ('-' for NaN)."""
    return f"{100 * value:{width}.2f}%" if np.isfinite(value) else f"{'-':>{width + 1}}"


def reason_group(text):
    """A rejection reason without the star's own numbers: 'chi2/dof 12.3 > 10' ->
    'chi2/dof > 10'; '... colour Teff 7612 K ... (7250 K)' -> '... # K ... (# K)'."""
    text = re.sub(r"(\S) [-+]?\d[\d.]* ([<>]) ", r"\1 \2 ", str(text))
    return re.sub(r"[-+]?\d+(\.\d+)? K\b", "# K", text)


def flag_counts(rows):
    """Counter of the flags of standards with status 'ok', numbers left out."""
    return Counter(re.sub(r"[-+]?\d[\d.]*", "#", f) for row in rows
                   for s in row.get("stars", []) if s["status"] == "ok"
                   for f in s.get("flags", "").split(", ") if f)


def failure_counts(rows):
    """Counter of grouped reasons: why exposures failed (each star's reason), and why the
    standards of calibrated exposures were not used."""
    failed = Counter(reason_group(r) for row in rows if "error" in row for r in row["reasons"])
    rejected = Counter(reason_group(s["status"]) for row in rows
                       for s in row.get("stars", []) if s["status"] != "ok")
    return failed, rejected


def star_errors(rows, only_ok=True):
    """|fitted - true| of every standard star of the rows (fitted with status 'ok')."""
    out = {p: [] for p in PARAMS}
    for r in rows:
        for s in r.get("stars", []):
            if only_ok and s["status"] != "ok":
                continue
            for p in PARAMS:
                out[p].append(abs(s[f"d_{p}"]))
    return {p: np.array(v) for p, v in out.items()}


def metric(rows, key):
    return np.array([r["metrics"][key] for r in rows if "metrics" in r], dtype=float)


def report(conf, rows):
    """The cross-model block of one survey (also used for the self-consistency ones)."""
    ok = [r for r in rows if "metrics" in r]
    failed, rejected = failure_counts(rows)
    print(f"{conf['label']}")
    print(f"  exposures: {len(ok)} calibrated, {len(rows) - len(ok)} failed"
          + (f"  [failures, per star: {', '.join(f'{v} x {k}' for k, v in failed.most_common())}]"
             if failed else ""))
    if rejected:
        print(f"  standards not used in calibrated exposures: "
              f"{', '.join(f'{v} x {k}' for k, v in rejected.most_common())}")
    if not ok:
        return
    flagged = flag_counts(ok)
    if flagged:
        print(f"  flags of standards fitted ok: "
              f"{', '.join(f'{v} x {k}' for k, v in flagged.most_common())}")
    sharper = [r["sharper"] for r in ok if r.get("sharper", 0) > 0]
    if sharper:
        print(f"  the standards' spectra only sampled (broader than the instrument) in "
              f"{len(sharper)} of {len(ok)} exposures, there on a median "
              f"{pc(np.median(sharper), 3)} of the pixels (truth source_sharper)")
    med90 = {k: (pct(metric(ok, k), 50), pct(metric(ok, k), 90))
             for k in ("shape_snr10", "cal_shape", "telluric_science", "shape_snr10_noiseless",
                       "telluric_science_noiseless")}
    lc = np.abs(metric(ok, "level_cal"))
    print("  shape_snr10 {} / {}   cal_shape {} / {}   |level_cal| {} (p90 {})   "
          "telluric_science {} / {}   (median / p90)".format(
              *(pc(v, 5) for v in (*med90["shape_snr10"], *med90["cal_shape"])),
              pc(pct(lc, 50), 5), pc(pct(lc, 90), 5), *(pc(v, 5) for v in
                                                        med90["telluric_science"])))
    print("  without the targets' noise (noiseless counts x applied factor): shape_snr10 {} / {}"
          "   telluric_science {} / {}".format(
              *(pc(v, 5) for v in (*med90["shape_snr10_noiseless"],
                                   *med90["telluric_science_noiseless"]))))
    floor = [{"metrics": r["metrics"]["floor"]} for r in ok]
    print("  a perfect calibration of the same data (the targets' noise floor): shape_snr10 {} / "
          "{}   telluric_science {} / {}".format(
              *(pc(pct(metric(floor, k), q), 5) for k in ("shape_snr10", "telluric_science")
                for q in (50, 90))))
    err = star_errors(ok)
    chi2 = [s["chi2_dof"] for r in ok for s in r["stars"]]
    print(f"  standards ok {err['teff'].size} of {len(chi2)} (chi2/dof median / p90 "
          f"{pct(chi2, 50):.2f} / {pct(chi2, 90):.2f}): |dTeff| median / p90 "
          f"{pct(err['teff'], 50):.0f} / {pct(err['teff'], 90):.0f} K, |dlogg| "
          f"{pct(err['logg'], 50):.2f} / {pct(err['logg'], 90):.2f}, |d[M/H]| "
          f"{pct(err['feh'], 50):.2f} / {pct(err['feh'], 90):.2f}; Teff bias (median "
          f"fitted - true, all fits) "
          f"{pct([s['d_teff'] for r in ok for s in r['stars']], 50):+.0f} K")
    seconds = [r["seconds"] for r in ok if "seconds" in r]
    if conf.get("use_xp"):
        stars = [s for r in ok for s in r["stars"]]
        with_xp = [s for s in stars if s["xp_used"]]
        print(f"  XP spectra used for {len(with_xp)} of {len(stars)} standards (median XP / "
              f"model {pct([s['xp_ratio'] for s in stars], 50):.3f}, XP rms about the final "
              f"model median / p90 {pc(pct([s['xp_rms'] for s in with_xp], 50), 4)} / "
              f"{pc(pct([s['xp_rms'] for s in with_xp], 90), 4)})")
    print(f"  calibrate_exposure median {np.median(seconds) if seconds else np.nan:.2f} s per "
          "exposure")
    if conf["standards"]["kind"] in ("calspec", "nodes"):
        calspec_table(ok)
    if conf["standards"].get("beyond"):
        beyond_table(ok, conf["standards"]["beyond"])


def beyond_table(rows, box):
    """Stars beyond a grid's box (survey (h)), by true Teff: which parameters are beyond and
    by how much, fitted minus true, status, flags, and the exposure's cal_shape."""
    print(f"    {'beyond':<22} {'Teff':>5} {'logg':>5} {'[M/H]':>5} {'dTeff':>6} {'dlogg':>6} "
          f"{'d[M/H]':>6} {'cal_shape':>9}  status; flags")
    stars = sorted(((r, s) for r in rows for s in r["stars"]), key=lambda rs: rs[1]["true_teff"])
    for r, s in stars:
        out = []
        for p, (lo, hi) in box.items():
            value = s[f"true_{p}"]
            if value < lo or value > hi:
                out.append(f"{p}{value - (lo if value < lo else hi):+.{0 if p == 'teff' else 2}f}")
        status = "ok" if s["status"] == "ok" else reason_group(s["status"])
        print(f"    {' '.join(out):<22} {s['true_teff']:5.0f} {s['true_logg']:5.2f} "
              f"{s['true_feh']:+5.2f} {s['d_teff']:+6.0f} {s['d_logg']:+6.2f} {s['d_feh']:+6.2f} "
              f"{pc(r['metrics']['cal_shape'], 7)}  {status}; {s.get('flags', '')}")


def calspec_table(rows):
    """Fitted Teff, log g, [M/H] against the CALSPEC reference, per star (all fits)."""
    by_star = {}
    for r in rows:
        for s in r["stars"]:
            by_star.setdefault(s["name"], []).append(s)
    print(f"    {'star':<11} {'n':>2} {'ref Teff':>8} {'fit-ref':>7} {'ref logg':>8} {'fit-ref':>7}"
          f" {'ref[M/H]':>8} {'fit-ref':>7}  statuses")
    for name in sorted(by_star):
        fits_ = by_star[name]
        statuses = Counter(reason_group(s["status"]) for s in fits_)
        print(f"    {name:<11} {len(fits_):>2} {fits_[0]['true_teff']:8.0f} "
              f"{np.median([s['d_teff'] for s in fits_]):+7.0f} {fits_[0]['true_logg']:8.2f} "
              f"{np.median([s['d_logg'] for s in fits_]):+7.2f} {fits_[0]['true_feh']:8.2f} "
              f"{np.median([s['d_feh'] for s in fits_]):+7.2f}  "
              + ", ".join(f"{v} {k}" for k, v in statuses.most_common()))


def summary(rows, label):
    """The self-consistency block of earlier versions (main survey, S/N bins)."""
    ok = [r for r in rows if "metrics" in r]
    sci = [s for r in ok for s in r["science"]]
    bright = np.array([shape for _, snr, shape in sci if snr >= TARGET_SNR])
    level = metric(ok, "level")
    print(f"{label}: {len(ok)} exposures calibrated"
          + (f", {len(rows) - len(ok)} FAILED" if len(rows) > len(ok) else "")
          + "; median / 90th percentile:")
    print(f"  shape (science fibers, all)           {pc(pct(metric(ok, 'shape'), 50), 5)} / "
          f"{pc(pct(metric(ok, 'shape'), 90), 5)}")
    print(f"  shape (science, target S/N >= {TARGET_SNR:g})     {pc(pct(bright, 50), 5)} / "
          f"{pc(pct(bright, 90), 5)}   over {bright.size} fibers")
    print(f"  |level| (science, incl. aperture loss) {pc(pct(np.abs(level), 50), 5)} / "
          f"{pc(pct(np.abs(level), 90), 5)}   (signed median {100 * pct(level, 50):+.2f}%)")
    print(f"  telluric bands (calibration)          {pc(pct(metric(ok, 'telluric'), 50), 5)} / "
          f"{pc(pct(metric(ok, 'telluric'), 90), 5)}")
    err = star_errors(ok)
    print("  standards, |fitted - true| median / p90: "
          + "; ".join(f"{LABELS[p]} {pct(err[p], 50):.3g} / {pct(err[p], 90):.3g} {UNITS[p]}"
                      for p in PARAMS))


def verdict(rows):
    """The targets, checked on the 90th percentiles (the medians are well inside)."""
    ok = [r for r in rows if "metrics" in r]
    cs = pct(metric(ok, "cal_shape"), 90)
    br = pct([s for r in ok for _, sn, s in r["science"] if sn >= TARGET_SNR], 90)
    lc = pct(np.abs(metric(ok, "level_cal")), 90)
    yes = {True: "met", False: "NOT met"}
    print(f"  shape < 1%: calibration p90 {100 * cs:.2f}% {yes[bool(cs < 0.01)]}; science targets "
          f"with S/N >= {TARGET_SNR:g}, p90 {100 * br:.2f}% {yes[bool(br < 0.01)]}; absolute "
          f"< 2%: calibration's level p90 {100 * lc:.2f}% {yes[bool(lc < 0.02)]}")


def scan_table(rows_by_bin):
    head = (f"{'standards S/N':>13} {'n_std':>5} {'N':>3} {'cal_shape med/p90':>18} "
            f"{'shape_snr10':>11} {'|level_cal| med/p90':>19} {'|dTeff| med':>11} "
            f"{'|d[M/H]| med':>12}")
    print(head)
    for name, rows in rows_by_bin:
        for n in (1, 2, 3, None):
            sel = [r for r in rows if "metrics" in r and (n is None or r["n_observed"] == n)]
            if not sel:
                continue
            cs, lc = metric(sel, "cal_shape"), np.abs(metric(sel, "level_cal"))
            err = star_errors(sel)
            print(f"{name:>13} {'all' if n is None else n:>5} {len(sel):>3} "
                  f"{100 * pct(cs, 50):7.2f}% /{100 * pct(cs, 90):6.2f}% "
                  f"{pc(pct(metric(sel, 'shape_snr10'), 50), 10)} "
                  f"{100 * pct(lc, 50):8.2f}% /{100 * pct(lc, 90):6.2f}% "
                  f"{pct(err['teff'], 50):9.0f} K {pct(err['feh'], 50):10.3f}")


def xp_effect(rows):
    """(a) and (a-xp) side by side: the calibration's shape error without and with XP."""
    if not {"calspec-ck04", "calspec-ck04-xp"} <= set(rows):
        return
    figures = []
    for name in ("calspec-ck04", "calspec-ck04-xp"):
        cs = metric([r for r in rows[name] if "metrics" in r], "cal_shape")
        figures.append(f"{pc(pct(cs, 50), 4)} / {pc(pct(cs, 90), 4)}")
    print(f"Gaia XP (issue 15, target < 0.5 %): cal_shape median / p90 (a) {figures[0]} -> "
          f"(a-xp) {figures[1]}")


def unexpected(rows):
    """Exposures that raised something else than a FluxCalError (bugs, not fits)."""
    for r in rows:
        if "traceback" in r:
            print(f"  {r['survey']}/{r['expid']}: {r['error']}\n{r['traceback']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 exposures per survey, no scan")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--only", help="comma-separated survey names (e.g. "
                        "calspec-ck04,calspec-ck04-xp); default all")
    parser.add_argument("--config", help="a configuration file (TOML) instead of the defaults")
    parser.add_argument("--no-survey-job", action="store_true",
                        help="skip calibrating each survey again with the survey job")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    confs = surveys(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c["name"] for c in confs}
        if unknown:
            parser.error(f"unknown survey(s) {sorted(unknown)}")
        confs = [c for c in confs if c["name"] in wanted]
    demo_grid()
    cubes = {"demo": demo_cube(), "ck04": ck04_cube()}
    print(f"templates: demo (synthetic, R = 5000) {cubes['demo']}; CK04 {cubes['ck04']}")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker) as pool:
        unique = {c["sim"]: c for c in confs}
        list(pool.map(simulate, unique.values(), [demo_grid()] * len(unique)))
        t_sim = time.perf_counter() - t_start
        rows = {c["name"]: run_survey(c, pool, config=args.config) for c in confs}
    t_all = time.perf_counter() - t_start
    seconds = [r["seconds"] for rs in rows.values() for r in rs if "seconds" in r]

    print("\n=== cross-model surveys (standards not from the templates' model) ===")
    for c in confs:
        if c["cross"]:
            report(c, rows[c["name"]])
    xp_effect(rows)
    print("\n=== self-consistency (standards from the template grid itself) ===")
    for c in confs:
        if not c["cross"]:
            report(c, rows[c["name"]])
    main_conf = next((c for c in confs if c["name"] == "main"), None)
    if main_conf is not None:
        print()
        summary(rows["main"], "main survey (details)")
        verdict(rows["main"])
    if not args.no_survey_job:
        print(f"\n=== the survey job (run_survey: the survey model on, "
              f"{args.config or 'defaults'}), cal_shape median / p90 ===")
        for c in confs:
            if not c["name"].startswith("snr"):
                report_survey_job(c, survey_job(c, args.workers, args.config),
                                  metric(rows[c["name"]], "cal_shape"))
    scan = [c for c in confs if c["name"].startswith("snr")]
    if scan:
        print("\n=== scan: standards' S/N bin x number of standards (medians) ===")
        scan_table([(c["name"].replace("snr", ""), rows[c["name"]]) for c in scan])
    unexpected([r for rs in rows.values() for r in rs])
    print(f"\ntime: {t_all:.0f} s total on {args.workers} processes (simulation {t_sim:.0f} s, "
          f"cached surveys are reused); calibrate_exposure median {np.median(seconds):.2f} s "
          f"per exposure; {main_conf['exposures'] if main_conf else 0} main exposures; "
          f"{load_note()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
