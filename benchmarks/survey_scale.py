"""Survey job throughput on a LocalCluster: 1 worker versus 2, worker memory, graph size.

    python benchmarks/survey_scale.py [--exposures 200]

A simulated survey (default 200 exposures, 14 fibers, 4096 pixels, the demo's synthetic
grid; cached under store/bench/) is calibrated by :func:`kspec_fluxcal.run_survey` on a
LocalCluster of 1 and then 2 single-threaded worker processes. Printed:

- exposures per minute, over the whole job and after the cube is prepared (from the task
  stream: first calibrate start after the last prepare task, to the last calibrate end);
- speedup (2-worker rate / 1-worker rate; target >= 1.6 on 2 cores) and scaling efficiency
  (speedup / 2; 0.8 is the same target); exposures per minute per core (target >= 200
  after the cube is prepared);
- peak RSS per worker after 50 exposures and at the end (it must not grow with the number
  of exposures), sampled every 0.5 s with ``client.run``;
- the graph: tasks per exposure, and the sizes of what is shipped to the workers;

Where a calibrate task's time goes, stage by stage, is printed by ``benchmarks/speed.py``.

Issue 6's targets; the machine may be shared, so rates are indicative.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading

import _common  # noqa: F401 (first: BLAS threads set before numpy loads)
import numpy as np
from _common import CACHE, Timer, demo_cube, demo_grid, peak_rss_mb


def survey_lake(exposures, workers=2):
    """The cached simulated survey: ``exposures`` x 14 fibers x 4096 pixels."""
    from kspec_fluxcal.sim import simulate_survey

    out = CACHE / f"survey_{exposures}x14x4096"
    if not (out / "survey.json").exists():
        with Timer() as t:
            simulate_survey(out, exposures=exposures, nights=max(1, exposures // 20), seed=0,
                            fibers=14, pixels=4096, grid=demo_grid(workers), overwrite=True)
        print(f"simulated {exposures} exposures in {t.seconds:.0f} s -> {out}")
    return out


def _cpu_seconds():
    """(CPU seconds of the whole machine, of this process and its children) so far."""
    import psutil

    t = psutil.cpu_times()
    machine = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq",
                                                "steal"))
    me = psutil.Process()
    ours = 0.0
    for proc in (me, *me.children(recursive=True)):
        try:
            c = proc.cpu_times()
            ours += c.user + c.system
        except psutil.Error:
            continue
    return machine, ours


def _own_cpu():
    import psutil

    c = psutil.Process().cpu_times()
    return c.user + c.system


def _rss():
    """(resident memory now, its kernel high-water mark ru_maxrss), bytes."""
    import resource

    import psutil

    return (psutil.Process().memory_info().rss,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def _products(path):
    """How many products (``*_fluxcal.fits``) lie under ``path``, the archive's store not
    walked: the sampler's count competes with the workers for the cores, and
    ``Path.rglob`` took ~13 ms at 500 products (this, 0.6 ms)."""
    n = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                n += 0 if entry.name.endswith(".zarr") else _products(entry.path)
            else:
                n += entry.name.endswith("_fluxcal.fits")
    return n


class MemorySampler(threading.Thread):
    """Samples every worker's RSS (now and its high-water mark) and the number of calibrated
    files, every ``period`` s."""

    def __init__(self, address, out, period=0.5):
        super().__init__(daemon=True)
        from distributed import Client

        self.client = Client(address, set_as_default=False)
        self.out, self.period = out, period
        self.samples = []  # (files done, {worker: (rss, high-water mark)})
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                rss = self.client.run(_rss)
            except Exception:  # a worker restarting: skip the sample
                rss = {}
            try:
                done = _products(self.out)
            except FileNotFoundError:  # a temporary store gone under it: no sample
                pass
            else:
                self.samples.append((done, rss))
            self.stop.wait(self.period)

    def peak(self, upto=None, high_water=False):
        """Peak RSS (MB) of each worker over the samples taken with at most ``upto`` done:
        the largest RSS sampled, or (``high_water``) the kernel's high-water mark, which
        also counts the peaks between samples (each task's transient arrays)."""
        peaks = {}
        for done, rss in self.samples:
            if upto is not None and done > upto:
                continue
            for worker, value in rss.items():
                peaks[worker] = max(peaks.get(worker, 0), value[high_water] / 2**20)
        return peaks

    def trajectory(self, marks=(10, 25, 50, 100, 150, 200, 400, 800)):
        """Mean worker RSS (MB) at the first sample with at least each mark done."""
        out = []
        for mark in marks:
            hit = next((r for d, r in self.samples if d >= mark and r), None)
            if hit:
                out.append((mark, sum(v[0] for v in hit.values()) / len(hit) / 2**20))
        return out

    def close(self):
        self.stop.set()
        self.join()
        self.client.close()


def run_once(lake, cube, n_workers, out):
    """One survey run on a fresh LocalCluster; returns its figures."""
    from distributed import Client, get_task_stream

    from kspec_fluxcal.survey import local_cluster, run_survey

    shutil.rmtree(out, ignore_errors=True)
    # What run_survey starts itself (one process per worker, one thread each).
    with local_cluster(n_workers, 1, "127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        sampler = MemorySampler(cluster.scheduler_address, out)
        sampler.start()
        machine0, ours0 = _cpu_seconds()
        workers0, client0 = client.run(_own_cpu), _own_cpu()
        try:
            with get_task_stream(client=client) as stream, Timer() as wall:
                report = run_survey(lake / "lake", catalog=lake / "catalog.csv", grid=cube,
                                    out=out, client=client, progress=False)
            machine1, ours1 = _cpu_seconds()
            workers1, client1 = client.run(_own_cpu), _own_cpu()
        finally:
            sampler.close()
    shutil.rmtree(out, ignore_errors=True)  # ~2 MB per exposure, not needed afterwards
    tasks = stream.data
    calibrate = [t for t in tasks if str(t["key"]).startswith("calibrate-")]
    prepare = [t for t in tasks if str(t["key"]).startswith("prepare-")]

    def compute(t, edge):
        spans = [s for s in t["startstops"] if s["action"] == "compute"]
        return spans[0][edge] if edge == "start" else spans[-1][edge]

    prepared_at = max(compute(t, "stop") for t in prepare)
    after = [t for t in calibrate if compute(t, "start") >= prepared_at]
    span = max(compute(t, "stop") for t in after) - min(compute(t, "start") for t in after)
    durations = np.array([compute(t, "stop") - compute(t, "start") for t in calibrate])
    n = len(report.calibrated) + len(report.failed)
    return {
        "workers": n_workers, "exposures": n, "failed": len(report.failed),
        "wall": wall.seconds, "rate_total": 60.0 * n / wall.seconds,
        "rate_after": 60.0 * len(after) / span, "n_after": len(after),
        "prepare_s": [compute(t, "stop") - compute(t, "start") for t in prepare],
        "task_median": float(np.median(durations)), "task_mean": float(durations.mean()),
        "tasks": len(tasks), "calibrate_tasks": len(calibrate), "prepare_tasks": len(prepare),
        "peak50": sampler.peak(50), "peak": sampler.peak(), "samples": len(sampler.samples),
        "trajectory": sampler.trajectory(),
        "first_sample": min((sum(v[0] for v in r.values()) / max(len(r), 1) / 2**20 for d, r in
                             sampler.samples if r), default=float("nan")),
        "per_worker": {w: sum(1 for t in calibrate if t["worker"] == w)
                       for w in {t["worker"] for t in calibrate}},
        "client_peak_rss": peak_rss_mb(),
        "ours_cores": (ours1 - ours0) / wall.seconds,
        "worker_cpu": sum(workers1[w] - workers0[w] for w in workers1) / n,
        "client_cpu": (client1 - client0) / n,
        "other_cores": max(0.0, (machine1 - machine0) - (ours1 - ours0)) / wall.seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=200)
    args = parser.parse_args()

    lake = survey_lake(args.exposures)
    cube = demo_cube()
    print(f"survey: {lake} ({args.exposures} exposures, 14 fibers, 4096 pixels); "
          f"grid {cube}; {os.cpu_count()} cores")

    results = []
    for n_workers in (1, 2):
        r = run_once(lake, cube, n_workers, CACHE / "survey_scale_out" / f"w{n_workers}")
        results.append(r)
        print(f"\n{n_workers} worker(s): {r['exposures']} exposures ({r['failed']} failed) in "
              f"{r['wall']:.1f} s = {r['rate_total']:.0f} exposures/min overall; "
              f"{r['rate_after']:.0f} exposures/min after the cube was prepared "
              f"({r['n_after']} tasks), {r['rate_after'] / n_workers:.0f}/min/core")
        print(f"  prepare task(s): {', '.join(f'{s:.2f} s' for s in r['prepare_s'])}; "
              f"calibrate task median {r['task_median']:.3f} s, mean {r['task_mean']:.3f} s; "
              f"per worker {sorted(r['per_worker'].values())}")
        print(f"  graph: {r['tasks']} tasks ({r['prepare_tasks']} prepare + "
              f"{r['calibrate_tasks']} calibrate) = {r['tasks'] / r['exposures']:.3f} "
              "tasks/exposure, + 1 scattered catalog")
        print("  worker RSS (MB, mean over workers) by exposures done: " + ", ".join(
            f"{d}: {m:.0f}" for d, m in r["trajectory"]))
        for worker in sorted(r["peak"]):
            print(f"  worker {worker}: peak RSS {r['peak50'].get(worker, float('nan')):.0f} MB "
                  f"after <= 50 exposures, {r['peak'][worker]:.0f} MB after all "
                  f"{r['exposures']} ({r['samples']} samples)")
        print(f"  client (planning + archive writes) peak RSS {r['client_peak_rss']:.0f} MB")
        print(f"  CPU: this job {r['ours_cores']:.2f} cores on average (client, scheduler, "
              f"workers); other processes {r['other_cores']:.2f} cores (a shared machine "
              "makes the rates low)")
        print(f"  CPU per exposure: workers {r['worker_cpu']:.3f} s "
              f"(= {60 / r['worker_cpu']:.0f} exposures/min per free core), client + "
              f"scheduler {r['client_cpu']:.3f} s")
    one, two = results
    for label, key in (("overall", "rate_total"), ("after prepare", "rate_after")):
        speedup = two[key] / one[key]
        print(f"\nscaling {label}: speedup {speedup:.2f} (target >= 1.6), efficiency "
              f"{speedup / 2:.2f} (2-worker rate / (2 x 1-worker rate))")
    print(f"throughput after prepare: {one['rate_after']:.0f} exposures/min on 1 core, "
          f"{two['rate_after'] / 2:.0f} per core on 2 (target >= 200/min/core)")
    if max(one["other_cores"], two["other_cores"]) > 0.2:
        print("NOTE: other processes used the machine during the runs (see CPU lines): the "
              "wall-clock rates and the speedup are understated; CPU per exposure is not.")


if __name__ == "__main__":
    main()
