"""Command line: a thin layer over the library. Errors become one line on stderr."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from ._startup import setting_up
from ._stdout import stdout_may_close
from .errors import ConfigError, FluxCalError, FluxCalWarning, InputError

__all__ = ["main", "build_parser"]

PROG = "kspec-fluxcal"
_XP_HELP = ("Gaia XP spectra of the standards (GaiaXPy calibrate layout, CSV or ECSV; matched by "
            "the catalog's source_id, else by ra/dec): the models' broad shapes are fitted to "
            "them too")
CACHE_HELP = ("directory of cached template libraries ('off': none; default: .kspec-cache "
              "next to the grid store if writable, else $XDG_CACHE_HOME/kspec-fluxcal; "
              "KSPEC_FLUXCAL_CACHE overrides the default)")


def _note(text):
    print(f"  note: {text}", file=sys.stderr)


def _each_file(args, work):
    """Run ``work(path)`` for every input file; a failure is one line and the next file goes on.

    Returns the number of failures. The package's errors say what is wrong with the input; an
    OSError (permissions, a full disk) is the system's; anything else is a bug, reported as
    such (``--traceback`` shows where).
    """
    failed = 0
    for path in args.files:
        try:
            work(path)
        except Exception as err:
            failed += 1
            detail = (str(err) if isinstance(err, (FluxCalError, OSError)) else
                      _internal_error(err))
            # The line names the file once; errors about other files (catalog, grid) keep theirs.
            detail = detail.removeprefix(f"{path}: ")
            print(f"{path}: FAILED: {detail}", file=sys.stderr)
            if args.traceback:
                traceback.print_exc()
    return failed


def _internal_error(err):
    """The line that reports an unexpected exception (a bug) without its traceback."""
    return (f"internal error ({type(err).__name__}: {err}); please report it with the output "
            "of --traceback")


# ----------------------------------------------------------------------------- commands


def _cmd_info(args):
    from .exposure import configuration_key, open_exposure

    def info(path):
        ds = open_exposure(path)
        types = ds["fiber_type"].values
        counts = ", ".join(f"{t}:{int((types == t).sum())}" for t in sorted(set(types)))
        wave = ds["wavelength"].values
        good = ds["good"].values.mean(axis=1)
        print(f"{path}: EXPID {ds.attrs['expid']}, MJD {ds.attrs['mjd']:.5f}, "
              f"EXPTIME {ds.attrs['exptime']:g} s, {ds.sizes['fiber']} fibers ({counts}), "
              f"{ds.sizes['wavelength']} pixels {wave[0]:.1f}-{wave[-1]:.1f} A in air "
              f"({_frame_read(ds)}), LSF {ds.attrs['lsf_source']} "
              f"{ds.attrs['lsf_fwhm_coeffs']}, configuration "
              f"{configuration_key(wave, ds.sizes['fiber'])}, "
              f"dead fibers {int((good == 0).sum())}; {_calibration_state(ds)}")

    return 1 if _each_file(args, info) else 0


def _frame_read(ds):
    """The wavelength frame as the file gives it (the reader converts vacuum to air)."""
    medium = {"vac": "vacuum", "air": "air"}[ds.attrs["medium_in"]]
    converted = "; converted to air" if medium == "vacuum" else ""
    return f"as read: {medium}, {ds.attrs['wavelength_source']}{converted}"


def _calibration_state(ds):
    """What the primary header says about flux calibration: FLUXCAL, BUNIT, every FCAL*
    keyword (FCALNSTR, FCALRMS, a quality grade FCALQUAL when the fitter writes one)."""
    from astropy.io import fits

    from .exposure import calibration_marks

    header = fits.Header.fromstring(ds.attrs.get("fits_header", ""), sep="\n")
    bunit = f"BUNIT {str(header.get('BUNIT', 'counts')).strip()!r}"
    if not calibration_marks(ds):
        return f"{bunit}: not flux-calibrated"
    if "cal" not in ds:  # marked calibrated (FLUXCAL = T, a flux BUNIT) without its vector
        from .errors import ExposureError

        raise ExposureError(ds.attrs.get("source", ""), "HDU FLUXCAL", "missing, though the "
                            "primary header marks the file calibrated (an incomplete product?)")
    fluxcal = "T" if header.get("FLUXCAL") is True else "absent"
    keys = [f"{k} = {header[k]!r}" if isinstance(header[k], str) else f"{k} = {header[k]:.4g}"
            for k in header if k.startswith("FCAL")]
    return ", ".join([f"calibrated: FLUXCAL = {fluxcal}", bunit, *keys])


def _cmd_grid_build(args):
    with setting_up():  # the build has no Dask array: xarray need not import Dask (0.6 s)
        from ._atomic import check_output_directory
        from .grid.build import build_grid, scan_bosz

    out = args.out or (f"store/templates/bosz2024_"  # named by the grid's own resolution
                       f"{scan_bosz(args.bosz_dir, args.resolution)['resolution']}.zarr")
    check_output_directory(out, "--out", for_file=True)  # its partial store goes beside it
    build_grid(args.bosz_dir, out, wave_min=args.wave_min, wave_max=args.wave_max,
               resolution=args.resolution, workers=args.workers, progress=not args.quiet,
               overwrite=args.overwrite)
    return 0


def _cmd_grid_download(args):
    from ._atomic import check_output_directory
    from .download import download_grid

    check_output_directory(args.out, "--out")  # a dry run too: it says where files would go

    summary = download_grid(args.out, resolution=args.resolution, dry_run=args.dry_run,
                            force=args.force, workers=args.workers,
                            progress=not (args.quiet or args.dry_run))
    for url, dest in summary.to_fetch if args.dry_run else ():  # the dry run's answer
        print(f"would fetch {url} -> {dest}")
    print(summary)
    return 1 if summary.errors or summary.mostly_missing else 0


def _cmd_grid_synth(args):
    from ._atomic import check_output_directory
    from .sim.synthetic_grid import write_synthetic_grid

    check_output_directory(args.out, "--out")

    path = write_synthetic_grid(args.out, small=args.small, workers=args.workers,
                                overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote a SYNTHETIC BOSZ-layout grid (not real BOSZ spectra) to {path}")
    return 0


def _cmd_simulate(args):
    from ._atomic import check_output_directory
    from .sim.survey import simulate_survey

    check_output_directory(args.outdir)
    out = simulate_survey(args.outdir, exposures=args.exposures, nights=args.nights,
                          seed=args.seed, fibers=args.fibers, pixels=args.pixels,
                          grid=args.grid, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote a simulated survey to {out}")
    return 0


def _cmd_calibrate(args):
    with setting_up():
        from .catalog import read_catalog
        from .config import load_config
        from .grid import open_grid
        from .pipeline import calibrate_exposure, check_output
        from .xp import read_xp

        _check_distinct_outputs(args)
        if args.qc:
            from .qc import check_distinct_names  # matplotlib: only for --qc

            check_distinct_names(args.files, directory_of=(  # in place: QC beside each
                (lambda path: Path(path).resolve().parent) if args.in_place else None))
        check_output(args.out, "--out")
        config = load_config(args.config)
        catalog = read_catalog(args.catalog)
        grid = open_grid(args.grid, chunks=False)  # a cached library reads no template
        xp = read_xp(args.xp) if args.xp else None

    def calibrate(path):
        qc_dir = None
        if args.qc:
            from .qc import qc_directory  # matplotlib: only for --qc

            out = Path(args.out) if args.out else Path(path).parent
            qc_dir = qc_directory(out.parent if out.suffix.lower() in (".fits", ".fit")
                                  else out)
        result = calibrate_exposure(path, catalog, grid, None if args.in_place else args.out,
                                    config=config, overwrite=args.overwrite,
                                    in_place=args.in_place, cache_dir=args.cache, qc_dir=qc_dir,
                                    xp=xp)
        print(f"{result.summary()} -> {result.path}")
        for note in result.warnings:
            _note(note)

    failed = _each_file(args, lambda path: _with_dask_threads(calibrate, path))
    if len(args.files) > 1:
        print(f"{len(args.files) - failed} of {len(args.files)} exposure(s) calibrated")
    return 1 if failed else 0


def _check_distinct_outputs(args):
    """Refuse, before any work, inputs that would write the same output (the second would
    replace the first with --overwrite, or fail without it after the first was done)."""
    from .pipeline import output_name

    seen = {}
    for path in args.files:
        key = Path(path).resolve() if args.in_place else output_name(path)
        if key in seen:
            what = "the same file" if args.in_place else f"the same output {key}"
            raise FluxCalError(f"{seen[key]} and {path} would both write {what}; "
                               "give each input once, and inputs with distinct names")
        seen[key] = path
    if args.out and Path(args.out).suffix.lower() in (".fits", ".fit") and len(args.files) > 1:
        raise FluxCalError(f"--out {args.out} names one file but {len(args.files)} inputs were "
                           "given; give an output directory")


def _with_dask_threads(work, *args):
    """``work(*args)`` with Dask's threaded scheduler given as a function once Dask is imported:
    without one, or by name, every compute imports distributed (~0.5 s) to look for a client
    this command never has. Before, nothing can be a Dask array (a calibration opens its grid
    without Dask), and Dask (0.1-0.5 s) is not imported for it."""
    if "dask" not in sys.modules:
        return work(*args)
    import dask
    import dask.threaded

    with dask.config.set(scheduler=dask.threaded.get):
        return work(*args)


def _cmd_qc(args):
    from ._atomic import check_output_directory
    from .qc import check_distinct_names, qc_from_file

    check_output_directory(args.out, "--out")
    check_distinct_names(args.files, calibrated_only=True)

    def qc(path):
        written = qc_from_file(path, args.out)
        print(f"{path}: wrote {len(written)} QC file(s) to {args.out}")

    return 1 if _each_file(args, qc) else 0


def _cmd_survey(args):
    from ._atomic import check_output_directory
    from .survey import run_survey
    from .survey.cluster import check_performance_report

    check_output_directory(args.out, "--out")  # run_survey's own check cannot say "--out"
    if args.performance_report:  # written after the work: checked before it
        check_performance_report(args.performance_report, "--performance-report")
    report = run_survey(args.lake, catalog=args.catalog, grid=args.grid, out=args.out,
                        config=args.config, scheduler=args.scheduler, workers=args.workers,
                        threads_per_worker=args.threads_per_worker,
                        performance_report=args.performance_report, resume=args.resume,
                        pattern=args.pattern, progress=not args.quiet, xp=args.xp,
                        cache_dir=args.cache)
    if args.quiet:
        _say_failures(report)
    return 0 if report.ok else 1


def _say_failures(report):
    """The failed exposures on stderr, which --quiet keeps: one line each (the first
    ``report.LISTED``), then their count and where the notes are."""
    for line in report.failure_lines():
        print(line, file=sys.stderr)
    if report.failed:
        print(f"{PROG}: {len(report.failed)} exposure(s) failed; notes and failures: "
              f"{report.notes_file}", file=sys.stderr)


def _cmd_archive_plot(args):
    from ._atomic import check_output_directory
    from .survey import open_archive, open_model, plot_archive
    from .survey.model_store import MODEL_STORE, checked_model_setups, setup_group

    check_output_directory(args.out, "--out")  # before its subdirectories, one per setup
    store = Path(args.model) if args.model else Path(args.archive).parent / MODEL_STORE
    # An explicit --model that is none is refused, not ignored.
    modelled = (checked_model_setups(store) if args.model or (store / "zarr.json").exists()
                else [])
    archive = open_archive(args.archive)
    # Each setup in its own directory when there are several: their throughputs differ (one
    # curve through all of them zig-zags), and so do their models.
    setups = [args.setup] if args.setup else sorted(set(archive["setup"].values)) or [None]
    written = []
    for setup in setups:
        # --setup with a model store: that setup's model (or open_model's error if none)
        has_model = modelled and (args.setup or setup_group(setup) in modelled)
        model = open_model(store, setup) if has_model else None
        out = Path(args.out) / setup if len(setups) > 1 else args.out
        written += plot_archive(_exposures_of(archive, setup, args.archive), out, model=model)
    for path in written:
        print(f"wrote {path}")
    return 0


def _exposures_of(archive, setup, path):
    """The exposures of the archive (at ``path``) taken with ``setup`` (all when None);
    refused when there are none to plot."""
    present = sorted(set(archive["setup"].values))
    if setup is not None:
        archive = archive.isel(exposure=archive["setup"].values == setup)
    if not archive.sizes["exposure"]:
        of = f" of setup {setup} (its setups: {', '.join(present)})" if present else ""
        raise InputError(path, None, f"has no exposures{of}; nothing to plot")
    return archive


def _cmd_demo(args):
    from ._atomic import check_output_directory
    from .sim.demo import run_demo

    check_output_directory(args.out, "--out")  # not found out minutes into the demo

    return run_demo(args.out, exposures=args.exposures, nights=args.nights, workers=args.workers,
                    seed=args.seed)


# ----------------------------------------------------------------------------- parser


class _VersionAction(argparse.Action):
    """``--version``: the package version, looked up only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def _at_least(minimum, why=""):
    """An argparse type: an integer of at least ``minimum`` (``why``, the limit's reason, is
    said when a smaller one is given)."""
    def integer(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: need at least {minimum}{why}")
        return value

    return integer


#: Counts of processes, threads or exposures: 0 would silently mean another number or nothing.
_POSITIVE = _at_least(1)
#: Random seeds: numpy's SeedSequence takes non-negative integers only.
_SEED = _at_least(0)


def _bosz_resolution(text):
    """An argparse type: a BOSZ 2024 resolution tag (r500 ... rorig)."""
    from .constants import BOSZ_RESOLUTIONS

    if text not in BOSZ_RESOLUTIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a BOSZ 2024 resolution tag; valid: "
                                         f"{', '.join(BOSZ_RESOLUTIONS)}")
    return text


def _scheduler_address(text):
    """An argparse type: a scheduler's address, refused for its form before any work."""
    from .survey.cluster import check_scheduler_address

    try:
        check_scheduler_address(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(err.problem) from None
    return text


def build_parser():
    """The argument parser of the ``kspec-fluxcal`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Spectrophotometric flux calibration of K-SPEC fiber spectra with the "
                    "standard stars observed in each exposure.")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--traceback", action="store_true",
                        help="show the Python traceback of errors (for bug reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_demo_parser, _calibrate_parser, _qc_parser, _survey_parser, _simulate_parser,
                _grid_parsers, _archive_parsers, _info_parser):
        add(sub)
    return parser


def _command(sub, func, name, **kwargs):
    """Add the sub-command ``name`` to the sub-parsers ``sub``, run by ``func(args)``; return
    its parser (``kwargs`` as for ``add_parser``: help...)."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(func=func)
    return parser


def _demo_parser(sub):
    """Add the sub-command ``kspec-fluxcal demo`` and its arguments to the sub-parsers
    ``sub``."""
    p = _command(sub, _cmd_demo, "demo",
                 help="the embedded default: synthetic grid, simulated survey, "
                      "survey calibration on a LocalCluster, QC and accuracy summary")
    p.add_argument("--out", default="store/demo", help="working directory (default %(default)s)")
    p.add_argument("--exposures", type=_POSITIVE, default=20,
                   help="exposures in the simulated survey (default %(default)s)")
    p.add_argument("--nights", type=_POSITIVE, default=4,
                   help="nights they are spread over (default %(default)s)")
    p.add_argument("--workers", type=_POSITIVE, default=None, help="LocalCluster workers "
                   "(default: one per core)")
    p.add_argument("--seed", type=_SEED, default=1,
                   help="random seed of the simulated survey (default %(default)s)")


def _calibrate_parser(sub):
    """Add the sub-command ``kspec-fluxcal calibrate`` and its arguments to the sub-parsers
    ``sub``."""
    p = _command(sub, _cmd_calibrate, "calibrate", help="flux-calibrate RED files")
    p.add_argument("files", nargs="+", metavar="RED.fits", help="reduced exposures (kspecdr)")
    p.add_argument("--catalog", required=True, help="standard-star catalog (Refcat2 CSV)")
    p.add_argument("--grid", required=True, help="template grid Zarr store")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="OUTDIR", help="output directory (<name>_fluxcal.fits "
                       "in it), or one .fits file for one input")
    where.add_argument("--in-place", action="store_true",
                       help="replace each input file atomically (through a symbolic link: the "
                       "file it points at)")
    p.add_argument("--config", help="TOML configuration (default: the package defaults)")
    p.add_argument("--qc", action="store_true",
                   help="also write QC plots and a summary under OUTDIR/qc/ (with --in-place: "
                   "next to each input)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--cache", help=CACHE_HELP)
    p.add_argument("--xp", metavar="FILE", help=_XP_HELP)


def _qc_parser(sub):
    """Add the sub-command ``kspec-fluxcal qc`` and its arguments to the sub-parsers
    ``sub``."""
    p = _command(sub, _cmd_qc, "qc", help="QC plots and summary of calibrated files")
    p.add_argument("files", nargs="+", metavar="CALIBRATED.fits",
                   help="calibrated files (kspec-fluxcal calibrate or survey)")
    p.add_argument("--out", required=True, help="output directory")


def _survey_parser(sub):
    """Add the sub-command ``kspec-fluxcal survey`` and its arguments to the sub-parsers
    ``sub``."""
    p = _command(sub, _cmd_survey, "survey", help="re-calibrate a whole survey on a Dask cluster")
    p.add_argument("lake", metavar="LAKE_DIR", help="directory searched for RED files")
    p.add_argument("--catalog", required=True, help="standard-star catalog (Refcat2 CSV)")
    p.add_argument("--grid", required=True, help="template grid Zarr store")
    p.add_argument("--out", required=True,
                   help="output directory: calibrated files mirroring the lake's tree, "
                   "archive.zarr, notes.json; one job at a time (survey.lock)")
    p.add_argument("--config", help="TOML configuration (default: the package defaults)")
    p.add_argument("--xp", metavar="FILE", help=_XP_HELP)
    p.add_argument("--scheduler", type=_scheduler_address,
                   help="address of an existing scheduler (tcp://HOST:PORT)")
    p.add_argument("--workers", type=_POSITIVE,
                   help="LocalCluster workers (default: one per core)")
    p.add_argument("--threads-per-worker", type=_POSITIVE, default=1,
                   help="threads of each LocalCluster worker (default %(default)s)")
    p.add_argument("--performance-report", metavar="HTML",
                   help="save Dask's performance report there")
    p.add_argument("--resume", action="store_true",
                   help="skip exposures already archived with the same inputs")
    p.add_argument("--pattern", help="glob of RED files under LAKE_DIR (default from config)")
    p.add_argument("--cache", help=CACHE_HELP)
    p.add_argument("--quiet", action="store_true",
                   help="no plan, progress or summary on stdout (errors still on stderr)")


def _simulate_parser(sub):
    """Add the sub-command ``kspec-fluxcal simulate`` and its arguments to the sub-parsers
    ``sub``."""
    p = _command(sub, _cmd_simulate, "simulate", help="write a simulated survey with known truth")
    p.add_argument("outdir", help="directory to write (lake/, catalog.csv, truth, survey.json)")
    # A usage error rather than the library's ValueError: the limits of simulate_survey and
    # its Setup.
    p.add_argument("--exposures", type=_POSITIVE, default=20,
                   help="exposures (default %(default)s)")
    p.add_argument("--nights", type=_POSITIVE, default=4,
                   help="nights they are spread over (default %(default)s)")
    p.add_argument("--seed", type=_SEED, default=0, help="random seed (default %(default)s)")
    p.add_argument("--fibers", type=_at_least(6, " (up to 3 standards, sky fibers and a "
                                              "science target)"), default=14,
                   help="fibers per exposure (default %(default)s)")
    p.add_argument("--pixels", type=_at_least(64), default=4096,
                   help="pixels per spectrum (default %(default)s)")
    p.add_argument("--grid", help="BOSZ-layout directory to draw stars from (default: a "
                   "synthetic grid written under OUTDIR)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTDIR that is a simulated survey (has "
                   "survey.json); other directories are never replaced")
    p.add_argument("--quiet", action="store_true", help="no progress messages (on stderr)")


def _grid_parsers(sub):
    """Add the sub-command ``kspec-fluxcal grid`` and its actions (build, download, synth)
    to the sub-parsers ``sub``."""
    grid = sub.add_parser("grid", help="template grid: download, synthesise, build")
    gsub = grid.add_subparsers(dest="grid_command", metavar="ACTION")
    gsub.required = True
    p = _command(gsub, _cmd_grid_build, "build",
                 help="convert a BOSZ-layout directory into the Zarr cube")
    p.add_argument("bosz_dir", help="BOSZ 2024 layout directory (grid download or synth)")
    p.add_argument("--out", help="Zarr store to write (default store/templates/"
                   "bosz2024_<resolution>.zarr, e.g. bosz2024_r10000.zarr)")
    p.add_argument("--wave-min", type=float, default=3000.0,
                   help="shortest wavelength kept, Angstrom (default %(default)s)")
    p.add_argument("--wave-max", type=float, default=11000.0,
                   help="longest wavelength kept, Angstrom (default %(default)s)")
    p.add_argument("--resolution", help="resolution tag, when the directory holds several")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a store built from other inputs or options")
    _pool_options(p, 1, "processes reading files")

    p = _command(gsub, _cmd_grid_download, "download",
                 help="download the BOSZ 2024 subgrid from MAST")
    p.add_argument("--out", required=True, help="directory to download into (BOSZ layout)")
    p.add_argument("--resolution", type=_bosz_resolution, default="r10000",
                   help="resolution tag to download (default %(default)s)")
    for flag, text in (("--dry-run", "list what would be downloaded (on stdout), download nothing"),
                       ("--force", "download again files that are already present")):
        p.add_argument(flag, action="store_true", help=text)
    _pool_options(p, 8, "parallel downloads")

    p = _command(gsub, _cmd_grid_synth, "synth",
                 help="write a SYNTHETIC BOSZ-layout grid (tests, demo)")
    p.add_argument("--out", required=True, help="directory to write (BOSZ layout)")
    p.add_argument("--small", action="store_true", help="a tiny grid for tests")
    p.add_argument("--overwrite", action="store_true", help="replace an existing grid")
    _pool_options(p, 1, "processes writing files")


def _pool_options(p, workers, what):
    """``--workers`` (``what``, default ``workers``) and ``--quiet``, as the grid commands
    take them."""
    p.add_argument("--workers", type=_POSITIVE, default=workers,
                   help=f"{what} (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress messages (on stderr)")


def _archive_parsers(sub):
    """Add the sub-command ``kspec-fluxcal archive`` and its action (plot) to the
    sub-parsers ``sub``."""
    archive = sub.add_parser("archive", help="the calibration archive")
    asub = archive.add_subparsers(dest="archive_command", metavar="ACTION")
    asub.required = True
    p = _command(asub, _cmd_archive_plot, "plot",
                 help="throughput vs time and a wavelength x time image; with "
                      "the survey model, extinction per night and outlier exposures")
    p.add_argument("archive", help="archive.zarr written by the survey job")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--model", help="survey model store (default: model.zarr beside the "
                   "archive, when present)")
    p.add_argument("--setup", help="the instrument configuration to plot (e.g. "
                   "n4096-f14-3500-8500): its exposures and its survey model (default: "
                   "every setup; with several, each in a subdirectory of --out)")


def _info_parser(sub):
    """Add the sub-command ``kspec-fluxcal info`` and its arguments to the sub-parsers
    ``sub``."""
    p = _command(sub, _cmd_info, "info",
                 help="summarise RED files and calibrated products (checks them "
                      "against the contract)")
    p.add_argument("files", nargs="+", metavar="RED.fits", help="RED files or calibrated files")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the same way out as Ctrl-C, so that pools and
    clusters the command started are closed (the default action would kill this process
    alone and leave them to notice)."""


def _terminate(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into :class:`_Terminated` while the command runs (main thread only; the
    previous handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: BLAS thread pools limited to one thread (unless set): the package's matrix products are
#: small, and a second thread only spins (the same wall time for +60 % CPU, measured with
#: OpenBLAS on 2 cores); Dask's workers are given the same by distributed.
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def main(argv=None):
    """Run the command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.
    """
    for name in _ONE_THREAD:  # before numpy is imported (the commands import it)
        os.environ.setdefault(name, "1")
    with stdout_may_close():
        return _run(build_parser().parse_args(argv))


def _run(args):
    """Run the command ``args`` asks for; its errors become one line on stderr."""
    try:
        with _terminate_as_interrupt(), warnings.catch_warnings():
            warnings.simplefilter("default", FluxCalWarning)
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except (FluxCalError, OSError) as err:
        if args.traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug, not the input: one line, as for one file of a batch
        if args.traceback:
            traceback.print_exc()
        print(f"{PROG}: {_internal_error(err)}", file=sys.stderr)
        return 1
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, FluxCalWarning):
        _note(str(message))
    else:
        print(f"{PROG}: warning: {category.__name__}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
