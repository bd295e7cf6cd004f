"""Issue 14's speed, memory and start-up figures, measured in one run.

    python benchmarks/speed.py [--exposures 500] [--skip survey,grid,cli] [--survey-repeats 3]

Every exposure has its own instrument setup, as real exposures do: a wavelength solution
with its own start and dispersion (the ends moved by up to +/-3 A, i.e. shifts of CRVAL1 and
CDELT1 of a few pixels and a few 1e-4), and its own line spread (FWHMPC0..2 of the default
setup scaled by 0.95-1.05 each): 4096 pixels, 14 fibers, 1-3 standards, in the simulator's
mix of layouts (1-D and per-fiber WAVELA in Angstrom or nm, air or vacuum, WCS). They all
belong to one instrument configuration, so one template library (prepared once) serves them,
while every exposure needs its own operator from the library to its pixels and LSF.

Printed (the machine is a shared 2-core one: the load of other processes is printed with
every timing, and CPU times, less sensitive to it, next to wall times):

1. Per exposure on one core (this process, the library prepared beforehand): CPU split into
   read (open_exposure), fit (fit_standards), combine, apply, check (the spectrophotometric
   check of the program stars), write (write_calibrated) and record (archive_record): what
   the survey's task runs, and where the fit's time goes (profile), for the fit's
   optimisation. Target: <= 0.12 s CPU per exposure.
2. The survey job (run_survey on a LocalCluster of 1, then 2, single-threaded workers) on
   all the exposures, its first pass only (``[model] enabled = false``: the survey model's
   fit and recalibration, which these exposures now get as one configuration, are measured
   by survey_model.py): exposures/min overall and after the library was prepared (from the task
   stream), efficiency of 2 workers against 1 (target >= 0.9; >= 1000 exposures/min after the
   preparation), peak RSS of each worker after 50 exposures and after all (flat within +/-10 %:
   the kernel's high-water mark, and the largest of the RSS sampled every 0.5 s), and the RSS
   by exposures done.
3. The grid build: ``kspec-fluxcal grid build --workers 1`` and ``--workers 2`` on the
   500-file reference grid (subprocesses, best of 3, warm page cache) against a plain
   gunzip + ``np.loadtxt`` loop over the same files (targets: 2 workers <= 0.65x the wall time
   of 1; build CPU within 1.5x of the loop's).
4. CLI start-up: ``kspec-fluxcal calibrate`` on one of the exposures, with the template
   library in the disk cache: process start to the first exposure's fit, the library's read
   from the cache, the whole command (target: start-up to the first exposure < 1 s).

For scale (quoted, not rerun): DESI's code took 8.3 s per exposure on the same machine
(2026-12-04).

Generated data are cached under store/bench (KSPEC_BENCH_DIR overrides): the lake of 500
exposures takes ~10 min to simulate the first time, the reference grid ~3 min.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import _common  # noqa: F401 (first: BLAS threads set before numpy loads)
import numpy as np
from _common import (
    CACHE,
    Timer,
    demo_cube,
    demo_grid,
    load_note,
    own_setups,
    profile_top,
    reference_grid,
)

import kspec_fluxcal
from kspec_fluxcal.templates import CACHE_ENV

#: The command line's entry point, beside this Python.
ENTRY_POINT = Path(sys.executable).with_name("kspec-fluxcal")

#: Seed of the setups and of the survey.
SEED = 14


def own_setup_lake(n):
    """The cached simulated survey of ``n`` exposures, each with its own setup."""
    from kspec_fluxcal.sim import simulate_survey

    out = CACHE / f"speed_lake_{n}"
    if not (out / "survey.json").exists():
        with Timer() as t:
            simulate_survey(out, exposures=n, nights=max(1, n // 20), seed=SEED,
                            grid=demo_grid(), setups=own_setups(n, SEED), overwrite=True)
        print(f"simulated {n} exposures, each with its own setup, in {t.seconds:.0f} s -> {out}")
    return out


# ----------------------------------------------------------------------------- 1. per exposure

STAGES = ("read", "fit", "combine", "apply", "check", "write", "record")
#: Package modules shown in the fit's profile (pstats strips directories).
PACKAGE = (r"(standards|inputs|scan|parameter_choice|final_model|acceptance|model_photometry"
           r"|exposure_templates|refinement|velocity|matching|shifts|calibration|telluric"
           r"|continuum|templates|photometry|catalog|exposure|lsf|masks|reddening)\.py")


def _stages(path, catalog, library, config, out):
    """CPU seconds of each stage of one exposure, as the survey's task runs them."""
    from kspec_fluxcal.calibration import apply_calibration, combine_vectors
    from kspec_fluxcal.exposure import open_exposure
    from kspec_fluxcal.fit.standards import fit_standards
    from kspec_fluxcal.products import write_calibrated
    from kspec_fluxcal.spectrophotometry import check_exposure
    from kspec_fluxcal.survey.archive import archive_record

    times, c = {}, time.process_time()

    def lap(name):
        nonlocal c
        now = time.process_time()
        times[name], c = now - c, now

    exposure = open_exposure(path)
    lap("read")
    stars = fit_standards(exposure, catalog, library, config)
    lap("fit")
    calibration = combine_vectors(stars, config=config)
    lap("combine")
    calibrated = apply_calibration(exposure, calibration)
    lap("apply")
    check_exposure(calibrated, catalog)
    lap("check")
    write_calibrated(calibrated, out / f"{path.stem}_fluxcal.fits", overwrite=True,
                     stars=stars)
    lap("write")
    archive_record(calibrated, stars, calibration)
    lap("record")
    return times


def per_exposure(lake, cube, n):
    """Stage CPU times of ``n`` exposures in this process, and the fit's profile."""
    import dask

    from kspec_fluxcal.catalog import read_catalog
    from kspec_fluxcal.config import Config
    from kspec_fluxcal.exposure import open_exposure
    from kspec_fluxcal.fit.exposure_templates import template_library
    from kspec_fluxcal.fit.standards import fit_standards
    from kspec_fluxcal.grid import open_grid
    from kspec_fluxcal.templates import clear_cache

    paths = _lake_paths(lake)[:n]
    config, catalog = Config(), read_catalog(lake / "catalog.csv")
    out = CACHE / "speed_stages"
    out.mkdir(parents=True, exist_ok=True)
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid, first = open_grid(cube), open_exposure(paths[0])
        clear_cache()
        c = time.process_time()
        library = template_library(grid, first, config, cache_dir=out / "cache")
        prepared = time.process_time() - c
        clear_cache()
        c = time.process_time()
        template_library(grid, first, config, cache_dir=out / "cache")
        read_back = time.process_time() - c
        _stages(paths[0], catalog, library, config, out)  # warm-up: first calls, caches
        rows = [_stages(p, catalog, library, config, out) for p in paths]
        exposures = [open_exposure(p) for p in paths[:5]]
        profile = profile_top(lambda: [fit_standards(e, catalog, library, config)
                                       for e in exposures], n=16, sort="cumtime",
                              restrict=PACKAGE)
        own = profile_top(lambda: [fit_standards(e, catalog, library, config)
                                   for e in exposures], n=12)
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "prepared": prepared, "read_back": read_back,
            "library_mb": library.nbytes / 1e6, "templates": library.sizes["template"],
            "profile": profile, "own": own, "n_profiled": len(exposures)}


def _lake_paths(lake):
    manifest = json.loads((lake / "survey.json").read_text())
    return [lake / e["path"] for e in manifest["exposures"]]


def print_per_exposure(r):
    table = {k: np.array([row[k] for row in r["rows"]]) for k in STAGES}
    total = sum(table.values())
    print(f"\n1. Per exposure, one core, CPU (mean of {len(total)} exposures, each with its own "
          f"setup; median {np.median(total):.3f} s, range {total.min():.3f}-{total.max():.3f} s):"
          f" {total.mean():.3f} s -> {60 / total.mean():.0f} exposures/min/core "
          "(target <= 0.12 s; DESI 8.3 s)")
    for k in STAGES:
        print(f"   {k:<8} {table[k].mean():.4f} s  ({100 * table[k].mean() / total.mean():4.1f} %)")
    print(f"   template library (once per configuration, {r['templates']} templates, "
          f"{r['library_mb']:.0f} MB): prepared in {r['prepared']:.2f} s CPU, read back from "
          f"the disk cache in {r['read_back']:.2f} s CPU")
    print(f"\n   fit_standards profile over {r['n_profiled']} exposures, cumulative, package "
          "functions:")
    print("\n".join("   " + ln for ln in r["profile"].splitlines()))
    print("   own time, top 12:")
    print("\n".join("   " + ln for ln in r["own"].splitlines()))


# ----------------------------------------------------------------------------- 2. survey


def survey_run(lake, cube, n_workers, out):
    """One survey job on a fresh LocalCluster with a cold library cache; its figures."""
    from distributed import Client, get_task_stream
    from survey_scale import MemorySampler, _cpu_seconds, _own_cpu

    from kspec_fluxcal.config import Config
    from kspec_fluxcal.survey import local_cluster, run_survey

    shutil.rmtree(out, ignore_errors=True)
    cache = out.with_name(out.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)
    os.environ[CACHE_ENV] = str(cache)  # the workers inherit it: the library is prepared
    with local_cluster(n_workers, 1, "127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        sampler = MemorySampler(cluster.scheduler_address, out)
        sampler.start()
        machine0, ours0 = _cpu_seconds()
        workers0 = client.run(_own_cpu)
        try:
            with get_task_stream(client=client) as stream, Timer() as wall:
                report = run_survey(lake / "lake", catalog=lake / "catalog.csv", grid=cube,
                                    out=out, client=client, progress=False,
                                    config=Config().replace(model__enabled=False))
            machine1, ours1 = _cpu_seconds()
            workers1 = client.run(_own_cpu)
        finally:
            sampler.close()
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return _survey_figures(stream.data, report, n_workers, wall.seconds, sampler, {
        "worker_cpu": sum(workers1[w] - workers0[w] for w in workers1),
        "ours": ours1 - ours0, "machine": machine1 - machine0})


def _compute_span(task):
    spans = [s for s in task["startstops"] if s["action"] == "compute"]
    return spans[0]["start"], spans[-1]["stop"]


def _survey_figures(tasks, report, n_workers, wall, sampler, cpu):
    calibrate = [t for t in tasks if str(t["key"]).startswith("calibrate-")]
    library = [t for t in tasks if str(t["key"]).startswith("library-")]
    ready = max(_compute_span(t)[1] for t in library)
    after = [_compute_span(t) for t in calibrate if _compute_span(t)[0] >= ready]
    span = max(s for _, s in after) - min(s for s, _ in after)
    durations = np.array([s - b for b, s in map(_compute_span, calibrate)])
    n = len(report.calibrated) + len(report.failed)
    return {"workers": n_workers, "n": n, "failed": len(report.failed), "wall": wall,
            "rate_total": 60.0 * n / wall, "rate_after": 60.0 * len(after) / span,
            "n_after": len(after), "library_s": [float(np.diff(_compute_span(t))[0])
                                                 for t in library],
            "task_median": float(np.median(durations)), "tasks": len(tasks),
            "peak50": sampler.peak(50), "peak": sampler.peak(),
            "hwm50": sampler.peak(50, high_water=True), "hwm": sampler.peak(high_water=True),
            "trajectory": sampler.trajectory((50, 100, 200, 300, 400, 500)),
            "worker_cpu": cpu["worker_cpu"] / n,
            "client_cpu": (cpu["ours"] - cpu["worker_cpu"]) / n,
            "other_cores": max(0.0, cpu["machine"] - cpu["ours"]) / wall}


def print_survey(runs):
    print("\n2. Survey job (run_survey, LocalCluster of single-threaded workers, cold library "
          "cache: the library task prepares it; the first pass only, [model] enabled = false: "
          "the survey model's fit and recalibration are benchmarks/survey_model.py's)")
    for r in runs:
        print(f"   {r['workers']} worker(s): {r['n']} exposures ({r['failed']} failed) in "
              f"{r['wall']:.1f} s = {r['rate_total']:.0f}/min overall, {r['rate_after']:.0f}/min "
              f"after the library was prepared ({r['n_after']} tasks); library task "
              f"{', '.join(f'{s:.2f} s' for s in r['library_s'])}; calibrate task median "
              f"{r['task_median']:.3f} s; {r['tasks'] / r['n']:.3f} tasks/exposure")
        print(f"     CPU per exposure: workers {r['worker_cpu']:.3f} s, client + scheduler "
              f"{r['client_cpu']:.3f} s; other processes on the machine: "
              f"{r['other_cores']:.2f} cores on average")
        print("     worker RSS (MB, mean of workers) by exposures done: " + ", ".join(
            f"{d}: {m:.0f}" for d, m in r["trajectory"]))
        for w in sorted(r["peak"]):
            first, last = r["hwm50"].get(w, np.nan), r["hwm"][w]
            s_first, s_last = r["peak50"].get(w, np.nan), r["peak"][w]
            print(f"     {w}: peak RSS (the kernel's high-water mark) {first:.0f} MB after <= 50 "
                  f"exposures, {last:.0f} MB after all ({100 * (last / first - 1):+.1f} %); "
                  f"largest sampled every 0.5 s {s_first:.0f} -> {s_last:.0f} MB "
                  f"({100 * (s_last / s_first - 1):+.1f} %)")
    pairs = list(zip(runs[::2], runs[1::2], strict=True))
    for label, key in (("overall", "rate_total"), ("after the preparation", "rate_after")):
        print(f"   efficiency 2 workers vs 1, {label}: "
              f"{', '.join(f'{two[key] / (2 * one[key]):.2f}' for one, two in pairs)} "
              "(target >= 0.9)")
    if len(pairs) > 1:  # the machine's speed drifts by minutes: the runs' spread, then medians
        for n in (1, 2):
            rates = [r["rate_after"] for r in runs if r["workers"] == n]
            cpu = [r["worker_cpu"] for r in runs if r["workers"] == n]
            print(f"   {n} worker(s), {len(rates)} runs alternated: {min(rates):.0f}-"
                  f"{max(rates):.0f}/min after the preparation (median {np.median(rates):.0f}); "
                  f"workers' CPU per exposure {min(cpu):.3f}-{max(cpu):.3f} s")


# ----------------------------------------------------------------------------- 3. grid build


def _cli_run(*args, env=None):
    """(wall s, CPU s of the command and every process it waited for) of one CLI run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Timer() as t:
        subprocess.run([str(ENTRY_POINT), *map(str, args)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t.seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def grid_build(repeat=3):
    from kspec_fluxcal.grid.build import scan_bosz

    source = reference_grid(full=True)
    paths = [m["path"] for m in scan_bosz(source)["models"]]
    out = CACHE / "speed_grid_build.zarr"
    runs = {}
    for workers in (1, 2, 1, 2) if repeat > 1 else (1, 2):  # interleaved: same conditions
        for _ in range(max(1, repeat // 2)):
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            runs.setdefault(workers, []).append(
                (*_cli_run("grid", "build", source, "--out", out, "--workers", workers,
                           "--quiet"), load))
    shutil.rmtree(out, ignore_errors=True)
    c = time.process_time()
    with Timer() as t:
        for path in paths:
            np.loadtxt(path)
    return {"runs": runs, "files": len(paths), "loop_cpu": time.process_time() - c,
            "loop_wall": t.seconds}


def print_grid_build(r):
    print(f"\n3. Grid build, {r['files']} files (kspec-fluxcal grid build, subprocess; wall / "
          "CPU of the command and its pool; 1-min load average before each run)")
    best = {}
    for workers, runs in sorted(r["runs"].items()):
        best[workers] = min(runs)
        print(f"   --workers {workers}: " + "; ".join(
            f"{w:.1f} s wall, {c:.1f} s CPU (load {ld:.1f})" for w, c, ld in runs))
    print(f"   plain loop (gunzip + np.loadtxt, one core): {r['loop_wall']:.1f} s wall, "
          f"{r['loop_cpu']:.1f} s CPU")
    print(f"   wall 2 workers / 1 (best runs): {best[2][0] / best[1][0]:.2f} (target <= 0.65); "
          f"build CPU / loop CPU: {best[1][1] / r['loop_cpu']:.2f} (1 worker), "
          f"{best[2][1] / r['loop_cpu']:.2f} (2 workers) (target <= 1.5)")


# ----------------------------------------------------------------------------- 4. CLI start-up

#: Runs ``kspec-fluxcal calibrate`` (argv) as the entry point does, and prints when the first
#: exposure's calibration and its template library started and ended (time.time()). The
#: marks are put in once the command has imported its modules itself (its first file): imported
#: here beforehand, they would be imported with the garbage collector on, and before the
#: command defers the modules it does not use.
_DRIVER = r"""
import json, sys, time
import kspec_fluxcal.cli as cli
marks = {}
def timed(module, name):
    original = getattr(module, name)
    def run(*args, **kwargs):
        marks.setdefault(name, time.time())
        try:
            return original(*args, **kwargs)
        finally:
            marks.setdefault(name + " end", time.time())
    setattr(module, name, run)
each_file = cli._each_file
def first_files(args, work):
    import kspec_fluxcal.pipeline as pipeline, kspec_fluxcal.fit.standards as standards
    timed(pipeline, "calibrate")
    timed(standards, "template_library")
    return each_file(args, work)
cli._each_file = first_files
status = cli.main(sys.argv[1:])
marks["exit"] = time.time()
print("MARKS " + json.dumps(marks))
sys.exit(status)
"""


def cli_startup(lake, cube, repeat=3):
    """Marks (s from the process's start) of ``kspec-fluxcal calibrate`` on one exposure with
    a warm library cache, best of ``repeat``; and the plain entry point's wall time."""
    path = _lake_paths(lake)[0]
    # Start-up as an installed package has it: pip compiles the bytecode of a regular install,
    # and an editable one writes it on first use, unless PYTHONDONTWRITEBYTECODE is set (as in
    # some shells and containers): every import would then compile the package's sources again.
    compileall.compile_dir(Path(kspec_fluxcal.__file__).parent, quiet=1)
    cache = CACHE / "speed_cli_cache"
    out = CACHE / "speed_cli_out"
    env = {**os.environ, CACHE_ENV: str(cache)}
    args = ["calibrate", path, "--catalog", lake / "catalog.csv", "--grid", cube, "--out", out,
            "--overwrite"]
    _cli_run(*args, env=env)  # fills the cache, warms the page cache
    marks = []
    for _ in range(repeat):
        start = time.time()
        done = subprocess.run([sys.executable, "-c", _DRIVER, *map(str, args)], env=env,
                              capture_output=True, text=True, check=True)
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("MARKS "))
        marks.append({k: v - start for k, v in json.loads(line[6:]).items()})
    entry = [_cli_run(*args, env=env) for _ in range(repeat)]
    shutil.rmtree(out, ignore_errors=True)
    return {"marks": min(marks, key=lambda m: m["exit"]), "entry": min(entry), "path": path}


def print_cli_startup(r):
    m = r["marks"]
    print(f"\n4. CLI start-up: kspec-fluxcal calibrate {r['path'].name} (4096 pixels, 14 fibers), "
          "library in the disk cache (best of 3)")
    print(f"   process start -> first exposure's calibration: {m['calibrate']:.2f} s "
          "(imports, configuration, catalog, grid opened, exposure read; target < 1 s)")
    print(f"   template library read from the cache: "
          f"{m['template_library end'] - m['template_library']:.2f} s")
    print(f"   first exposure (fit with the library, combine, apply): "
          f"{m['calibrate end'] - m['calibrate']:.2f} s; command exits at {m['exit']:.2f} s")
    print(f"   the entry point, whole command: {r['entry'][0]:.2f} s wall, {r['entry'][1]:.2f} s "
          "CPU")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=500)
    parser.add_argument("--stage-exposures", type=int, default=30,
                        help="exposures timed stage by stage in this process")
    parser.add_argument("--skip", default="", help="comma-separated: stages,survey,grid,cli")
    parser.add_argument("--lake-only", action="store_true", help="simulate the lake and stop")
    parser.add_argument("--survey-repeats", type=int, default=1,
                        help="survey runs of 1 and 2 workers, alternated, this many times each")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    lake = own_setup_lake(args.exposures)
    if args.lake_only:
        return
    cube = demo_cube()
    print(f"lake: {lake} ({args.exposures} exposures, each its own setup); grid {cube}")
    print("start: " + load_note())
    if "stages" not in skip:
        print_per_exposure(per_exposure(lake, cube, args.stage_exposures))
    if "survey" not in skip:
        print_survey([survey_run(lake, cube, n, CACHE / f"speed_survey_w{n}")
                      for _ in range(args.survey_repeats) for n in (1, 2)])
    if "grid" not in skip:
        print_grid_build(grid_build())
    if "cli" not in skip:
        print_cli_startup(cli_startup(lake, cube))
    print("end: " + load_note())


if __name__ == "__main__":
    main()
