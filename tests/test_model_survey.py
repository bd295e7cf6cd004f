"""The survey job with the survey model (issue 13) on a real LocalCluster: the fit as named
tasks with a tree reduction, the recalibration, model-only exposures, products, resume, an
archive of schema 2 migrated, the CLI's exit code and plots.

One small lake (12 exposures of one instrument configuration over 2 nights, a quarter without
standards; each exposure with its own arc solution and line spread, as real ones) is
calibrated once with the model; later runs start from copies of that output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.io import fits
from distributed import Client, get_task_stream

from kspec_fluxcal import cli
from kspec_fluxcal.config import Config
from kspec_fluxcal.errors import InputError
from kspec_fluxcal.grid.build import build_grid
from kspec_fluxcal.qc import qc_from_file
from kspec_fluxcal.sim import Setup, compare_with_truth, simulate_survey
from kspec_fluxcal.survey import local_cluster, run_survey
from kspec_fluxcal.survey.archive import ArchiveWriter, open_archive
from kspec_fluxcal.survey.model_store import open_model

#: The model's options in these tests: few exposures, small batches (a tree of sums).
MODEL = {"model__min_exposures": 6, "model__batch": 3}
#: Arrays and fields schema 3 added (an archive of schema 2 lacks them).
SCHEMA3 = ("own_smooth", "own_smooth_variance", "fcalo2_err", "fcalh2o_err", "seeing",
           "model_id", "model_grey", "sphot_g", "sphot_r", "sphot_i", "sphot_scatter",
           "sphot_n", "level_variance")


def _own_setups(n, seed=5):
    """One configuration (800 pixels, 8 fibers, 3500-8500 A), each exposure with its own arc
    solution (ends moved by up to 3 A) and line spread (+-5 %): one survey model for all."""
    rng = np.random.default_rng(seed)
    ends, scales = rng.uniform(-3.0, 3.0, (n, 2)), rng.uniform(0.95, 1.05, n)
    return [Setup(f"m{i:02d}", pixels=800, fibers=8, wave_min=3500.0 + ends[i, 0],
                  wave_max=8500.0 + ends[i, 1],
                  fwhm_pixels=tuple(scales[i] * np.array([2.4, 2.05, 2.35])))
            for i in range(n)]


@pytest.fixture(scope="module")
def lake(small_grid, tmp_path_factory):
    root = tmp_path_factory.mktemp("model_lake")
    out = simulate_survey(root / "sv", exposures=12, nights=2, seed=21, grid=small_grid,
                          setups=_own_setups(12), n_standards=(1, 3), no_standards=0.25)
    cube = build_grid(small_grid, root / "grid.zarr", progress=False)
    return out, json.loads((out / "survey.json").read_text()), cube


@pytest.fixture(scope="module")
def client():
    with local_cluster(2, 1, "127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def _run(lake, out, client, resume=False, **options):
    sv, _, cube = lake
    return run_survey(sv / "lake", catalog=sv / "catalog.csv", grid=cube, out=out,
                      client=client, progress=False, resume=resume,
                      config=Config().replace(**{**MODEL, **options}))


@pytest.fixture(scope="module")
def with_model(lake, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "out"
    with get_task_stream(client=client) as stream:
        report = _run(lake, out, client)
    return out, report, [str(t["key"]) for t in stream.data]


def _without_standards(lake):
    return sorted(e["expid"] for e in lake[1]["exposures"] if e["n_standards"] == 0)


def _product(lake, out, expid):
    _, manifest, _ = lake
    entry = next(e for e in manifest["exposures"] if e["expid"] == expid)
    return out / Path(entry["path"]).relative_to("lake").with_name(f"{expid}_fluxcal.fits")


@pytest.mark.cluster
def test_every_exposure_is_calibrated_with_the_model(lake, with_model):
    sv, manifest, _ = lake
    none = _without_standards(lake)
    out, report, _ = with_model
    assert report.ok and sorted(report.model_only) == none
    assert len(report.calibrated) == 12
    (summary,) = report.model.values()
    assert summary["exposures"] == 12 - len(none) and summary["model_only"] == len(none)
    table = open_archive(out / "archive.zarr").compute()
    src = dict(zip(table["expid"].values, table["fcalsrc"].values, strict=True))
    assert {e for e, s in src.items() if s == "model"} == set(none)
    assert {s for e, s in src.items() if e not in none} == {"standards+model"}
    assert len(set(table["model_id"].values)) == 1 and len(table["model_id"].values[0]) == 12
    own = np.isfinite(table["own_smooth"].values).any(axis=1)
    assert not own[np.isin(table["expid"].values, none)].any() and own.sum() == 12 - len(none)
    for expid in none:
        with fits.open(_product(lake, out, expid)) as hdul:
            head = hdul[0].header
            assert (head["FCALSRC"], head["FCALQUAL"], head["FCALNSTR"]) == ("model", "D", 0)
            assert head["FCALMOD"] == table["model_id"].values[0]
            assert any("survey model" in str(h) for h in head["HISTORY"])
        metrics = compare_with_truth(_product(lake, out, expid),
                                     sv / f"truth/{expid}.npz")
        assert metrics["cal_shape"] < 0.015, metrics  # the target for these
    for entry in manifest["exposures"]:
        if entry["n_standards"]:
            metrics = compare_with_truth(_product(lake, out, entry["expid"]),
                                         sv / entry["truth"])
            assert metrics["cal_shape"] < 0.02 and abs(metrics["level_cal"]) < 0.02
            with fits.open(_product(lake, out, entry["expid"])) as hdul:
                assert "FCALSTAR" in hdul  # the standards' fits are kept


@pytest.mark.cluster
def test_the_fit_is_a_tree_of_named_tasks(with_model):
    _, _, keys = with_model
    kinds = {}
    for key in keys:
        kind = "-".join(key.split("-")[:2]) if key.startswith("model-") else key.split("-")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    # 9 exposures with standards in batches of 3: 3 statistics tasks, 2 sums, 1 solve and 3
    # residual tasks per round, 3 rounds; one recalibrate task per exposure.
    assert kinds["model-stats"] == 9 and kinds["model-sum"] == 6
    assert kinds["model-solve"] == 3 and kinds["model-residuals"] == 9
    assert kinds["recalibrate"] == 12 and kinds["calibrate"] == 12


@pytest.mark.cluster
def test_readme_model_example_runs(with_model):
    """The README's survey-model block: ``m.expid[m.outlier]`` raised (a boolean Dask array
    cannot index); a store that is not a model said it 'holds N setups' of its arrays."""
    import matplotlib

    matplotlib.use("Agg")
    out = with_model[0]
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## The survey model"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code.replace("recalibrated/", f"{out}/"), "README.md", "exec"),  # noqa: S102
         namespace)
    m = namespace["m"]
    assert m["outlier"].dtype == bool and isinstance(m["outlier"].data, np.ndarray)
    assert m["residual"].chunks is not None  # the curves stay lazy
    with pytest.raises(InputError, match="not a survey model store"):
        open_model(out / "archive.zarr")


@pytest.mark.cluster
def test_model_products_and_plots(lake, with_model, tmp_path, capsys):
    out, report, _ = with_model
    model = open_model(out / "model.zarr").compute()
    assert list(model["night"].values) == ["20261101", "20261102"]
    assert int(model["n_exposures"].sum()) == report.model[model.attrs["setup"]]["exposures"]
    k = model["extinction"].sel(wavelength=slice(4000, 8000))
    assert np.all(np.isfinite(k)) and float(k.isel(wavelength=0).min()) > float(
        k.isel(wavelength=-1).max())  # bluer light is extinguished more
    assert np.all(model["throughput"] > 0) and model["residual"].shape[0] == model.sizes[
        "exposure"]
    assert cli.main(["archive", "plot", str(out / "archive.zarr"), "--out",
                     str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "extinction_per_night.png", "model_outliers.png", "throughput_image.png",
        "throughput_vs_time.png"]
    capsys.readouterr()
    # The QC summary of a product says which model and what the spectrophotometric check saw.
    expid = _without_standards(lake)[0]
    written = qc_from_file(_product(lake, out, expid), tmp_path / "qc")
    text = next(p for p in written if p.name.endswith("_summary.txt")).read_text()
    assert f"survey model (FCALMOD): {model.attrs['model_id']}" in text
    with fits.open(_product(lake, out, expid)) as hdul:
        n = hdul[0].header["FCALSPN"]
        assert f"spectrophotometric check (FCALSP*): {n} program star(s)" in text if n else \
            "spectrophotometric check: no program star" in text


@pytest.mark.cluster
def test_resume_refits_and_recalibrates_nothing(lake, with_model, client, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(with_model[0], out)
    rows = ArchiveWriter(out / "archive.zarr").rows
    report = _run(lake, out, client, resume=True)
    assert report.calibrated == [] and len(report.skipped) == 12 and report.model == {}
    assert ArchiveWriter(out / "archive.zarr").rows == rows
    # Other [model] options: a new model, every exposure recalibrated, none refitted alone.
    with get_task_stream(client=client) as stream:
        report = _run(lake, out, client, resume=True, model__huber=3.0)
    keys = [str(t["key"]) for t in stream.data]
    assert not any(k.startswith("calibrate-") for k in keys)
    assert sum(k.startswith("recalibrate-") for k in keys) == 12 and report.ok


@pytest.mark.cluster
def test_a_schema_2_archive_is_migrated_and_fitted(lake, with_model, client, tmp_path):
    """An archive of schema 2 (no own response; rows of the exposures' own standards have it
    in cal_smooth, FCALSRC 'standards'): --resume keeps the exposures' own calibrations (no
    calibrate task) and the model is fitted from their cal_smooth."""
    out = tmp_path / "out"
    shutil.copytree(with_model[0], out)
    group = zarr.open_group(out / "archive.zarr", mode="r+")
    rows = sorted(group.attrs["index"].values())
    own = np.isin(group["fcalsrc"][:][rows], ["standards+model"])
    group["fcalsrc"][rows] = np.where(own, "standards", group["fcalsrc"][:][rows]).astype(object)
    group["cal_smooth"][rows] = np.where(own[:, None], group["own_smooth"][rows],
                                         group["cal_smooth"][rows])
    for name in SCHEMA3:
        del group[name]
    group.attrs["schema_version"] = 2
    with get_task_stream(client=client) as stream:
        report = _run(lake, out, client, resume=True)
    keys = [str(t["key"]) for t in stream.data]
    assert report.ok and len(report.calibrated) == 12 and report.skipped == []
    assert not any(k.startswith("calibrate-") for k in keys)
    assert sum(k.startswith("recalibrate-") for k in keys) == 12
    assert zarr.open_group(out / "archive.zarr").attrs["schema_version"] == 3
    table = open_archive(out / "archive.zarr").compute()
    assert set(table["fcalsrc"].values) == {"standards+model", "model"}


@pytest.mark.cluster
def test_cli_exit_status_counts_model_only_exposures_as_calibrated(lake, with_model, client,
                                                                  tmp_path, capsys):
    """Products of the exposures without standards removed: --resume calibrates them again
    from the model (their first pass fails) and the job succeeds."""
    sv, _, cube = lake
    out = tmp_path / "out"
    shutil.copytree(with_model[0], out)
    for expid in _without_standards(lake):
        _product(lake, out, expid).unlink()
    config = tmp_path / "model.toml"
    config.write_text("[model]\nmin_exposures = 6\nbatch = 3\n")
    code = cli.main(["survey", str(sv / "lake"), "--catalog", str(sv / "catalog.csv"),
                     "--grid", str(cube), "--out", str(out), "--config", str(config),
                     "--scheduler", client.scheduler.address, "--resume"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "3 calibrated (0 from the archive), 9 skipped as up to date, 0 failed" in text
    assert "0 recalibrated with it, 3 from it alone" in text


@pytest.mark.cluster
def test_quality_counts_the_rejected_standards_after_the_model(lake, client, tmp_path):
    """An exposure recalibrated with the model counted only the standards used as its
    standards: quality.csv and the summary said 2/2 for an exposure whose FCALSTAR has a
    third, rejected (no catalog match), as the first pass's 2/3 said."""
    sv, manifest, cube = lake
    copy = tmp_path / "sv"
    shutil.copytree(sv, copy)
    entry = next(e for e in manifest["exposures"] if e["n_standards"] >= 2)
    with fits.open(copy / entry["path"], mode="update") as hdul:
        fibres = hdul["FIBRES"].data
        star = np.flatnonzero(fibres["TYPE"] == "C")[0]
        fibres["OBJID"][star] = -1
        fibres["RA"][star] += 1.0  # no catalog star within 2 arcsec
    out = tmp_path / "out"
    report = _run((copy, manifest, cube), out, client)
    quality = report.quality[entry["expid"]]
    assert quality["source"] == "standards+model"
    with fits.open(_product(lake, out, entry["expid"])) as hdul:
        table = hdul["FCALSTAR"].data
        assert "no catalog match" in table["STATUS"][list(table["FIBER"]).index(star)]
        assert quality["standards"] == len(table) == entry["n_standards"]
        assert quality["used"] == hdul[0].header["FCALNSTR"] < len(table)
    row = next(r for r in (out / "quality.csv").read_text().splitlines()
               if r.startswith(entry["expid"]))
    assert row.split(",")[3:5] == [str(quality["used"]), str(entry["n_standards"])]


@pytest.mark.cluster
def test_the_model_pass_removes_the_second_order_too(lake, client, tmp_path):
    """With [instrument] second_order, exposures recalibrated with the model (with their own
    standards or alone) carry the corrected counts times their factor, as the first pass's."""
    from kspec_fluxcal import correct_second_order, open_exposure

    sv, manifest, _ = lake
    out = tmp_path / "out"
    report = _run(lake, out, client, instrument__second_order=0.05)
    assert report.ok and sorted(report.model_only) == _without_standards(lake)
    sources = set()
    for entry in manifest["exposures"]:
        with fits.open(_product(lake, out, entry["expid"])) as hdul:
            head = hdul[0].header
            assert head["FCAL2ND"] == 0.05
            sources.add(head["FCALSRC"])
            counts = hdul[0].data / hdul["FCALFAC"].data
        expected = correct_second_order(open_exposure(sv / entry["path"]), 0.05)
        ok = np.isfinite(counts)
        assert ok[:, -100:].mean() > 0.8  # the red end is compared (a dead fiber is NaN)
        np.testing.assert_allclose(counts[ok], expected["flux"].values[ok], rtol=2e-5)
    assert sources == {"model", "standards+model"}
