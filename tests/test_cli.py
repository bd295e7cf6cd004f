"""The command line, through its entry point ``kspec_fluxcal.cli.main``: the help, each
command's success path, and failures as one line on stderr with a non-zero exit (issue 8).

The module's grid is made by the CLI itself (``grid synth --small``, then ``grid build``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from astropy.io import fits
from conftest import ENTRY_POINT, time_limit
from test_archive import _calibrated, _stars
from test_bad_input import build_base, write_catalog

from kspec_fluxcal import __version__
from kspec_fluxcal.cli import build_parser, main
from kspec_fluxcal.errors import ConfigError, FluxCalError
from kspec_fluxcal.grid import open_grid
from kspec_fluxcal.sim import simulate_survey
from kspec_fluxcal.survey.archive import ArchiveWriter, archive_record
from kspec_fluxcal.survey.cluster import local_cluster, on_cluster

SUBCOMMANDS = ("demo", "calibrate", "qc", "survey", "simulate", "grid", "archive", "info")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Grid synthesised and built through the CLI; the exposures of test_bad_input."""
    root = tmp_path_factory.mktemp("cli")
    outputs = {}
    for name, argv in {
        "synth": ["grid", "synth", "--small", "--out", str(root / "bosz"), "--workers", "2",
                  "--quiet"],
        "build": ["grid", "build", str(root / "bosz"), "--out", str(root / "grid.zarr"),
                  "--quiet"],
    }.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
        outputs[name] = (status, out.getvalue(), err.getvalue())
    base = build_base(root, bosz=root / "bosz", store=root / "grid.zarr")
    return base, outputs


@pytest.fixture
def files(made, tmp_path):
    """A factory of input files in ``tmp_path``: RED files (valid unless ``raw``) and the
    catalog; returns paths as strings, as a shell would pass them."""
    base, _ = made

    def make(*names, raw=None):
        paths = []
        for name in names:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base.red[2] if raw is None else raw)
            paths.append(str(path))
        return paths

    make.catalog = str(write_catalog(tmp_path / "catalog.csv", base.rows[2]))
    make.grid = str(base.store)
    return make


def cli(capsys, *argv):
    """Run the command; returns (exit status, stdout lines, stderr lines)."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out.splitlines(), captured.err.splitlines()


def problems(lines):
    """stderr lines other than notes (the package's warnings about skipped stars etc.)."""
    return [line for line in lines if not line.startswith("  note:")]


# ----------------------------------------------------------------------------- help


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name} " in text or f"    {name}\n" in text, name
    with pytest.raises(SystemExit):
        main(["grid", "--help"])
    text = capsys.readouterr().out
    assert all(f"    {name}" in text for name in ("build", "download", "synth"))


def _subparsers(parser, prefix=()):
    """(command words, parser) of every command and subcommand."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))


def test_every_option_has_a_help_text():
    """Issue 16: survey --catalog/--grid/--out/..., demo --exposures/..., the grid
    subcommands and archive plot --out had none."""
    missing = [" ".join([*words, action.dest]) for words, parser in _subparsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


def test_calibrate_usage_shows_out_or_in_place_as_required(capsys):
    """Issue 16: --out was shown as optional, but it (or --in-place) is required."""
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())
    assert "(--out OUTDIR | --in-place)" in usage
    assert "[--out" not in usage and "[--in-place]" not in usage


def test_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kspec-fluxcal {__version__}"
    with pytest.raises(SystemExit) as info:
        main(["calibrate", "x.fits"])  # no --catalog / --grid
    assert info.value.code == 2
    assert "the following arguments are required: --catalog, --grid" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["simulate", "out", "--seed", "-1"], "argument --seed: -1: need at least 0"),
    (["demo", "--seed", "-2"], "argument --seed: -2: need at least 0"),
    (["grid", "download", "--out", "x", "--resolution", "10000", "--dry-run"],
     "argument --resolution: '10000' is not a BOSZ 2024 resolution tag; valid: r500, "),
])
def test_arguments_the_library_refuses_are_usage_errors(capsys, argv, message):
    """A negative seed and an unknown resolution tag ended in a ValueError traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_unexpected_error_of_a_command_is_one_line(capsys, tmp_path, monkeypatch):
    """Outside calibrate's per-file loop an unexpected exception printed its traceback,
    though only --traceback should."""
    import kspec_fluxcal.sim.survey as sim_survey

    def broken(*args, **kwargs):
        raise NotImplementedError("boom")

    monkeypatch.setattr(sim_survey, "simulate_survey", broken)
    status, out, err = cli(capsys, "simulate", tmp_path / "sim", "--quiet")
    assert (status, out) == (1, [])
    assert err == ["kspec-fluxcal: internal error (NotImplementedError: boom); please report "
                   "it with the output of --traceback"]
    assert main(["--traceback", "simulate", str(tmp_path / "sim"), "--quiet"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize("lake, pattern, message", [
    (".", "/data/*.fits", "pattern '/data/*.fits': must be a glob relative to the lake "
                          "directory, without '..' (e.g. '**/*.fits')"),
    (".", "../*.fits", "pattern '../*.fits': must be a glob relative to the lake directory, "
                       "without '..' (e.g. '**/*.fits')"),
    ("catalog.csv", None, "not a directory (the lake is a directory of RED files)"),
])
def test_survey_lake_and_pattern_refused(capsys, files, tmp_path, lake, pattern, message):
    """An absolute --pattern ended in pathlib's NotImplementedError traceback, '..' found
    nothing, and a file given as the lake was 'no such lake directory'."""
    lake = tmp_path / lake
    argv = ["survey", lake, "--catalog", files.catalog, "--grid", files.grid, "--out",
            tmp_path / "out", "--workers", "1", *(["--pattern", pattern] if pattern else [])]
    status, out, err = cli(capsys, *argv)
    assert status == 1
    assert problems(err) == [f"kspec-fluxcal: error: {lake}: {message}"]


# ----------------------------------------------------------------------------- grid


def test_grid_synth_and_build(made):
    _, outputs = made
    status, out, err = outputs["synth"]
    assert status == 0 and "Traceback" not in err
    assert out.startswith("wrote a SYNTHETIC BOSZ-layout grid (not real BOSZ spectra) to ")
    status, out, err = outputs["build"]
    assert status == 0 and out == "" and "Traceback" not in err  # --quiet
    assert open_grid(made[0].store).attrs["synthetic"] == 1


def test_grid_build_names_its_default_store_by_the_resolution(capsys, made, tmp_path,
                                                               monkeypatch):
    """Without --out a grid of any resolution went to store/templates/bosz2024_r10000.zarr."""
    bosz = made[0].bosz
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "grid", "build", bosz, "--quiet")[0] == 0
    resolution = next(bosz.glob("bosz2024_wave_*.txt")).stem.split("_")[-1]
    assert [p.name for p in (tmp_path / "store" / "templates").iterdir()] == [
        f"bosz2024_{resolution}.zarr"]


def test_grid_build_bad_directory(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    status, out, err = cli(capsys, "grid", "build", tmp_path / "empty", "--out",
                           tmp_path / "g.zarr", "--quiet")
    assert status == 1 and out == []
    assert err == [f"kspec-fluxcal: error: {tmp_path / 'empty'}: no wavelength file "
                   "bosz2024_wave_r<R>.txt at the top of the directory, e.g. "
                   "bosz2024_wave_r10000.txt"]
    assert not (tmp_path / "g.zarr").exists()


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_grid_build_overwrite_replaces_only_a_grid_store(capsys, made, tmp_path, kind):
    """--overwrite deleted a directory of the user's given as --out (and hid a file as
    .kspec-tmp-NAME.old): it replaces a grid store, nothing else."""
    out = tmp_path / "mine"
    if kind == "directory":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    status, _, err = cli(capsys, "grid", "build", made[0].bosz, "--out", out, "--overwrite",
                         "--quiet")
    assert status == 1
    assert problems(err) == [f"kspec-fluxcal: error: {out}: exists and is not a template grid "
                             "store (a file, or a directory without the build plan of "
                             "'kspec-fluxcal grid build'): not replaced, also not with "
                             "--overwrite; choose another output or remove it yourself"]
    kept = out / "notes.txt" if kind == "directory" else out
    assert kept.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_grid_build_overwrite_rebuilds_a_grid_store(capsys, made, tmp_path):
    out = tmp_path / "g.zarr"
    shutil.copytree(made[0].store, out)
    status, _, err = cli(capsys, "grid", "build", made[0].bosz, "--out", out, "--overwrite",
                         "--quiet", "--wave-max", "9000")
    assert (status, problems(err)) == (0, [])
    assert open_grid(out).attrs["wave_max"] <= 9000


# ----------------------------------------------------------------------------- calibrate


def test_calibrate_one_file(capsys, files, tmp_path):
    (red,) = files("red.fits")
    before = (Path(red).read_bytes(), os.stat(red).st_mtime_ns)
    status, out, err = cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid",
                           files.grid, "--out", tmp_path / "out")
    assert status == 0 and problems(err) == []
    target = tmp_path / "out" / "red_fluxcal.fits"
    rms = out[0].split("rms between standards ")[1].split(",")[0]
    assert out == [f"KS20261101_0001: 2 standard(s) used, 0 rejected, rms between standards "
                   f"{rms}, quality {fits.getheader(target)['FCALQUAL']} -> {target}"]
    assert fits.getheader(target)["FCALQUAL"] in "AB"  # two good standards
    assert fits.getheader(target)["FLUXCAL"] is True
    assert (Path(red).read_bytes(), os.stat(red).st_mtime_ns) == before  # input untouched


def test_calibrate_batch_goes_on_after_a_bad_file(capsys, files, made, tmp_path):
    """`calibrate a.fits bad.fits c.fits`: a and c are calibrated, bad is one line, exit 1."""
    a, c = files("a.fits", "c.fits")
    (bad,) = files("bad.fits", raw=made[0].red[2][:50_000])
    status, out, err = cli(capsys, "calibrate", a, bad, c, "--catalog", files.catalog,
                           "--grid", files.grid, "--out", tmp_path / "out")
    assert status == 1
    assert len(problems(err)) == 1
    assert re.fullmatch(rf"{re.escape(bad)}: FAILED: truncated: 50000 bytes, but its HDUs need "
                        r"\d+ \(an interrupted copy or write\?\)", problems(err)[0])
    assert out[-1] == "2 of 3 exposure(s) calibrated"
    assert [line.rsplit(" -> ", 1)[1] for line in out[:-1]] == [
        str(tmp_path / "out" / "a_fluxcal.fits"), str(tmp_path / "out" / "c_fluxcal.fits")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_fluxcal.fits",
                                                                     "c_fluxcal.fits"]


def test_calibrate_refuses_to_overwrite(capsys, files, tmp_path):
    (red,) = files("red.fits")
    argv = ["calibrate", red, "--catalog", files.catalog, "--grid", files.grid, "--out",
            tmp_path / "out"]
    assert cli(capsys, *argv)[0] == 0
    target = tmp_path / "out" / "red_fluxcal.fits"
    first = (target.read_bytes(), os.stat(target).st_ino)
    status, out, err = cli(capsys, *argv)
    assert status == 1 and out == []
    assert problems(err) == [f"{red}: FAILED: {target}: exists; pass overwrite=True (CLI: "
                             "--overwrite) to replace it"]
    assert (target.read_bytes(), os.stat(target).st_ino) == first
    assert cli(capsys, *argv, "--overwrite")[0] == 0
    assert os.stat(target).st_ino != first[1]  # replaced by a rename, not rewritten in place


def test_calibrate_in_place(capsys, files, tmp_path):
    (red,) = files("night/red.fits")
    inode = os.stat(red).st_ino
    status, out, err = cli(capsys, "calibrate", red, "--in-place", "--catalog", files.catalog,
                           "--grid", files.grid)
    assert status == 0 and out[0].endswith(f" -> {red}")
    assert fits.getheader(red)["FLUXCAL"] is True
    assert os.stat(red).st_ino != inode  # atomic: a new file renamed over the old one
    assert os.listdir(Path(red).parent) == ["red.fits"]  # no temporary left behind


@pytest.fixture
def no_fit(monkeypatch):
    """Fail the test if a fit starts: checks must come before the work."""
    import kspec_fluxcal.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the fit ran before the outputs were checked")

    monkeypatch.setattr(pipeline, "calibrate", refuse)


@pytest.mark.parametrize("make_out, problem", [
    (lambda t: t / "notes.txt", "is a file, not a directory"),
    (lambda t: t / "notes.txt" / "sub", "cannot be created: {t}/notes.txt is a file, not a "
                                        "directory"),
    (lambda t: t / "notes.txt" / "x.fits", "cannot be created: {t}/notes.txt is a file, not a "
                                           "directory"),
], ids=["file", "under-a-file", "fits-under-a-file"])
def test_calibrate_output_checked_before_the_work(capsys, files, tmp_path, no_fit, make_out,
                                                  problem):
    """Issue 16: a file-valued --out failed only after the whole fit, naming the input file."""
    (red,) = files("red.fits")
    (tmp_path / "notes.txt").write_text("mine")
    out = make_out(tmp_path)
    status, stdout, err = cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid",
                              files.grid, "--out", out)
    assert (status, stdout) == (1, [])
    assert err == [f"kspec-fluxcal: error: --out {out}: {problem.format(t=tmp_path)}"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_survey_output_checked_before_the_work(capsys, files, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    status, stdout, err = cli(capsys, "survey", tmp_path, "--catalog", files.catalog, "--grid",
                              files.grid, "--out", tmp_path / "notes.txt")
    assert (status, stdout) == (1, [])
    assert err == [f"kspec-fluxcal: error: --out {tmp_path / 'notes.txt'}: is a file, not a "
                   "directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_calibrate_unwritable_output_checked_before_the_work(capsys, files, tmp_path, no_fit):
    (red,) = files("red.fits")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    status, stdout, err = cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid",
                              files.grid, "--out", locked / "out")
    assert err == [f"kspec-fluxcal: error: --out {locked / 'out'}: cannot be created: "
                   f"{locked} is not writable"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command, out", [
    ("calibrate", "/proc/kspec-x"), ("calibrate", "/proc/kspec-x/red.fits"),
    ("survey", "/proc/kspec-x"), ("grid build", "/proc/kspec-x.zarr"),
    ("qc", "/proc/kspec-x")])
def test_output_on_a_filesystem_without_new_entries_refused_up_front(capsys, files, made,
                                                                     no_fit, command, out):
    """An --out under /proc passed the access() check (root may write anywhere; so may anyone
    on /proc) and failed after the fit as 'FAILED: [Errno 2] No such file or directory', or
    (survey, grid build) as that bare OS error: creating an entry is now tried first."""
    (red,) = files("red.fits")
    inputs = {"calibrate": [red, "--catalog", files.catalog, "--grid", files.grid],
              "survey": [str(Path(red).parent), "--catalog", files.catalog, "--grid",
                         files.grid],
              "grid build": [str(made[0].bosz)], "qc": [red]}[command]
    status, stdout, err = cli(capsys, *command.split(), *inputs, "--out", out)
    assert (status, stdout) == (1, [])
    assert err == [f"kspec-fluxcal: error: --out {out}: cannot be created: /proc takes no "
                   "new entries (No such file or directory)"]


def test_existing_output_refused_before_the_work(capsys, files, tmp_path, no_fit):
    (red,) = files("red.fits")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "red_fluxcal.fits").write_text("an earlier product")
    status, stdout, err = cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid",
                              files.grid, "--out", tmp_path / "out")
    assert (status, stdout) == (1, [])
    assert problems(err) == [f"{red}: FAILED: {tmp_path / 'out' / 'red_fluxcal.fits'}: exists; "
                             "pass overwrite=True (CLI: --overwrite) to replace it"]


def test_calibrate_in_place_through_a_symlink_replaces_the_target(capsys, files, tmp_path):
    """Issue 16: --in-place on a symlink replaced the link with a file (the lake's file was
    left uncalibrated). The link's target is replaced, atomically; the link stays."""
    (red,) = files("lake/red.fits")
    link = tmp_path / "links" / "red.fits"
    link.parent.mkdir()
    link.symlink_to(red)
    inode = os.stat(red).st_ino
    status, out, err = cli(capsys, "calibrate", link, "--in-place", "--catalog", files.catalog,
                           "--grid", files.grid)
    assert status == 0 and problems(err) == []
    assert link.is_symlink() and link.resolve() == Path(red)
    assert fits.getheader(red)["FLUXCAL"] is True and os.stat(red).st_ino != inode
    assert out[0].endswith(f" -> {red}")
    assert os.listdir(link.parent) == ["red.fits"] and os.listdir(Path(red).parent) == [
        "red.fits"]


@pytest.mark.parametrize("options, message", [
    (["--in-place", "--out", "x"], "argument --out: not allowed with argument --in-place"),
    ([], "one of the arguments --out --in-place is required"),
])
def test_calibrate_output_options(capsys, files, options, message):
    (red,) = files("red.fits")
    with pytest.raises(SystemExit) as info:
        main(["calibrate", red, *options, "--catalog", files.catalog, "--grid", files.grid])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"kspec-fluxcal calibrate: error: {message}"


def test_calibrate_two_inputs_one_output_name(capsys, files, tmp_path):
    """a/red.fits and b/red.fits would both be out/red_fluxcal.fits: refused before any work
    (with --overwrite the second would silently replace the first)."""
    a, b = files("a/red.fits", "b/red.fits")
    status, out, err = cli(capsys, "calibrate", a, b, "--catalog", files.catalog, "--grid",
                           files.grid, "--out", tmp_path / "out", "--overwrite")
    assert (status, out) == (1, [])
    assert err == [f"kspec-fluxcal: error: {a} and {b} would both write the same output "
                   "red_fluxcal.fits; give each input once, and inputs with distinct names"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("names, options, message", [
    (["red.fits", "red.fits"], ["--in-place"], "{0} and {1} would both write the same file"),
    (["a.fits", "c.fits"], ["--out", "x_fluxcal.fits"],
     "--out x_fluxcal.fits names one file but 2 inputs were given; give an output directory"),
], ids=["in-place-twice", "many-inputs-one-output-file"])
def test_calibrate_outputs_must_be_distinct(capsys, files, names, options, message):
    paths = files(*dict.fromkeys(names))
    paths = paths * (len(names) // len(paths))
    status, out, err = cli(capsys, "calibrate", *paths, *options, "--catalog", files.catalog,
                           "--grid", files.grid)
    assert (status, out, len(err)) == (1, [], 1)
    assert err[0].startswith("kspec-fluxcal: error: " + message.format(*paths))
    assert fits.getheader(paths[0]).get("FLUXCAL") is None  # the input was not calibrated


@pytest.mark.parametrize("make_catalog, make_grid, message", [
    (lambda t: t / "none.csv", None, r"{catalog}: no such file"),
    (None, lambda base, t: base.bosz, r"{grid}: is a BOSZ-layout directory, not a template "
                                      r"grid store; convert it once with"),
    (None, lambda base, t: t / "none.zarr", r"{grid}: no such template grid store"),
], ids=["catalog-missing", "grid-is-bosz-directory", "grid-missing"])
def test_calibrate_bad_shared_inputs(capsys, files, made, tmp_path, make_catalog, make_grid,
                                     message):
    (red,) = files("red.fits")
    catalog = make_catalog(tmp_path) if make_catalog else files.catalog
    grid = make_grid(made[0], tmp_path) if make_grid else files.grid
    status, out, err = cli(capsys, "calibrate", red, "--catalog", catalog, "--grid", grid,
                           "--out", tmp_path / "out")
    assert (status, out, len(err)) == (1, [], 1)
    assert err[0].startswith("kspec-fluxcal: error: " + message.format(catalog=catalog,
                                                                        grid=grid))
    assert not (tmp_path / "out").exists()


CONFIG_CASES = [
    ("unknown-section", "[fitt]\nmetric = 'chi2'\n",
     r"section [fitt]: unknown section; valid sections: instrument, photometry, masks, "),
    ("unknown-option", "[fit]\nmetrik = 'chi2'\n",
     r"[fit] metrik: unknown option; valid options: metric, "),
    ("bad-choice", "[fit]\nmetric = 'l1'\n", r"[fit] metric: 'l1' is not one of 'chi2', 'huber'"),
    ("bad-choice-2", "[combine]\nmethod = 'mean'\n",
     r"[combine] method: 'mean' is not one of 'weighted_mean', 'median'"),
    ("above-maximum", "[fit]\nrv_max = 5000\n",
     r"[fit] rv_max: 5000.0 is above the maximum 3000.0"),
    ("below-minimum", "[continuum]\ndegree = 0\n", r"[continuum] degree: 0 is below the minimum 1"),
    ("nan", "[fit]\nmin_snr = nan\n", r"[fit] min_snr: nan is not a finite number"),
    ("wrong-type", "[fit]\nrefine = 'yes'\n", r"[fit] refine: expected bool, got 'yes'"),
    ("too-few-bands", "[photometry]\nbands = ['gaiadr2-G']\n",
     r"[photometry] bands: 1 band(s) given but min_bands = 2: every star would be rejected"),
    ("unknown-mask", "[masks]\ntelluric = 'telluric_strong'\n",
     r"[masks] telluric: 'telluric_strong': no such mask file (packaged masks: "
     r"telluric_default, stellar_lines)"),
    ("section-not-a-table", "fit = 3\n", r"[fit]: must be a table of options"),
    ("absolute-pattern", "[survey]\npattern = '/data/*.fits'\n",
     r"[survey] pattern: '/data/*.fits': must be a glob relative to the lake directory, "
     r"without '..'"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_calibrate_bad_config(capsys, files, tmp_path, text, message):
    """Unknown keys and out-of-range values are refused before any work, naming the valid
    choices, the bounds or what is wrong."""
    (red,) = files("red.fits")
    config = tmp_path / "bad.toml"
    config.write_text(text)
    status, out, err = cli(capsys, "calibrate", red, "--config", config, "--catalog",
                           files.catalog, "--grid", files.grid, "--out", tmp_path / "out")
    assert (status, out, len(err)) == (1, [], 1)
    assert err[0].startswith(f"kspec-fluxcal: error: {config}: {message}")
    assert not (tmp_path / "out").exists()


def test_unexpected_error_is_one_line_and_the_batch_goes_on(capsys, files, tmp_path,
                                                            monkeypatch):
    """A bug (not a bad input) in one exposure: one line asking for a report, the other
    exposures calibrated; --traceback shows where it happened."""
    import kspec_fluxcal.pipeline as pipeline

    real = pipeline.calibrate_exposure

    def flaky(path, *args, **kwargs):
        if Path(path).name == "b.fits":
            raise KeyError("boom")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "calibrate_exposure", flaky)
    a, b = files("a.fits", "b.fits")
    argv = ["calibrate", a, b, "--catalog", files.catalog, "--grid", files.grid, "--out",
            tmp_path / "out"]
    status, out, err = cli(capsys, *argv)
    assert status == 1 and out[-1] == "1 of 2 exposure(s) calibrated"
    assert problems(err) == [f"{b}: FAILED: internal error (KeyError: 'boom'); please report it "
                             "with the output of --traceback"]
    assert main(["--traceback", *map(str, argv), "--overwrite"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- info, qc


def test_info(capsys, files):
    good, other = files("a.fits", "c.fits")
    (bad,) = files("bad.fits", raw=b"SIMPLE  =                    T" + b" " * 50)
    status, out, err = cli(capsys, "info", good, bad, other)
    assert status == 1 and len(out) == 2
    assert out[0].startswith(f"{good}: EXPID KS20261101_0001, MJD 61345.45830, ")
    assert "8 fibers (C:2, P:4, S:2), 1000 pixels 4000.0-8000.0 A in air (as read: air, " \
           "WAVELA)" in out[0]
    assert out[0].endswith("; BUNIT 'counts': not flux-calibrated")
    assert err == [f"{bad}: FAILED: not a readable FITS file (Empty or corrupt FITS "
                   "file)"]


def test_info_shows_the_frame_read_and_what_a_product_is(capsys, files, tmp_path):
    """Issue 16: `info` said '(air)' for a file whose WAVELA says vacuum, and printed the same
    line for a RED file and its calibrated product."""
    red, vac = files("red.fits", "vac.fits")
    with fits.open(vac, mode="update") as hdul:
        hdul["WAVELA"].header["AIRORVAC"] = "vac"
    assert cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid", files.grid,
               "--out", tmp_path / "out")[0] == 0
    product = tmp_path / "out" / "red_fluxcal.fits"
    status, out, err = cli(capsys, "info", red, vac, product)
    assert status == 0 and len(out) == 3
    assert "A in air (as read: vacuum, WAVELA; converted to air)" in out[1]
    assert "3998.9-7997.8 A" in out[1]
    calibrated = out[2].split("; ", 1)[1]
    header = fits.getheader(product)
    assert calibrated.startswith("calibrated: FLUXCAL = T, BUNIT '1e-17 erg/(s cm2 "
                                 f"Angstrom)', FCALVER = '{__version__}', FCALNSTR = 2, "
                                 f"FCALRMS = {header['FCALRMS']:.4g}, FCALSRC = 'standards', "
                                 f"FCALQUAL = '{header['FCALQUAL']}'")
    assert f"FCALO2 = {header['FCALO2']:.4g}" in calibrated
    # The data are described alike; what differs is said after them.
    assert out[0].split("; ")[0].replace(str(red), "") == out[2].split("; ")[0].replace(
        str(product), "")


def test_vacuum_input_history_says_what_was_done_once(capsys, files, tmp_path):
    """The product's HISTORY said 'converted vacuum wavelengths to air' although it keeps
    the input's vacuum wavelengths, and its QC summary repeated the line with the QC run's
    time (the reading of the product converted them again)."""
    (vac,) = files("vac.fits")
    with fits.open(vac, mode="update") as hdul:
        hdul["WAVELA"].header["AIRORVAC"] = "vac"
    assert cli(capsys, "calibrate", vac, "--catalog", files.catalog, "--grid", files.grid,
               "--out", tmp_path / "out", "--qc")[0] == 0
    product = tmp_path / "out" / "vac_fluxcal.fits"
    history = "".join(str(h) for h in fits.getheader(product)["HISTORY"])  # cards wrap
    assert history.count("vacuum wavelengths converted to air (Morton 2000) for the "
                         "calibration; the product keeps the file's own") == 1
    assert fits.getheader(product, "WAVELA")["AIRORVAC"] == "vac"
    summary = next((tmp_path / "out" / "qc").glob("*_summary.txt")).read_text()
    assert summary.count("vacuum wavelengths converted to air") == 1


def test_info_refuses_a_product_without_its_calibration_table(capsys, files, tmp_path):
    """A file marked calibrated (FLUXCAL = T, a flux BUNIT) whose FLUXCAL HDU is gone was
    reported 'calibrated' with exit status 0."""
    (red,) = files("red.fits")
    assert cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid", files.grid,
               "--out", tmp_path / "out")[0] == 0
    product = tmp_path / "out" / "red_fluxcal.fits"
    with fits.open(product) as hdul:
        fits.HDUList([h for h in hdul if h.name != "FLUXCAL"]).writeto(tmp_path / "cut.fits")
    status, out, err = cli(capsys, "info", tmp_path / "cut.fits", product)
    assert status == 1 and len(out) == 1 and out[0].startswith(f"{product}: ")
    assert problems(err) == [f"{tmp_path / 'cut.fits'}: FAILED: HDU FLUXCAL: missing, though "
                             "the primary header marks the file calibrated (an incomplete "
                             "product?)"]


@pytest.mark.parametrize("command", ["info", "calibrate"])
def test_fifo_inputs_are_refused_not_waited_on(capsys, files, tmp_path, command):
    """Issue 16: a FIFO named .fits hung `calibrate` and `info`; a FIFO catalog would too."""
    fifo = tmp_path / "pipe.fits"
    os.mkfifo(fifo)
    (red,) = files("red.fits")
    options = [] if command == "info" else ["--catalog", files.catalog, "--grid", files.grid,
                                            "--out", tmp_path / "out"]
    with time_limit(20):
        status, out, err = cli(capsys, command, fifo, red, *options)
    assert (status, len(out)) == (1, 1 if command == "info" else 2)
    assert problems(err) == [f"{fifo}: FAILED: not a regular file (a FIFO)"]
    if command == "calibrate":
        with time_limit(20):
            status, out, err = cli(capsys, command, red, "--catalog", fifo, "--grid",
                                   files.grid, "--out", tmp_path / "out2")
        assert (status, err) == (1, [f"kspec-fluxcal: error: {fifo}: not a regular file "
                                     "(a FIFO)"])


def test_calibrate_qc_has_the_layout_of_the_qc_command(capsys, files, tmp_path):
    """Issue 16: one QC layout. `calibrate --qc` wrote OUT/qc/<input stem>/..., drawn from
    memory; the demo and `kspec-fluxcal qc` write <dir>/<expid>_<kind>.png from the file. Now
    OUT/qc/<expid>_<kind>.png, drawn from the written product: the same files."""
    (red,) = files("red.fits")
    assert cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid", files.grid,
               "--out", tmp_path / "out", "--qc")[0] == 0
    product = tmp_path / "out" / "red_fluxcal.fits"
    assert cli(capsys, "qc", product, "--out", tmp_path / "qc")[0] == 0
    mine = sorted(p.name for p in (tmp_path / "out" / "qc").iterdir())
    theirs = sorted(p.name for p in (tmp_path / "qc").iterdir())
    assert mine == theirs and "KS20261101_0001_calibration.png" in mine
    summary = "KS20261101_0001_summary.txt"
    assert (tmp_path / "out" / "qc" / summary).read_text() == (tmp_path / "qc" /
                                                                summary).read_text()


def test_qc_of_two_files_of_one_exposure_is_refused(capsys, files, tmp_path):
    """QC files are named by EXPID: two copies of one exposure had their QC overwrite each
    other without a word (calibrate --qc, and qc on their products)."""
    first, second = files("a.fits", "b.fits")
    status, out, err = cli(capsys, "calibrate", first, second, "--catalog", files.catalog,
                           "--grid", files.grid, "--out", tmp_path / "out", "--qc")
    assert status != 0 and out == []
    assert problems(err) == [f"kspec-fluxcal: error: {first} and {second} are both exposure "
                             "KS20261101_0001: their QC files (named by EXPID) would replace "
                             "each other; give them to separate runs"]
    assert not (tmp_path / "out").exists()
    for red in (first, second):
        assert cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid", files.grid,
                   "--out", tmp_path / "out")[0] == 0
    products = sorted(str(p) for p in (tmp_path / "out").glob("*_fluxcal.fits"))
    status, _, err = cli(capsys, "qc", *products, "--out", tmp_path / "qc")
    assert status != 0 and "would replace each other" in err[-1]
    assert not (tmp_path / "qc").exists()


def test_qc(capsys, files, tmp_path):
    (red,) = files("red.fits")
    assert cli(capsys, "calibrate", red, "--catalog", files.catalog, "--grid", files.grid,
               "--out", tmp_path / "out")[0] == 0
    calibrated = tmp_path / "out" / "red_fluxcal.fits"
    status, out, err = cli(capsys, "qc", calibrated, red, "--out", tmp_path / "qc")
    assert status == 1
    written = sorted(p.name for p in (tmp_path / "qc").iterdir())
    assert out == [f"{calibrated}: wrote {len(written)} QC file(s) to {tmp_path / 'qc'}"]
    assert len(written) >= 2
    assert problems(err) == [f"{red}: FAILED: HDU FLUXCAL: missing: not a calibrated "
                             "file (run 'kspec-fluxcal calibrate' first)"]
    shutil.rmtree(tmp_path / "qc")


def test_blas_threads_are_one_unless_the_user_set_them(monkeypatch, capsys):
    # Small matrix products: a second BLAS thread only spins (+60 % CPU, same wall time).
    from kspec_fluxcal.cli import _ONE_THREAD

    for name in _ONE_THREAD:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "4")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ["OMP_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "4"


# ----------------------------------------------------------------------------- closed stdout


class _ClosedAfterOneLine(io.StringIO):
    """The pipe to ``| head -1``: once a line has gone through, its reader has exited."""

    def write(self, text):
        if "\n" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)

    def flush(self):
        if "\n" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_does_not_fail_the_batch(capsys, files, tmp_path, monkeypatch):
    """`calibrate a b c | head -1` reported b and c as FAILED (Broken pipe), exit 1, though
    every output was written."""
    paths = files("a.fits", "b.fits", "c.fits")
    pipe = _ClosedAfterOneLine()
    monkeypatch.setattr(sys, "stdout", pipe)
    status = main(["calibrate", *paths, "--catalog", files.catalog, "--grid", files.grid,
                   "--out", str(tmp_path / "out")])
    assert (status, problems(capsys.readouterr().err)) == (0, [])
    assert pipe.getvalue().count("\n") == 1 and sys.stdout is pipe
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_fluxcal.fits", "b_fluxcal.fits", "c_fluxcal.fits"]


@pytest.fixture
def bad_lake(files, tmp_path):
    """A lake of one truncated RED file: the survey fails it while planning, without a
    cluster."""
    (bad,) = files("lake/bad.fits", raw=Path(files("whole.fits")[0]).read_bytes()[:50_000])
    return Path(bad)


def test_a_closed_stdout_does_not_abort_the_survey(files, bad_lake, tmp_path):
    """`survey ... | head -1` ended the job at its first line ("error: Broken pipe"). Run
    with the reader already gone: the job is done, its status is its own (1: the bad file),
    and nothing is said of the pipe, not even by the interpreter's flush at exit."""
    argv = [ENTRY_POINT, "survey", bad_lake.parent, "--catalog", files.catalog, "--grid",
            files.grid, "--out", tmp_path / "out"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    with time_limit(120):
        err = proc.stderr.read().decode()
    assert (proc.wait(), err) == (1, "")
    assert "bad.fits" in (tmp_path / "out" / "notes.json").read_text()


# ----------------------------------------------------------------------------- simulate


@pytest.mark.parametrize("option, minimum", [("--exposures", 1), ("--nights", 1),
                                              ("--fibers", 6), ("--pixels", 64)])
def test_simulate_sizes_checked_by_the_parser(capsys, tmp_path, option, minimum):
    """Below simulate_survey's limits, a traceback of its ValueError; now a usage error."""
    with pytest.raises(SystemExit) as info:
        main(["simulate", str(tmp_path / "x"), option, str(minimum - 1)])
    assert info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"kspec-fluxcal simulate: error: argument {option}: {minimum - 1}: "
                           f"need at least {minimum}")
    name = option.removeprefix("--")
    with pytest.raises(ValueError, match=rf"{name}={minimum - 1}\b"):  # the library's limit
        simulate_survey(tmp_path / "x", **{name: minimum - 1})


def test_simulate_overwrite_and_a_file_as_outdir(capsys, made, tmp_path):
    """The refusal pointed at --overwrite, which simulate did not have; a regular file as
    OUTDIR was a bare '[Errno 20] Not a directory'."""
    out = tmp_path / "sim"
    out.mkdir()
    (out / "survey.json").write_text("{}")  # an earlier survey (--overwrite replaces only one)
    argv = ["simulate", out, "--exposures", 1, "--nights", 1, "--fibers", 6, "--pixels", 64,
            "--grid", made[0].bosz, "--quiet"]
    assert cli(capsys, *argv)[2] == [f"kspec-fluxcal: error: {out}: exists; pass "
                                     "overwrite=True (CLI: --overwrite) to replace it"]
    assert cli(capsys, *argv, "--overwrite")[:2] == (0, [f"wrote a simulated survey to {out}"])
    assert sorted(p.name for p in out.iterdir()) == ["catalog.csv", "lake", "survey.json",
                                                     "truth"]
    argv[1] = out / "survey.json"
    assert cli(capsys, *argv) == (1, [], [f"kspec-fluxcal: error: {out / 'survey.json'}: is a "
                                         "file, not a directory"])


# ----------------------------------------------------------------------------- survey


def test_survey_quiet_still_reports_failures(capsys, files, bad_lake, tmp_path):
    """--quiet printed nothing at all, exit 1, the failures only in notes.json."""
    status, out, err = cli(capsys, "survey", bad_lake.parent, "--catalog", files.catalog,
                           "--grid", files.grid, "--out", tmp_path / "out", "--quiet")
    assert (status, out) == (1, [])
    assert [re.sub(r": truncated: .*", "", line) for line in err] == [
        f"FAILED bad.fits: {bad_lake}",
        f"kspec-fluxcal: 1 exposure(s) failed; notes and failures: {tmp_path / 'out'}/notes.json"]


@pytest.mark.parametrize("make_report, problem", [
    (lambda t: t / "notes.txt" / "report.html",
     "cannot be created: {t}/notes.txt is a file, not a directory"),
    (lambda t: t, "is a directory, not a file"),
], ids=["under-a-file", "a-directory"])
def test_survey_performance_report_checked_before_the_work(capsys, files, tmp_path,
                                                           make_report, problem):
    """It was written after all the work: '[Errno 17] File exists', then no summary."""
    files("lake/red.fits")
    (tmp_path / "notes.txt").write_text("mine")
    report = make_report(tmp_path)
    status, out, err = cli(capsys, "survey", tmp_path / "lake", "--catalog", files.catalog,
                           "--grid", files.grid, "--out", tmp_path / "out",
                           "--performance-report", report)
    assert (status, out) == (1, [])
    assert err == [f"kspec-fluxcal: error: --performance-report {report}: "
                   f"{problem.format(t=tmp_path)}"]
    assert not (tmp_path / "out").exists()


_NOT_A_SCHEDULER = ("is not a scheduler address{}; expected tcp://HOST:PORT (the scheduler's "
                    "port, 8786 by default)")


@pytest.mark.parametrize("options, message", [
    (["--scheduler", "bogus"], "--scheduler: 'bogus' " + _NOT_A_SCHEDULER.format("")),
    (["--scheduler", "tcp://127.0.0.1:notaport"],
     "--scheduler: 'tcp://127.0.0.1:notaport' " + _NOT_A_SCHEDULER.format("")),
    (["--scheduler", "http://127.0.0.1:8787"], "--scheduler: 'http://127.0.0.1:8787' "
     + _NOT_A_SCHEDULER.format(" (http:// is the dashboard's)")),
    (["--workers", "0"], "--workers: 0: need at least 1"),
    (["--workers", "-1"], "--workers: -1: need at least 1"),
    (["--threads-per-worker", "0"], "--threads-per-worker: 0: need at least 1"),
], ids=["no-port", "port-not-a-number", "dashboard", "workers-0", "workers-negative",
        "threads-0"])
def test_survey_cluster_options_checked_by_the_parser(capsys, files, tmp_path, options,
                                                      message):
    """Tracebacks (of the address) or a distributed traceback (workers -1), or silently
    one worker per core (workers 0), each after the plan."""
    with pytest.raises(SystemExit) as info:
        main(["survey", str(tmp_path), "--catalog", files.catalog, "--grid", files.grid,
              "--out", str(tmp_path / "out"), *options])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"kspec-fluxcal survey: error: argument {message}"
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "127.0.0.1:8786", "tls://h:1",
                                     "tcp://[::1]:8786"])
def test_scheduler_addresses_accepted(address):
    args = build_parser().parse_args(["survey", "l", "--catalog", "c", "--grid", "g", "--out",
                                      "o", "--scheduler", address])
    assert args.scheduler == address


def test_local_cluster_refuses_no_workers():
    """workers=0 meant one per core; -1 failed inside distributed."""
    with pytest.raises(ConfigError, match=r"^workers=0: need at least 1 \(None: one per "):
        local_cluster(0)


def test_on_cluster_checks_the_report_path_before_the_work(tmp_path):
    """The library's callers too: refused before a cluster starts, not after the work."""
    def work(client):
        raise AssertionError("the work ran")

    with pytest.raises(FluxCalError, match=rf"^{re.escape(str(tmp_path))}: is a directory, "
                                           "not a file$"):
        on_cluster(work, client=None, scheduler=None, workers=1, threads_per_worker=1,
                   dashboard_address="127.0.0.1:0", performance_report=tmp_path,
                   progress=False)


# ----------------------------------------------------------------------------- archive plot


@pytest.fixture
def archive(tmp_path):
    """An archive of three exposures of setup s1 and two of s2."""
    path = tmp_path / "archive.zarr"
    records = []
    for i in range(5):
        calibrated = _calibrated(f"E{i}", 61000.5 + 0.05 * i)
        calibrated.attrs["setup"] = "s1" if i < 3 else "s2"
        records.append(archive_record(calibrated, _stars(), None))
    ArchiveWriter(path).append(records)
    return path


def test_archive_plot_setup_selects_its_exposures(capsys, archive, tmp_path, monkeypatch):
    """--setup chose the survey model only: the throughput plots showed every setup."""
    import kspec_fluxcal.survey as survey

    plotted, real = [], survey.plot_archive

    def spy(ds, out, **kwargs):
        plotted.append(list(ds["expid"].values))
        return real(ds, out, **kwargs)

    monkeypatch.setattr(survey, "plot_archive", spy)
    status, out, err = cli(capsys, "archive", "plot", archive, "--out", tmp_path / "p",
                           "--setup", "s2")
    assert (status, err, plotted) == (0, [], [["E3", "E4"]])
    assert cli(capsys, "archive", "plot", archive, "--out", tmp_path / "p", "--setup",
               "s3") == (1, [], [f"kspec-fluxcal: error: {archive}: has no exposures of setup "
                                 "s3 (its setups: s1, s2); nothing to plot"])


def test_archive_plot_puts_each_setup_in_its_own_directory(capsys, archive, tmp_path,
                                                           monkeypatch):
    """Without a model store, every setup's exposures went into one plot, one curve zig-
    zagging between their throughputs."""
    import kspec_fluxcal.survey as survey

    plotted, real = {}, survey.plot_archive

    def spy(ds, out, **kwargs):
        plotted[Path(out).name] = list(ds["expid"].values)
        return real(ds, out, **kwargs)

    monkeypatch.setattr(survey, "plot_archive", spy)
    status, out, err = cli(capsys, "archive", "plot", archive, "--out", tmp_path / "p")
    assert (status, err) == (0, [])
    assert plotted == {"s1": ["E0", "E1", "E2"], "s2": ["E3", "E4"]}
    assert sorted(p.relative_to(tmp_path / "p").as_posix()
                  for p in (tmp_path / "p").rglob("*.png")) == [
        "s1/throughput_image.png", "s1/throughput_vs_time.png",
        "s2/throughput_image.png", "s2/throughput_vs_time.png"]


def test_archive_plot_of_an_empty_archive_or_to_a_file(capsys, archive, tmp_path):
    """An archive without exposures (every one failed): "TypeError: 'list' object cannot be
    interpreted as an integer"; --out an existing file: a bare '[Errno 17] File exists'."""
    empty = tmp_path / "empty.zarr"
    ArchiveWriter(empty)
    assert cli(capsys, "archive", "plot", empty, "--out", tmp_path / "p") == (
        1, [], [f"kspec-fluxcal: error: {empty}: has no exposures; nothing to plot"])
    assert not (tmp_path / "p").exists()
    (tmp_path / "notes.txt").write_text("mine")
    assert cli(capsys, "archive", "plot", archive, "--out", tmp_path / "notes.txt") == (
        1, [], [f"kspec-fluxcal: error: --out {tmp_path / 'notes.txt'}: is a file, not a "
                "directory"])


@pytest.mark.parametrize("model", ["empty-dir", "missing", "the-archive"])
def test_archive_plot_an_explicit_model_that_is_none_is_refused(capsys, archive, tmp_path,
                                                                 model):
    """--model naming an empty directory was ignored (plots without a model, exit 0), and a
    missing one gave a bare '[Errno 2] No such file or directory'."""
    path = {"empty-dir": tmp_path / "m", "missing": tmp_path / "none.zarr",
            "the-archive": archive}[model]
    if model == "empty-dir":
        path.mkdir()
    problem = ("not a survey model store (its title: 'kspec-fluxcal calibration archive'"
               if model == "the-archive" else "no survey model here (the survey job writes")
    status, out, err = cli(capsys, "archive", "plot", archive, "--out", tmp_path / "p",
                           "--model", path)
    assert (status, out, len(err)) == (1, [], 1)
    assert err[0].startswith(f"kspec-fluxcal: error: {path}: {problem}")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("argv", [
    ["qc", "calibrated.fits"],
    ["grid", "synth", "--small"],
    ["grid", "download", "--dry-run"],
    ["demo"],
])
def test_an_output_that_is_a_file_is_refused_before_the_work(capsys, tmp_path, monkeypatch,
                                                              argv):
    """qc, grid synth and demo (minutes into its work) failed with a bare '[Errno 17] File
    exists'; a dry run of grid download listed files to fetch under a file, exit 0."""
    import kspec_fluxcal.sim.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    (tmp_path / "notes.txt").write_text("mine")
    status, out, err = cli(capsys, *argv, "--out", tmp_path / "notes.txt")
    assert (status, out) == (1, [])
    assert err == [f"kspec-fluxcal: error: --out {tmp_path / 'notes.txt'}: is a file, not a "
                   "directory"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
