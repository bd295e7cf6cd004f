"""Simulated surveys: many exposures over nights, written with their catalog and truth.

:func:`simulate_survey` plans the exposures (nights, setups, wavelength-solution varieties,
standards, dead fibers), draws each night's conditions, simulates every exposure
(:func:`kspec_fluxcal.sim.exposure.simulate_exposure`) and writes the RED files, the
catalog, the XP table, the truth files and a manifest. Every number is drawn from one seed:
the same arguments give the same bytes.

Layout of ``outdir``::

    lake/<YYYYMMDD>/<EXPID>.fits   RED files (formats contract section 1)
    catalog.csv                    Refcat2 catalog (section 2): standards, other stars
                                   of the fields and decoys (with ``source_id`` if xp)
    xp.csv                         with ``xp``: the standards' Gaia XP spectra in
                                   GaiaXPy's layout (:mod:`~kspec_fluxcal.sim.xp_spectra`)
    truth/<EXPID>.npz              the truth of each exposure (:mod:`~.exposure`)
    survey.json                    manifest: seed, options, exposures
    grid/                          the synthetic BOSZ-layout grid, when ``grid`` is None

The exposures vary deterministically with the seed: 1-D WAVELA, per-fiber 2-D WAVELA
(resampled by the reader), WCS-only; nm and vacuum solutions; standards matched by
position (OBJID -1); dead fibers; 1, 2 and 3 standards (a survey of at least 3 exposures
has each of these). A setup with ``formats`` (e.g.
:data:`~kspec_fluxcal.sim.setups.ISOPLANE_SETUP`: a WCS only) is always written that way.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from .._atomic import atomic_directory, atomic_file, foreign_output
from ..errors import FluxCalError, FluxCalWarning, GridError, OutputExistsError
from .conditions import _EXPOSURE, _draw_nights, _ranges
from .exposure import COARSE_SOURCE, coarse_source_message, simulate_exposure
from .refcat import _P_POSITION_ONLY, _ensure_catalog_variety, write_catalog
from .setups import Setup, _as_setup
from .star_sources import GridStars
from .xp_spectra import write_xp, xp_rows

__all__ = ["simulate_survey"]

#: Probability of a dead fiber in an exposure.
_P_DEAD = 0.3

#: First night of the simulated survey and the local evening start (KST 20:00 = 11:00 UT).
_FIRST_NIGHT = _dt.date(2026, 11, 1)
_NIGHT_START_UT_HOURS = 11.0
_MJD_EPOCH = _dt.date(1858, 11, 17)
#: Exposure spacing: at least 20 minutes, or the exposure time plus 2 minutes of overhead.
_SPACING_MIN_S = 1200.0
_OVERHEAD_S = 120.0
#: The synthetic grid written when none is given: small enough to write in ~30 s on 2 cores.
_DEMO_GRID = {
    "resolution": 5000,
    "teffs": tuple(range(5250, 7251, 250)),
    "loggs": (3.5, 4.0, 4.5),
    "fehs": (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25),
    "wave_min": 2500.0,
    "wave_max": 26000.0,
}
#: Wavelength-solution varieties: (format, unit, medium). The first three together cover
#: 1-D and 2-D WAVELA, the WCS-only form, nm and vacuum; every survey of >= 3 exposures has them.
_VARIETIES = (
    ("wavela", "nm", "air"),
    ("wavela2d", "Angstrom", "vac"),
    ("wcs", "Angstroms", "air"),
    ("wavela", "Angstrom", "vac"),
    ("wavela2d", "nm", "air"),
    ("wavela", "Angstrom", "air"),
)


def _mjd(date):
    return float((date - _MJD_EPOCH).days)


def _plan(rng, exposures, nights, setups, n_standards=(1, 3), no_standards=0.0):
    """Per-exposure plan: night, setup, variety, standards, OBJID -1 flags, dead fiber; a
    fraction ``no_standards`` of the exposures (drawn from a child stream: the others' draws
    stay as they were) has none."""
    nights = max(1, min(nights, exposures))
    per_night = np.array_split(np.arange(exposures), nights)
    varieties = [_VARIETIES[k] for k in rng.permutation(3)]
    varieties += [_VARIETIES[k] for k in rng.integers(0, len(_VARIETIES), max(0, exposures - 3))]
    lo, hi = n_standards
    n_std = list(rng.permutation(np.arange(lo, hi + 1)))
    n_std += list(rng.integers(lo, hi + 1, max(0, exposures - (hi - lo + 1))))
    n_std = n_std[:exposures]
    position_only = [rng.random(n) < _P_POSITION_ONLY for n in n_std]
    if no_standards > 0:
        none = rng.spawn(1)[0].random(exposures) < no_standards
        n_std = [0 if z else n for n, z in zip(n_std, none, strict=True)]
        position_only = [p[:n] for p, n in zip(position_only, n_std, strict=True)]
    with_std = [k for k, n in enumerate(n_std) if n > 0]
    if with_std and not any(p.any() for p in position_only):
        position_only[with_std[int(rng.integers(len(with_std)))]][0] = True
    dead = rng.random(exposures) < _P_DEAD
    if exposures >= 3 and not dead.any():
        dead[int(rng.integers(exposures))] = True
    exptime = np.round(rng.uniform(*_EXPOSURE["exptime"], exposures))
    plan = []
    for night_index, members in enumerate(per_night):
        date = _FIRST_NIGHT + _dt.timedelta(days=night_index)
        start = _mjd(date) + _NIGHT_START_UT_HOURS / 24.0 + rng.uniform(0.0, 0.02)
        for seq, i in enumerate(members, start=1):
            night = date.strftime("%Y%m%d")
            setup = setups[i % len(setups)]
            fmt, unit, medium = varieties[i] if setup.formats is None \
                else setup.formats[i % len(setup.formats)]
            plan.append({
                "index": int(i), "night": night, "night_index": night_index,
                "expid": f"KS{night}_{seq:04d}", "setup": setup,
                "wavelength_format": fmt, "wavelength_unit": unit, "medium": medium,
                "n_standards": int(n_std[i]), "position_only": position_only[i],
                "dead_fiber": bool(dead[i]), "exptime": float(exptime[i]),
                "mjd": round(start, 6),
            })
            start += (max(_SPACING_MIN_S, exptime[i] + _OVERHEAD_S)
                      + rng.uniform(0.0, 180.0)) / 86400.0
    return plan


def _write_truth(path, truth):
    # numpy.savez gives its members the fixed zip date 1980-01-01: the bytes depend on the
    # arrays only (checked by the determinism test).
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **truth)


def _demo_grid(directory, previous, workers):
    """Write the demo's synthetic grid (reusing complete files of a previous run)."""
    from .synthetic_grid import write_synthetic_grid

    if previous is not None and previous.is_dir():
        shutil.copytree(previous, directory)
    try:
        write_synthetic_grid(directory, workers=workers, **_DEMO_GRID)
    except GridError:
        shutil.rmtree(directory, ignore_errors=True)
        write_synthetic_grid(directory, workers=workers, **_DEMO_GRID)


def simulate_survey(outdir, *, exposures=20, nights=4, seed=0, fibers=14, pixels=4096,
                    grid=None, snr_range=(30, 150), setups=None, progress=False,
                    overwrite=False, workers=2, standard_source=None, n_standards=(1, 3),
                    lsf_scale=1.0, pixel_integration=False, fiber_lsf_scatter=0.0, xp=False,
                    no_standards=0.0, snr_range_single=None, photometric_nights=0.0,
                    chromatic_losses=False, airmass_range=None, pwv_range=None,
                    lsf_shape="gaussian", arc_error=0.0, second_order=0.0,
                    second_order_blaze=None):
    """Write a small simulated survey with known truth, in the formats of the contract.

    The layout of ``outdir`` and how its exposures vary: see the module docstring.

    Parameters
    ----------
    outdir : path-like
        Output directory; must not exist or be empty, unless ``overwrite``.
    exposures, nights : int
        Number of exposures, spread over consecutive nights from 2026-11-01.
    seed : int
        Seed of everything.
    fibers, pixels : int
        Fibers per exposure and pixels per spectrum (3500-8500 A) of the default setup.
    grid : path-like, optional
        BOSZ-layout directory, the source of the field (and of the standards unless
        ``standard_source``); default: write a synthetic one to ``outdir/grid``
        (R = 5000, 2500-26000 A, Teff 5250-7250 K, log g 3.5-4.5, [M/H] -1.0 to +0.25).
    snr_range : (float, float)
        Median S/N per pixel of the standard stars.
    setups : sequence of Setup or dict, optional
        Setups used in turn by successive exposures (default: one, from ``fibers`` and
        ``pixels``).
    progress : bool
        Report progress and timings on stderr.
    overwrite : bool
        Replace an existing non-empty ``outdir`` (atomically) that is a simulated survey
        (it has survey.json); any other directory is refused.
    workers : int
        Threads writing the synthetic grid.
    standard_source : star source, optional
        Source of the standard stars (:mod:`kspec_fluxcal.sim.star_sources`), e.g.
        ``ModelStars("B")``
        or ``CalspecStars(...)`` for cross-model surveys; default the grid.
    n_standards : (int, int)
        Inclusive range of standards per exposure (each value appears once in the first
        exposures, then they are drawn); (0, 3) allows exposures without any.
    lsf_scale, pixel_integration, fiber_lsf_scatter
        Instrument realism, passed to every :func:`simulate_exposure` (a range of
        ``lsf_scale`` is drawn from per exposure).
    xp : bool
        Simulate Gaia XP spectra of the standards (``xp.csv``; their systematics are in the
        truth files); the exposures are the same as without.
    no_standards : float
        Fraction of the exposures without any standard star (drawn; to be calibrated from
        the survey model).
    snr_range_single : (float, float), optional
        S/N range of the standard of exposures with a single one (default ``snr_range``):
        weak single standards, which the survey model should help.
    photometric_nights : float
        Fraction of the nights that are photometric: their exposures' transparency varies
        within 0.98-1.0 (otherwise 0.8-1.0); the manifest and truth say which.
    chromatic_losses : bool
        Seeing- and refraction-dependent fiber losses (see :func:`simulate_exposure`), with
        a median seeing per night.
    airmass_range, pwv_range : (float, float), optional
        Ranges the exposures' airmass and precipitable-water factor (1: the telluric line
        list's reference column) are drawn from, uniformly, instead of the defaults 1.0-2.0
        and 0.4-2.5
        (:data:`~kspec_fluxcal.sim.conditions._EXPOSURE`). E.g. (1.0, 2.8) and (2.0, 8.0): a
        humid site or season, fields observed down to airmass 2.8. Every other draw stays as
        with the defaults (the same random numbers; these map into the given range); the
        manifest's options record them when given.
    lsf_shape : {'gaussian', 'fiber'}
    arc_error : float
        The true line spread's profile and each fiber's wavelength-solution error (pixels
        rms), passed to every :func:`simulate_exposure`; the manifest records them when not
        the defaults.
    second_order : float
        The grating's second- to first-order efficiency ratio (0: no second-order light),
        passed to every :func:`simulate_exposure`; the manifest records it when > 0.
    second_order_blaze : float, optional
        The grating's first-order blaze wavelength (Angstrom): the ratio from scalar theory,
        ``second_order`` its scale (:func:`simulate_exposure`); recorded when given.

    Returns
    -------
    pathlib.Path
        ``outdir``.

    Raises
    ------
    OutputExistsError
        When ``outdir`` is not empty and ``overwrite`` is false.
    """
    outdir = Path(outdir)
    setups = _check_survey(outdir, exposures, nights, n_standards, setups, fibers, pixels,
                           no_standards, photometric_nights, overwrite)
    ranges = _ranges(airmass_range, pwv_range)
    options = {"snr_range": snr_range, "standard_source": standard_source,
               "lsf_scale": lsf_scale, "pixel_integration": pixel_integration,
               "fiber_lsf_scatter": fiber_lsf_scatter, "xp": xp,
               "chromatic_losses": chromatic_losses, "lsf_shape": lsf_shape,
               "arc_error": arc_error, "second_order": second_order,
               "second_order_blaze": second_order_blaze}
    plan_options = {"no_standards": float(no_standards), "snr_range_single": snr_range_single,
                    "photometric_nights": float(photometric_nights)}
    say = _reporter(progress)
    plan_seed, night_seed, catalog_seed, *exposure_seeds = \
        np.random.SeedSequence(seed).spawn(3 + exposures)
    t_start = time.perf_counter()
    # An empty existing directory is replaced like a stale one: the new survey appears whole.
    with atomic_directory(outdir, overwrite=True) as tmp:
        stars, grid_label = _field_source(tmp, outdir, grid, workers, say)
        plan = _plan(np.random.default_rng(plan_seed), exposures, nights, setups,
                     tuple(n_standards), no_standards)
        nights_drawn = _draw_nights(np.random.default_rng(night_seed),
                                    max(p["night_index"] for p in plan) + 1,
                                    photometric_nights, chromatic_losses)
        for night in nights_drawn:  # the exposures' ranges, as a night's transparency_range
            night.update(ranges)
        rows, manifest, spectra = _simulate_exposures(tmp, plan, exposure_seeds, stars,
                                                      nights_drawn, options, snr_range_single,
                                                      say)
        _write_catalogs(tmp, np.random.default_rng(catalog_seed), rows, spectra if xp else None)
        recorded = {**options, **plan_options, "exposures": exposures, "nights": nights,
                    "fibers": fibers, "pixels": pixels, "grid": grid_label, "setups": setups,
                    "n_standards": n_standards, "ranges": ranges}
        info = _survey_info(seed, recorded, stars, len(rows), manifest)
        with atomic_file(tmp / "survey.json") as path:
            path.write_text(json.dumps(info, indent=1) + "\n")
    say(f"survey: {exposures} exposures in {time.perf_counter() - t_start:.1f} s -> {outdir}")
    return outdir


def _check_survey(outdir, exposures, nights, n_standards, setups, fibers, pixels, no_standards,
                  photometric_nights, overwrite):
    """Validate :func:`simulate_survey`'s arguments; return its setups (a list of
    :class:`Setup`: the given ones, or one from ``fibers`` and ``pixels``)."""
    if exposures < 1 or nights < 1:
        raise ValueError(f"exposures={exposures!r}, nights={nights!r}: need at least 1 each")
    if not 0 <= n_standards[0] <= n_standards[1]:
        raise ValueError(f"n_standards={n_standards!r}: need 0 <= low <= high")
    if outdir.exists() and any(outdir.iterdir()):
        if not overwrite:
            raise OutputExistsError(outdir)
        if problem := foreign_output(outdir, lambda p: (p / "survey.json").is_file(),
                                     "a simulated survey (no survey.json)"):
            raise FluxCalError(f"{outdir}: {problem}")
    setups = [Setup(pixels=pixels, fibers=fibers)] if setups is None \
        else [_as_setup(s) for s in setups]
    if not setups:
        raise ValueError("setups is empty")
    if len({s.name for s in setups}) != len(setups):
        raise ValueError("setups must have distinct names")
    if not 0.0 <= no_standards <= 1.0 or not 0.0 <= photometric_nights <= 1.0:
        raise ValueError(f"no_standards={no_standards!r}, photometric_nights="
                         f"{photometric_nights!r}: need fractions in [0, 1]")
    return setups


def _reporter(progress):
    """A function printing a line of progress to stderr, or doing nothing."""
    def say(text):
        if progress:
            print(text, file=sys.stderr, flush=True)

    return say


def _field_source(tmp, outdir, grid, workers, say):
    """The survey's star source (:class:`GridStars`) and the grid label its manifest records:
    the given BOSZ-layout ``grid``, or the demo's synthetic grid written to ``tmp/grid``
    (reusing the complete files of a previous survey in ``outdir``) when it is None."""
    if grid is None:
        t0 = time.perf_counter()
        previous = outdir / "grid" if outdir.exists() else None
        _demo_grid(tmp / "grid", previous, workers)
        say(f"synthetic grid: {time.perf_counter() - t0:.1f} s")
        grid_dir, grid_label = tmp / "grid", "grid"
    else:
        grid_dir, grid_label = Path(grid), str(Path(grid).resolve())
    return GridStars(grid_dir), grid_label


def _simulate_exposures(tmp, plan, seeds, stars, nights, options, snr_range_single, say):
    """Simulate and write every planned exposure (one seed each, the conditions of its night,
    ``options`` of :func:`simulate_exposure`; exposures with a single standard take
    ``snr_range_single`` when given) under ``tmp``; return the catalog rows, the manifest
    entries and the XP table rows of them all."""
    rows, manifest, spectra = [], [], []
    coarse = {}  # star source: its sharper fractions, for one warning per survey
    for p, exp_seed in zip(plan, seeds, strict=True):
        t0 = time.perf_counter()
        single = snr_range_single if p["n_standards"] == 1 and snr_range_single else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", COARSE_SOURCE, FluxCalWarning)
            entry, catalog = _survey_exposure(
                tmp, p, np.random.default_rng(exp_seed), stars, nights[p["night_index"]],
                {**options, "snr_range": single or options["snr_range"]})
        if entry["source_sharper"] > 0:
            source = options["standard_source"] if p["n_standards"] else None
            coarse.setdefault((source or stars).label, []).append(entry["source_sharper"])
        rows += catalog
        spectra += entry.pop("xp_rows", [])
        manifest.append(entry)
        say(f"[{len(manifest)}/{len(plan)}] {entry['path']}: {p['n_standards']} "
            f"standard(s), {p['wavelength_format']} {p['wavelength_unit']} {p['medium']}, "
            f"{time.perf_counter() - t0:.2f} s")
    for label, fractions in coarse.items():
        warnings.warn(f"{coarse_source_message(label, max(fractions))} (on {len(fractions)} of "
                      f"{len(plan)} exposures)", FluxCalWarning, stacklevel=3)
    return rows, manifest, spectra


def _write_catalogs(tmp, rng, rows, spectra):
    """Write the survey's catalog (after :func:`_ensure_catalog_variety`) and, unless
    ``spectra`` is None, its XP table."""
    _ensure_catalog_variety(rng, rows)
    ids = [r["objid"] for r in rows]
    if len(set(ids)) != len(ids):  # position-encoded ids collide only for coincident stars
        raise RuntimeError("duplicate catalog objids; try another seed")
    write_catalog(tmp / "catalog.csv", rows)
    if spectra is not None:
        write_xp(tmp / "xp.csv", spectra)


def _survey_info(seed, options, stars, n_rows, manifest):
    """The survey manifest (survey.json)."""
    source = options["standard_source"] or stars
    return {
        "title": "kspec-fluxcal simulated survey (SYNTHETIC data)",
        "generator": f"kspec_fluxcal.sim {__version__}",
        "seed": int(seed),
        "options": {
            **{k: options[k] for k in ("exposures", "nights", "fibers", "pixels")},
            "snr_range": [float(v) for v in options["snr_range"]], "grid": options["grid"],
            "setups": [dataclasses.asdict(s) for s in options["setups"]],
            "n_standards": [int(v) for v in options["n_standards"]],
            "standard_source": source.describe(),
            "lsf_scale": np.asarray(options["lsf_scale"], dtype=float).tolist(),
            "pixel_integration": bool(options["pixel_integration"]),
            "fiber_lsf_scatter": float(options["fiber_lsf_scatter"]),
            "xp": bool(options["xp"]),
            "no_standards": options["no_standards"],
            "snr_range_single": None if options["snr_range_single"] is None else
            [float(v) for v in options["snr_range_single"]],
            "photometric_nights": options["photometric_nights"],
            "chromatic_losses": bool(options["chromatic_losses"]),
            **{k: list(v) for k, v in options["ranges"].items()},
            # Only when asked for: manifests of the defaults stay as they were.
            **({"lsf_shape": str(options["lsf_shape"])}
               if options["lsf_shape"] != "gaussian" else {}),
            **({"arc_error": float(options["arc_error"])} if options["arc_error"] else {}),
            **({"second_order": float(options["second_order"])}
               if options["second_order"] else {}),
            **({"second_order_blaze": float(options["second_order_blaze"])}
               if options["second_order_blaze"] is not None else {}),
        },
        "grid": {"path": options["grid"], "resolution": stars.resolution,
                 "synthetic": bool(stars.synthetic), "files_read": stars.files_read},
        "catalog": "catalog.csv",
        **({"xp": "xp.csv"} if options["xp"] else {}),
        "n_catalog_rows": n_rows,
        "exposures": manifest,
    }


def _survey_exposure(tmp, p, rng, stars, conditions, options):
    """Simulate and write one planned exposure of a survey; its manifest entry and catalog
    rows."""
    sim = simulate_exposure(
        rng, stars, setup=p["setup"], n_standards=p["n_standards"],
        wavelength_format=p["wavelength_format"], wavelength_unit=p["wavelength_unit"],
        medium=p["medium"], position_only=p["position_only"], dead_fiber=p["dead_fiber"],
        exptime=p["exptime"], mjd=p["mjd"], night=p["night"], expid=p["expid"],
        conditions=conditions, **options)
    rel = Path("lake") / p["night"] / f"{p['expid']}.fits"
    with atomic_file(tmp / rel) as path:
        sim.hdulist.writeto(path, overwrite=True, output_verify="exception")
    truth_rel = Path("truth") / f"{p['expid']}.npz"
    _write_truth(tmp / truth_rel, sim.truth)
    t = sim.truth
    entry = {
        "path": rel.as_posix(), "truth": truth_rel.as_posix(), "night": p["night"],
        "expid": p["expid"], "setup": p["setup"].name, "setup_key": str(t["setup_key"]),
        "n_standards": p["n_standards"], "wavelength_format": p["wavelength_format"],
        "wavelength_unit": p["wavelength_unit"], "medium": p["medium"],
        "position_only": int(np.sum(p["position_only"])), "dead_fiber": p["dead_fiber"],
        "mjd": p["mjd"], "exptime": p["exptime"], "airmass": float(t["airmass"]),
        "pwv": float(t["pwv"]), "lsf_scale": float(t["lsf_scale"]),
        "source_sharper": float(t["source_sharper"]),
        "std_source": [str(v) for v in t["std_source"]],
        "photometric": bool(conditions.get("photometric", False)),
        "transparency": float(t["transparency"]),
        **({"seeing": float(t["seeing"])} if "seeing" in t else {}),
    }
    if options["xp"]:
        entry["xp_rows"] = xp_rows(t, sim.catalog)
    return entry, sim.catalog
