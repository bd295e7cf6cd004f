"""The survey model as Dask work on the survey's cluster (``[model] enabled``).

After the per-exposure pass (``calibrate-<EXPID>``), for each instrument configuration (the
``setup`` of :func:`kspec_fluxcal.read_exposure_info`, shared by exposures with their own arc
solutions and line spreads) with at least ``[model] min_exposures`` exposures calibrated with
their own standards (archive rows with FCALSRC 'standards' or 'standards+model': never a
calibration that came from the model):

1. The fit: ``reweightings + 1`` rounds of ``model-stats-*`` tasks (one per batch of
   ``[model] batch`` archive rows; each reads its rows' own responses from the archive and
   returns their grey-eliminated normal equations summed per night), ``model-sum-*`` tasks
   adding them pairwise (a tree reduction: no task holds more than two partial sums, none
   loads more than its batch), one ``model-solve-*`` task, and ``model-residuals-*`` tasks
   (per batch: each exposure's grey factor and shape residual). Their small results give the
   next round's Huber weights and error model; the last round's residual curves are written
   to ``OUT/model.zarr`` as they arrive. The client never holds the exposures' spectra.
2. ``recalibrate-<EXPID>`` tasks: every exposure of the setup calibrated in this run, without
   usable standards, or archived with another model, is recalibrated
   (:mod:`kspec_fluxcal.survey.recalibrate`), written and archived (FCALSRC 'standards+model' or
   'model').

The model's identity (``model_id``, archived per row and in FCALMOD) is a hash of its inputs:
the exposures fitted (EXPID and input hash), the [model] options and the package version. A
resumed survey whose inputs did not change refits nothing and recalibrates nothing.

Cost: the statistics are linear in the exposures (each read once per round), the solve linear
in the nights (a Schur complement over them); a task's memory is one batch (64 rows x the
archive grid, ~3 MB) or one partial sum (nights x q^2 x 8 bytes, q ~ 90: 65 kB a night);
the client holds per-exposure scalars.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import FluxCalError
from .cluster import as_completed_pairs
from .levels import fit_levels
from .model import MAG_TO_LN, ModelSpec, exposure_statistics, residuals, solve
from .tasks import Packed, Progress, check_scheduler, collect, run_task, token
from .weights import error_model, error_sums, huber_weights, point_weights

__all__ = ["run_model", "stale_exposures", "fit_archive"]

#: Sources of own-standards calibrations (the model's input).
_OWN_SOURCES = ("standards", "standards+model")
#: Archive fields the client reads per current row to plan the model.
_FIELDS = ("expid", "setup", "night", "mjd", "airmass", "seeing", "exptime", "n_stars_used",
           "fcalsrc", "input_hash", "model_id", "fcalrms", "fcalqual", "fcalmerr", "fcallsf",
           "fcalo2", "fcalo2_err", "fcalh2o", "fcalh2o_err", "sphot_g", "sphot_r", "sphot_i",
           "level_variance")
#: An exposure whose residual exceeds the expected by this factor times [model] huber is an
#: outlier: flagged, and left out of the next round (weight 0).
_OUTLIER_FACTOR = 1.5
#: The error model's running median, Angstrom: it follows the blue end's rise, not noise.
_ERROR_SMOOTHING = 200.0


@dataclass
class _Plan:
    setup: str
    spec: ModelSpec
    own: dict  # per own exposure (sorted by archive row): row, expid, night, ... arrays
    model_id: str
    targets: list = field(default_factory=list)  # (entry, archive row or None, row fields)


def _current(writer):
    """The archive's current rows: dict of field -> array, plus ``row`` (store rows)."""
    from .archive import read_rows

    rows = np.array(sorted(writer.index.values()), dtype=np.int64)
    if not rows.size:
        return {"row": rows, **{k: np.zeros(0) for k in _FIELDS}}
    return {"row": rows, **read_rows(writer.path, rows, _FIELDS)}


def _own_mask(table, setup):
    return ((table["setup"] == setup) & np.isin(table["fcalsrc"], _OWN_SOURCES)
            & (np.asarray(table["n_stars_used"]) > 0) & np.isfinite(table["airmass"])
            & np.isfinite(table["exptime"]))


def _model_id(table, own, config):
    """The model's identity: a hash of its inputs (module docstring)."""
    text = json.dumps({"version": __version__, "model": config.to_dict()["model"],
                       "smooth": config.combine.smooth_scale,
                       "utc": config.survey.utc_offset,
                       "rows": sorted(zip(table["expid"][own].tolist(),
                                          table["input_hash"][own].tolist(), strict=True))},
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _spec(setup, entries, config):
    ranges = np.array([e["info"]["wave_range"] for e in entries])
    m = config.model
    return ModelSpec(setup, (float(ranges[:, 0].min()), float(ranges[:, 1].max())),
                     throughput_knots=m.throughput_knots, extinction_knots=m.extinction_knots,
                     chromatic_knots=m.chromatic_knots, terms=tuple(m.terms),
                     smooth_scale=config.combine.smooth_scale,
                     throughput_sigma=m.throughput_sigma, extinction_sigma=m.extinction_sigma,
                     guide_wavelength=m.guide_wavelength, refraction_sigma=m.refraction_sigma)


def _by_setup(entries):
    groups = {}
    for entry in entries:
        groups.setdefault(entry["info"]["setup"], []).append(entry)
    return groups


def _plans(entries, table, config, report=None):
    """The model plan of every setup with enough exposures (targets: see :func:`_targets`)."""
    plans = []
    for setup, group in sorted(_by_setup(entries).items()):  # a handful of setups
        own = _own_mask(table, setup)
        if own.sum() < config.model.min_exposures:
            if report is not None:
                report.model[setup] = {"skipped": f"no model: {int(own.sum())} exposure(s) "
                                       "calibrated with their own standards, need "
                                       f"{config.model.min_exposures} ([model] min_exposures)"}
            continue
        order = np.flatnonzero(own)
        plan = _Plan(setup, _spec(setup, group, config),
                     {k: np.asarray(v)[order] for k, v in table.items()},
                     _model_id(table, own, config))
        plan.targets = _targets(group, table, plan, config, report)
        plans.append(plan)
    return plans


def _targets(group, table, plan, config, report):
    """Exposures to recalibrate: (entry, archive row of its own data or None, row fields).

    Those whose first pass found no usable standard now (the model alone), those calibrated
    now with their standards, and those archived with another model (or none)."""
    where = {e: k for k, e in enumerate(table["expid"])}
    done = set(report.calibrated) if report is not None else set()
    targets = []
    for entry in group:
        expid = entry["info"]["expid"]
        if entry.get("failure", {}).get("status") == "no standards":
            targets.append((entry, None, None))
            continue
        k = where.get(expid)
        if k is None or "failure" in entry:
            continue  # never calibrated, or failing for another reason
        row = {name: table[name][k] for name in _FIELDS}
        if expid not in done and row["model_id"] == plan.model_id:
            continue  # archived with this model (skipped as up to date)
        if row["fcalsrc"] in _OWN_SOURCES and row["n_stars_used"] > 0:
            if config.model.recalibrate:
                targets.append((entry, int(table["row"][k]), row))
        elif row["fcalsrc"] == "model":
            targets.append((entry, None, None))
    return targets


def stale_exposures(out, entries, writer, config):
    """EXPIDs the survey model would recalibrate although their own calibration is current
    (the model's options changed): a survey with no exposure to calibrate still runs."""
    if not writer.index:
        return []
    plans = _plans(entries, _current(writer), config)
    return [t[0]["info"]["expid"] for p in plans for t in p.targets]


# ----------------------------------------------------------------------------- tasks


def _own_on_fit_grid(archive, rows, exptime, spec):
    """ln(1 / (own_smooth exptime)) and its formal variance on the fit grid: (E, J) each.
    Rows written before schema 3 with FCALSRC 'standards' use their cal_smooth (no formal
    variance: the error model's floors weight them)."""
    from .archive import read_rows

    data = read_rows(archive, rows, ["own_smooth", "own_smooth_variance", "cal_smooth",
                                     "fcalsrc"])
    idx = spec.grid_index
    smooth = data["own_smooth"][:, idx].astype(np.float64)
    older = ~np.isfinite(smooth).any(axis=1) & (data["fcalsrc"] == "standards")
    smooth[older] = data["cal_smooth"][older][:, idx]
    var = data["own_smooth_variance"][:, idx].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = -np.log(smooth * np.asarray(exptime, dtype=np.float64)[:, None])
        formal = np.where(np.isfinite(var), var / smooth**2, 0.0)
    return np.where(np.isfinite(y), y, np.nan), np.where(np.isfinite(y), formal, np.nan)


def _stats_task(archive, spec, batch, huber, tau2, star_var):
    """Normal equations of a batch of exposures, summed per night."""
    y, formal = _own_on_fit_grid(archive, batch["row"], batch["exptime"], spec)
    w = point_weights(spec, formal, batch["n_stars_used"], huber, tau2, star_var)
    return exposure_statistics(spec, y, w, batch["airmass"], batch["seeing"], batch["night"])


def _merge_task(a, b):
    return a.merge(b)


def _residual_task(archive, spec, batch, model, huber, curves):
    """Grey factors, mean square shape residuals and formal variances of a batch, and its
    sums for the error model; the residual curves too on the last round."""
    y, formal = _own_on_fit_grid(archive, batch["row"], batch["exptime"], spec)
    ones = np.ones(len(batch["row"]))
    w = point_weights(spec, formal, batch["n_stars_used"], ones, model.tau2, model.star_var)
    r = residuals(model, y, w, batch["airmass"], batch["seeing"], batch["night"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an exposure without points
        mean_formal = np.nanmean(formal, axis=1)
    return {"grey": r["grey"], "mean_square": r["mean_square"], "formal": mean_formal,
            "sums": error_sums(r["residual"], formal, batch["n_stars_used"], huber),
            "residual": r["residual"].astype(np.float32) if curves else None}


def _star_table_bytes(path):
    """The FCALSTAR table of an existing product as its FITS bytes (kept verbatim through a
    recalibration), or None."""
    from ..fits_file import extension_raw

    try:
        return extension_raw(path, "FCALSTAR")
    except OSError:
        return None


def _recalibrate_task(path, out_path, archive, row, fields, model, levels, config, setup_key,
                      input_hash, utc, expid, provenance, catalog, model_id):
    """Recalibrate one exposure with the model; never raises for bad data
    (:func:`kspec_fluxcal.survey.tasks.run_task`)."""
    return Packed(run_task(expid, _recalibrate_one, path, out_path, archive, row, fields, model,
                           levels, config, setup_key, input_hash, utc, provenance, catalog,
                           model_id))


def _recalibrate_one(path, out_path, archive, row, fields, model, levels, config, setup_key,
                     input_hash, utc, provenance, catalog, model_id):
    """The work of a recalibrate task: the model's calibration
    (:func:`kspec_fluxcal.survey.recalibrate.model_calibration`, with the exposure's own
    archived data at ``row``, or alone), checked, applied and written; returns its archive
    record and quality."""
    from ..calibration import apply_calibration
    from ..config import second_order_options
    from ..exposure import open_exposure
    from ..products import write_calibrated
    from ..second_order import correct_second_order
    from ..spectrophotometry import check_exposure
    from .archive import archive_record, read_own
    from .recalibrate import model_calibration

    exposure = correct_second_order(open_exposure(path), **second_order_options(config))
    own = read_own(archive, [row])[0] if row is not None else None
    calibration = model_calibration(exposure, model, levels, own, fields, config,
                                    utc_offset=utc, model_id=model_id)
    calibrated = apply_calibration(exposure, calibration)
    calibrated.attrs["setup"] = setup_key
    check_exposure(calibrated, catalog)
    write_calibrated(calibrated, out_path, overwrite=True,
                     stars=_star_table_bytes(out_path) if own is not None else None)
    record = archive_record(calibrated, None, calibration, source=str(path),
                            input_hash=input_hash, utc_offset=utc, provenance=provenance,
                            own=own)
    attrs = calibration.attrs
    # The standards fitted, rejected ones included (as the first pass counts them; FCALSTAR
    # keeps them), not only those used.
    standards = 0 if own is None else int(np.count_nonzero(own["star"]["star_fiber"] >= 0))
    quality = {"grade": str(attrs["fcalqual"]), "used": int(attrs["fcalnstr"]),
               "standards": standards, "fcalrms": float(attrs["fcalrms"]),
               "fcalmerr": float(attrs["fcalmerr"]), "fcallsf": float(attrs["fcallsf"]),
               "source": str(attrs["fcalsrc"])}
    return {"record": record, "quality": quality}


# ----------------------------------------------------------------------------- the job


def run_model(client, entries, writer, report, config, *, out, utc, catalog, provenance,
              progress, flush):
    """Fit the survey model of every setup that has work, and recalibrate with it.

    Parameters
    ----------
    client : distributed.Client
    entries : list of dict
        The survey's plan entries (every RED file of the lake, with ``out``).
    writer : kspec_fluxcal.survey.archive.ArchiveWriter
    report : kspec_fluxcal.survey.SurveyReport
        Updated: calibrated, model_only, failed, quality, notes, model.
    config : Config
    out : pathlib.Path
        The survey's output directory (``model.zarr`` goes there).
    utc : float
    catalog : distributed.Future
        The catalog task's future (the spectrophotometric check).
    provenance : dict
    progress : bool
    flush : (int, float)
    """
    for plan in _plans(entries, _current(writer), config, report):
        if not plan.targets:
            continue
        start = time.monotonic()
        if progress:
            print(f"survey model, setup {plan.setup}: fitting {len(plan.own['row'])} "
                  f"exposures over {len(set(plan.own['night']))} night(s)", flush=True)
        store = _store(out, plan)
        try:
            fit = _fit(client, plan, config, writer.path, store)
            _recalibrate(client, plan, fit, writer, report, config, utc=utc, catalog=catalog,
                         provenance=provenance, progress=progress, flush=flush)
            report.model[plan.setup] = _finish(plan, fit, writer, config)
        except BaseException:
            store.abandon()  # the previous model stays
            raise
        if progress:
            print(f"survey model, setup {plan.setup}: done in {time.monotonic() - start:.1f} s",
                  flush=True)


def fit_archive(client, archive, setup, wave_range, config, out):
    """Fit a setup's model from an archive alone (no lake, no recalibration): the survey
    job's fit, e.g. to refit with other [model] options or to time it.

    Parameters
    ----------
    client : distributed.Client
    archive : path-like
    setup : str
        Setup key.
    wave_range : (float, float)
        The setup's wavelength range, Angstrom.
    config : Config
    out : path-like
        Directory of the model store written (``out/model.zarr``).

    Returns
    -------
    dict
        ``model`` (SurveyModel), ``levels`` (Levels), per-exposure ``grey``,
        ``mean_square``, ``huber``, ``outlier``, and ``summary`` (exposures and nights
        fitted, outliers, the error model).
    """
    from .archive import ArchiveWriter

    writer = ArchiveWriter(archive)
    entry = {"info": {"setup": setup, "wave_range": tuple(wave_range), "expid": ""}}
    plans = _plans([entry], _current(writer), config)
    if not plans:
        raise FluxCalError(f"{archive}: fewer than {config.model.min_exposures} exposures of "
                           f"setup {setup} calibrated with their own standards")
    store = _store(out, plans[0])
    try:
        fit = _fit(client, plans[0], config, writer.path, store)
        fit["counts"] = {"recalibrated": 0, "model_only": 0}
        summary = _finish(plans[0], fit, writer, config)
    except BaseException:
        store.abandon()
        raise
    return {**fit, "summary": summary}


def _store(out, plan):
    """The writer of the setup's group of ``out/model.zarr``."""
    from .model_store import MODEL_STORE, ModelStoreWriter

    return ModelStoreWriter(Path(out) / MODEL_STORE, plan.setup, plan.spec.loglam,
                            len(plan.own["row"]))


def _batches(plan, size):
    n = len(plan.own["row"])
    names = ("row", "exptime", "n_stars_used", "airmass", "seeing", "night")
    return [(slice(i, min(i + size, n)), {k: plan.own[k][i:i + size] for k in names})
            for i in range(0, n, size)]


def _tree_sum(client, futures, prefix, model_id):
    """Sum futures pairwise, level by level, in a fixed order (bit-identical sums)."""
    level = 0
    while len(futures) > 1:
        pairs = [client.submit(_merge_task, futures[i], futures[i + 1],
                               key=f"{prefix}-{level}-{i // 2}-{model_id}")
                 for i in range(0, len(futures) - 1, 2)]
        futures = pairs + futures[len(futures) - len(futures) % 2:]
        level += 1
    return futures[0]


def _fit(client, plan, config, archive, store):
    """The fit's rounds (module docstring), the last round's residual curves written to
    ``store``; returns the model, levels and per-exposure results."""
    m, spec, own = config.model, plan.spec, plan.own
    n = len(own["row"])
    batches = _batches(plan, m.batch)
    start = (max(m.exposure_scatter**2, 1e-6), max(m.star_shape_error**2, 1e-6))
    tau2, star_var = start
    step = np.exp(np.median(spec.loglam)) * np.median(np.diff(spec.loglam))
    smoothing = int(round(_ERROR_SMOOTHING / step))
    huber = np.ones(n)
    tag, model_id = f"{plan.setup}", plan.model_id
    for it in range(m.reweightings + 1):
        final = it == m.reweightings
        stats = [client.submit(_stats_task, str(archive), spec, batch, huber[part], tau2,
                               star_var, key=f"model-stats-{tag}-{it}-{k}-{model_id}")
                 for k, (part, batch) in enumerate(batches)]
        total = _tree_sum(client, stats, f"model-sum-{tag}-{it}", model_id)
        solved = client.submit(solve, spec, total, tau2=tau2, star_var=star_var,
                               key=f"model-solve-{tag}-{it}-{model_id}")
        del stats, total
        scalars = _residual_round(client, solved, batches, huber, archive, spec, store, final,
                                  f"model-residuals-{tag}-{it}-{{}}-{model_id}")
        tau2, star_var = error_model(scalars["sums"], start=start, smooth_points=smoothing)
        expected = scalars["formal"] + np.mean(star_var) / own["n_stars_used"] + np.mean(tau2)
        huber = huber_weights(scalars["mean_square"], expected, m.huber,
                              clip=_OUTLIER_FACTOR * m.huber)
    model = solved.result()
    model.tau2, model.star_var = tau2, star_var
    outlier = np.sqrt(scalars["mean_square"] / expected) > _OUTLIER_FACTOR * m.huber
    with np.errstate(invalid="ignore", divide="ignore"):
        water = np.asarray(own["fcalh2o"], float) / np.asarray(own["airmass"], float)
    levels = fit_levels(scalars["grey"], own["airmass"], own["night"], huber, water,
                        np.asarray(own["fcallsf"], float),
                        slope_sigma=m.grey_slope_sigma * MAG_TO_LN)
    return {"model": model, "levels": levels, "store": store, "huber": huber,
            "outlier": outlier, **scalars}


def _residual_round(client, solved, batches, huber, archive, spec, store, curves, key):
    """Submit the residual tasks of a round; gather their scalars and error sums (and store
    the curves)."""
    n = batches[-1][0].stop
    out = {k: np.full(n, np.nan) for k in ("grey", "mean_square", "formal")}
    sums = [None] * len(batches)
    futures = {client.submit(_residual_task, str(archive), spec, batch, solved, huber[part],
                             curves, key=key.format(k)): (k, part)
               for k, (part, batch) in enumerate(batches)}
    with as_completed_pairs(client, futures) as pairs:
        for future, result in pairs:
            check_scheduler(client, future, result)
            if future.status != "finished":
                raise FluxCalError(f"survey model: task {future.key} failed ({result!r})")
            k, part = futures[future]
            sums[k] = result["sums"]
            for name in ("grey", "mean_square", "formal"):
                out[name][part] = result[name]
            if curves:
                store.write_residuals(np.arange(part.start, part.stop), result["residual"])
            future.release()
    # Added in the batches' order, whatever order they finished in: the same bits each run.
    out["sums"] = np.sum(sums, axis=0)
    return out


def _held(value):
    """``value`` itself, as a task's result."""
    return value


def outliers_kept(plan, fit):
    """The targets to recalibrate, and those left with their own calibration: exposures the
    fit flagged as outliers (their standards' shape further from the model than 1.5 x
    ``[model] huber`` times the expected residual): the model does not describe them (a
    real change of the instrument, or a bad exposure), and combining them with it moved
    their calibration away from their own truth."""
    flagged = set(np.asarray(plan.own["expid"])[np.asarray(fit["outlier"], bool)])
    keep = [t for t in plan.targets if t[0]["info"]["expid"] not in flagged]
    return keep, sorted({t[0]["info"]["expid"] for t in plan.targets} & flagged)


def _recalibrate(client, plan, fit, writer, report, config, *, utc, catalog, provenance,
                 progress, flush):
    """The recalibrate-<EXPID> tasks of a setup, committed to the archive as they finish."""
    # In tasks the scheduler can run again, not scattered copies that die with the workers
    # holding them (see survey.job._work).
    model = client.submit(_held, fit["model"], key=f"model-held-{plan.model_id}")
    levels = client.submit(_held, fit["levels"], key=f"model-levels-{plan.model_id}")
    targets, kept = outliers_kept(plan, fit)
    for expid in kept:
        report.notes.setdefault(expid, []).append(
            "survey model: an outlier (its standards' shape far from the model): its own "
            "calibration kept")
    # One graph for every exposure's task (see survey.job._run_graph), one named task each.
    entries, n = [t[0] for t in targets], len(targets)
    tasks = client.map(
        _recalibrate_task, [e["path"] for e in entries], [e["out"] for e in entries],
        [str(writer.path)] * n, [t[1] for t in targets], [t[2] for t in targets], [model] * n,
        [levels] * n, [config] * n, [e["info"]["setup"] for e in entries],
        [e["input_hash"] for e in entries], [utc] * n, [e["info"]["expid"] for e in entries],
        [provenance] * n, [catalog] * n, [plan.model_id] * n, retries=2,
        key=[f"recalibrate-{e['info']['expid']}-"
             f"{token(plan.model_id, e['input_hash'], e['out'])}" for e in entries]) \
        if targets else []
    futures = dict(zip(tasks, entries, strict=True))
    counts = {"recalibrated": 0, "model_only": 0}
    # Sets: membership in the report's lists, per exposure, was quadratic in a large survey.
    calibrated, skipped, moved = set(report.calibrated), set(report.skipped), set()

    def handle(entry, result):
        expid = entry["info"]["expid"]
        alone = entry.get("failure", {}).get("status") == "no standards" or \
            expid in report.failed
        if result["status"] != "ok":
            if alone:
                report.failed[expid] += f"; survey model: {result['reason']}"
            else:  # its own calibration (product and row) stays
                report.notes.setdefault(expid, []).append(
                    f"survey model recalibration failed, own calibration kept: "
                    f"{result['reason']}")
            return None
        report.failed.pop(expid, None)
        if expid in skipped:
            moved.add(expid)
        if expid not in calibrated:
            calibrated.add(expid)
            report.calibrated.append(expid)
        if result["quality"]["source"] == "model":
            report.model_only.append(expid)
            counts["model_only"] += 1
        else:
            counts["recalibrated"] += 1
        report.quality[expid] = result["quality"]
        return result["record"]

    if progress:
        print(f"survey model, setup {plan.setup}: recalibrating {len(futures)} exposure(s)",
              flush=True)
    try:
        collect(client, futures, writer, report, handle, flush, Progress(len(futures), progress))
    finally:  # also when interrupted: the report's lists say what was done
        report.skipped[:] = [e for e in report.skipped if e not in moved]
    fit["counts"] = counts


def _finish(plan, fit, writer, config):
    """Write the model store's tables (with the night medians of the spectrophotometric
    check after recalibration); returns the summary for the report."""
    own, model, levels = plan.own, fit["model"], fit["levels"]
    table = _current(writer)
    mine = table["setup"] == plan.setup
    nights = sorted(set(own["night"]) | set(table["night"][mine]))
    exposures = {"expid": own["expid"], "exposure_night": own["night"],
                 "exposure_mjd": own["mjd"], "airmass": own["airmass"],
                 "seeing": own["seeing"], "n_stars": own["n_stars_used"],
                 "grey": fit["grey"], "grey_model": _grey_model(levels, own),
                 "weight": fit["huber"], "outlier": fit["outlier"],
                 "grey_outlier": levels.grey_outlier,
                 "residual_rms": np.sqrt(fit["mean_square"])}
    night_table = {"night": np.array(nights), **_night_columns(nights, own, fit, table, mine)}
    night_table["photometric"] = _photometric(nights, own, levels, night_table, config)
    fit["store"].finish(model, levels, exposures, night_table,
                        {"model_id": plan.model_id, "solution": model.identity()})
    return {
        "exposures": len(own["row"]), "nights": len(set(own["night"])),
        "outliers": int(fit["outlier"].sum()), "tau": float(np.sqrt(np.median(model.tau2))),
        "sigma_star": float(np.sqrt(np.median(model.star_var))), "model_id": plan.model_id,
        **fit.get("counts", {"recalibrated": 0, "model_only": 0})}


def _photometric(nights, own, levels, night_table, config):
    """Nights whose grey factors follow their line against airmass (3 exposures at least)
    within ``[model] photometric_scatter``, or what the standards' own aperture losses
    scatter by over their number (1.5 x ``[combine] aperture_scatter`` / sqrt(median
    standards per exposure)): nights of one or two standards per exposure scatter by more
    than 3 % without a cloud."""
    stars = np.array([np.median(own["n_stars_used"][own["night"] == night])
                      if np.any(own["night"] == night) else 1.0 for night in nights])
    limit = np.maximum(config.model.photometric_scatter,
                       1.5 * config.combine.aperture_scatter / np.sqrt(np.maximum(stars, 1)))
    return (levels.of(nights)["scatter"] <= limit) & (night_table["n_exposures"] >= 3)


def _grey_model(levels, own):
    level = levels.of(own["night"])
    return level["intercept"] + level["slope"] * np.asarray(own["airmass"], float)


def _night_columns(nights, own, fit, table, mine):
    """Per-night columns of the model store (loops over nights, not exposures' pixels)."""
    cols = {k: np.full(len(nights), np.nan) for k in ("mjd", "median_residual", "sphot_g",
                                                        "sphot_r", "sphot_i")}
    cols["n_exposures"] = np.zeros(len(nights), np.int64)
    cols["n_outliers"] = np.zeros(len(nights), np.int64)
    for k, night in enumerate(nights):
        fitted = own["night"] == night
        current = mine & (table["night"] == night)
        cols["n_exposures"][k] = int(fitted.sum())
        cols["n_outliers"][k] = int(fit["outlier"][fitted].sum())
        mjd = own["mjd"][fitted] if fitted.any() else table["mjd"][current]
        cols["mjd"][k] = float(np.mean(mjd)) if len(mjd) else np.nan
        if fitted.any():
            cols["median_residual"][k] = float(np.median(np.sqrt(fit["mean_square"][fitted])))
        for band in ("g", "r", "i"):
            values = np.asarray(table[f"sphot_{band}"][current], float)
            if np.isfinite(values).any():
                cols[f"sphot_{band}"][k] = float(np.nanmedian(values))
    return cols
