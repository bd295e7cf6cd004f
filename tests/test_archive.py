from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from kspec_fluxcal import __version__
from kspec_fluxcal.errors import InputError
from kspec_fluxcal.survey.archive import (
    MAX_STARS,
    SCHEMA_VERSION,
    ArchiveWriter,
    archive_grid,
    archive_record,
    night_of,
    open_archive,
)
from kspec_fluxcal.survey.plots import archive_figures, plot_archive


def _calibrated(expid, mjd, level=1.0, wave=None):
    wave = np.linspace(3600.0, 8400.0, 800) if wave is None else wave
    cal = level * (1 + 0.2 * np.sin(wave / 700.0))
    return xr.Dataset(
        {"cal": ("wavelength", cal), "cal_variance": ("wavelength", (0.01 * cal) ** 2),
         "cal_mask": ("wavelength", np.ones(wave.size, bool))},
        coords={"wavelength": wave},
        attrs={"expid": expid, "mjd": mjd, "airmass": 1.2, "exptime": 600.0, "fcalnstr": 2,
               "fcalrms": 0.01, "setup": "s1"},
    )


def _stars(n=2):
    return xr.Dataset(coords={
        "objid": ("star", np.arange(n) + 10), "fiber": ("star", np.arange(n)),
        "teff": ("star", np.full(n, 6000.0)), "logg": ("star", np.full(n, 4.2)),
        "feh": ("star", np.full(n, -0.3)), "rv": ("star", np.full(n, 12.0)),
        "ebv": ("star", np.full(n, 0.03)), "snr": ("star", np.full(n, 80.0)),
        "status": ("star", ["ok"] * n)})


def test_record_is_per_angstrom_on_the_common_grid():
    wave = np.linspace(3600.0, 8400.0, 800)
    rec = archive_record(_calibrated("A", 61000.6, wave=wave), _stars(), None)
    grid = archive_grid()
    assert rec["cal"].shape == grid.shape
    assert grid[0] == 3000.0 and grid[-1] <= 11000.0
    assert np.allclose(np.diff(np.log(grid)), 2e-4)
    inside = (grid > 3700) & (grid < 8300)
    width = wave[1] - wave[0]
    expected = np.interp(grid[inside], wave, (1 + 0.2 * np.sin(wave / 700.0)) * width)
    np.testing.assert_allclose(rec["cal"][inside], expected, rtol=1e-5)
    assert np.isnan(rec["cal"][grid < 3590]).all() and not rec["cal_mask"][grid < 3590].any()
    assert rec["star"]["star_teff"][0] == 6000.0 and np.isnan(rec["star"]["star_teff"][2])
    assert rec["star"]["star_status"].shape == (MAX_STARS,)


def test_record_ends_on_grid_points():
    """An exposure's range is found on the grid: grid points at its ends are interpolated
    (its first and last values), those beyond are NaN; the grid given out is a copy."""
    grid = archive_grid()
    wave = np.linspace(grid[100], grid[2000], 800)
    rec = archive_record(_calibrated("A", 61000.6, wave=wave), _stars(), None)
    assert np.isfinite(rec["cal"][100:2001]).all() and rec["cal_mask"][100:2001].all()
    assert np.isnan(rec["cal"][:100]).all() and np.isnan(rec["cal"][2001:]).all()
    assert not rec["cal_mask"][:100].any() and not rec["cal_mask"][2001:].any()
    grid[:] = 0.0
    assert archive_grid()[0] == 3000.0


def test_night_names():
    # 2026-11-01 22:00 KST = 13:00 UT is MJD 61345.5417; 04:00 KST next morning is the same night.
    assert night_of(61345.5417, 9.0) == "20261101"
    assert night_of(61345.5417 + 6 / 24, 9.0) == "20261101"
    assert night_of(61345.5417 + 16 / 24, 9.0) == "20261102"


def test_append_replace_and_reopen(tmp_path):
    path = tmp_path / "archive.zarr"
    writer = ArchiveWriter(path)
    records = [archive_record(_calibrated(f"E{i}", 61000.2 + i), _stars(), None, input_hash=f"h{i}")
               for i in range(70)]  # more than one block of capacity
    writer.append(records[:40])
    writer.append(records[40:])
    ds = open_archive(path)
    assert ds.sizes["exposure"] == 70
    assert ds["cal"].chunks is not None  # lazy
    assert list(ds["expid"].values[:3]) == ["E0", "E1", "E2"]
    assert ds["star_teff"].shape == (70, MAX_STARS)
    # Replace E5 with a new calibration: still one row for E5, with the new values.
    again = ArchiveWriter(path)
    assert again.is_current("E5", "h5") and not again.is_current("E5", "other")
    again.append([archive_record(_calibrated("E5", 61005.2, level=2.0), _stars(), None,
                                 input_hash="new")])
    ds = open_archive(path)
    assert ds.sizes["exposure"] == 70
    assert int((ds["expid"].values == "E5").sum()) == 1
    row = ds.sel(expid="E5")
    assert float(row["cal"].max()) == pytest.approx(2 * float(open_archive(path).sel(
        expid="E6")["cal"].max()), rel=1e-3)
    assert ArchiveWriter(path).is_current("E5", "new")


def test_capacity_grows_with_the_archive_in_whole_blocks(tmp_path):
    # A resize writes every array's metadata: the larger the archive, the more rows at a
    # time (as many as it has, up to _GROWTH_MAX), always whole chunks of rows.
    from kspec_fluxcal.survey.archive import _BLOCK, _GROWTH_MAX, _capacity

    capacity, seen = 0, []
    for need in range(1, 5000, 37):
        if need > capacity:
            capacity = _capacity(need, capacity)
            seen.append(capacity)
    assert seen[:5] == [64, 128, 256, 512, 1024] and _GROWTH_MAX == 1024
    assert set(np.diff(seen[4:])) == {_GROWTH_MAX}
    assert _capacity(5000, 1024) == 5056 and _capacity(1, 0) == _BLOCK  # enough at once
    path = tmp_path / "archive.zarr"
    writer = ArchiveWriter(path)
    records = [archive_record(_calibrated(f"E{i}", 61000.2 + i), _stars(), None)
               for i in range(130)]
    for k in range(0, 130, 64):
        writer.append(records[k:k + 64])
    assert {a.shape[0] for a in writer._row_arrays.values()} == {256}
    assert list(open_archive(path)["expid"].values) == [f"E{i}" for i in range(130)]


def test_uncommitted_rows_are_invisible_and_repaired(tmp_path):
    path = tmp_path / "archive.zarr"
    writer = ArchiveWriter(path)
    writer.append([archive_record(_calibrated(f"E{i}", 61000.2 + i), _stars(), None)
                   for i in range(3)])
    # A job killed mid-append: data of a 4th row written and one array resized, no commit.
    writer.group["cal"][3] = np.ones(archive_grid().size, np.float32)
    writer.group["mjd"].resize((200,))
    ds = open_archive(path)
    assert ds.sizes["exposure"] == 3
    ArchiveWriter(path).append([archive_record(_calibrated("E9", 61010.0), _stars(), None)])
    ds = open_archive(path)
    assert list(ds["expid"].values) == ["E0", "E1", "E2", "E9"]
    assert np.isfinite(ds.sel(expid="E9")["mjd"].values)


def test_a_failed_write_commits_nothing_and_the_append_can_be_repeated(tmp_path):
    """The arrays of a commit are written together (one call to Zarr's loop): one that
    fails (a full disk) must leave the committed rows as they were, and the same append
    must then succeed."""
    path = tmp_path / "archive.zarr"
    writer = ArchiveWriter(path)
    writer.append([archive_record(_calibrated("E0", 61000.2), _stars(), None)])
    records = [archive_record(_calibrated(f"E{i}", 61000.2 + i), _stars(), None)
               for i in (1, 2)]
    real = writer._row_arrays["mjd"]

    class _Full:
        @staticmethod
        async def setitem(*args):
            raise OSError("No space left on device")

    class _Failing:
        shape, async_array = real.shape, _Full

    writer._row_arrays["mjd"] = _Failing
    with pytest.raises(OSError, match="No space left"):
        writer.append(records)
    assert writer.rows == 1 and list(open_archive(path)["expid"].values) == ["E0"]
    writer._row_arrays["mjd"] = real
    writer.append(records)
    ds = open_archive(path)
    assert list(ds["expid"].values) == ["E0", "E1", "E2"]
    np.testing.assert_array_equal(ds["mjd"].values, [61000.2, 61001.2, 61002.2])


def test_open_archive_errors(tmp_path):
    """Issue 16: `archive plot` on a non-archive said "not a calibration archive ('rows')"."""
    with pytest.raises(InputError, match="no such archive"):
        open_archive(tmp_path / "none.zarr")
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(InputError, match=r"x\.zarr: not a calibration archive: not a Zarr "
                                         r"store \(no zarr\.json\); expected the archive\.zarr "
                                         r"a survey job writes in its --out directory$"):
        open_archive(tmp_path / "x.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["title"] = "someone else's"
    for opener in (open_archive, ArchiveWriter):
        with pytest.raises(InputError, match=r"other\.zarr: not a calibration archive: a Zarr "
                                             r"store without the archive's attributes \(rows, "
                                             r"index\); expected the archive\.zarr"):
            opener(tmp_path / "other.zarr")


def test_groupby_night_and_plots(tmp_path):
    path = tmp_path / "archive.zarr"
    writer = ArchiveWriter(path)
    writer.append([archive_record(_calibrated(f"E{i}", 61000.5 + 0.05 * (i % 3) + (i // 3),
                                              level=1 + 0.05 * (i // 3)), _stars(), None)
                   for i in range(9)])
    ds = open_archive(path)
    band = (1 / (ds["cal"] * ds["exptime"])).sel(wavelength=slice(5000, 6000)).mean("wavelength")
    per_night = band.groupby("night").mean().compute()
    assert per_night.sizes["night"] == 3
    assert per_night.values[0] > per_night.values[1] > per_night.values[2]  # throughput drops
    written = plot_archive(ds, tmp_path / "plots")
    assert [p.name for p in written] == ["throughput_vs_time.png", "throughput_image.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_a_second_writer_cannot_overwrite_committed_rows(tmp_path):
    """Issue 16: two writers on one archive each appended at the row count they had read,
    the later commit silently replacing the earlier one's rows and index. The second writer
    now refuses to commit over rows it did not write; the first writer's rows stay."""
    path = tmp_path / "archive.zarr"
    first, second = ArchiveWriter(path), ArchiveWriter(path)
    first.append([archive_record(_calibrated("A1", 61000.2), _stars(), None)])
    with pytest.raises(InputError, match=r"archive\.zarr: another writer committed 1 row\(s\) "
                                         r"since this one opened it"):
        second.append([archive_record(_calibrated("B1", 61000.3), _stars(), None)])
    ds = open_archive(path)
    assert list(ds["expid"].values) == ["A1"]
    assert float(ds["mjd"].values[0]) == 61000.2


def _readme_block(title):
    """The first python block after the README heading ``title``."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index(f"## {title}"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_throughput_example_has_units(tmp_path, monkeypatch):
    """Issue 16: the README's throughput kept cal's units attr (the inverse of a throughput)
    and exptime had none. Run the README's example on a small archive."""
    import matplotlib

    matplotlib.use("Agg")
    path = tmp_path / "archive.zarr"
    ArchiveWriter(path).append([archive_record(_calibrated(f"KS2026110{1 + i // 2}_000{i}",
                                                           61345.5 + i * 0.4), _stars(), None)
                                for i in range(4)])
    code = _readme_block("Throughput over time").replace(
        "store/demo/calibrated/archive.zarr", str(path))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    ds, throughput = namespace["ds"], namespace["tput"]
    assert ds["exptime"].attrs["units"] == "s"
    assert ds["cal"].attrs["units"] == "1e-17 erg/(s cm2 Angstrom) / (count/Angstrom)"
    for name in ("cal_smooth", "own_smooth"):  # every spectrum has its units
        assert ds[name].attrs["units"] == ds["cal"].attrs["units"]
    assert ds["own_smooth_variance"].attrs["units"] == ds["cal_variance"].attrs["units"] == \
        "(1e-17 erg/(s cm2 Angstrom) / (count/Angstrom))**2"
    assert throughput.attrs["units"] == "count/(s Angstrom) / (1e-17 erg/(s cm2 Angstrom))"
    assert "throughput" in throughput.attrs["long_name"]
    expected = 1 / (ds["cal"] * ds["exptime"])
    xr.testing.assert_allclose(throughput, expected)


def test_plain_xarray_users_are_told_to_use_open_archive(tmp_path):
    """Issue 16: xr.open_zarr shows pre-allocated empty rows and superseded ones; the store
    says so, and how to read it, where plain xarray shows it (its attrs)."""
    path = tmp_path / "archive.zarr"
    ArchiveWriter(path).append([archive_record(_calibrated("E1", 61000.2), _stars(), None)])
    raw = xr.open_zarr(path, consolidated=False)
    assert raw.sizes["exposure"] == 64  # the capacity, not the one row
    assert "kspec_fluxcal.survey.open_archive" in raw.attrs["how_to_read"]
    assert "pre-allocated" in raw.attrs["how_to_read"]
    assert "how_to_read" not in open_archive(path).attrs  # not true of the opened dataset


@pytest.fixture
def three_nights(tmp_path):
    """Nine exposures on three nights, each night's throughput lower; one setup covers less
    of the archive grid (NaN columns at its ends)."""
    path = tmp_path / "archive.zarr"
    ArchiveWriter(path).append([archive_record(
        _calibrated(f"E{i}", 61000.5 + 0.05 * (i % 3) + (i // 3), level=1 + 0.05 * (i // 3)),
        _stars(), None) for i in range(9)])
    return open_archive(path)


def test_throughput_plot_has_dates_and_no_lines_across_nights(three_nights):
    """Issue 16: the MJD axis had a '+6.134e4' offset, and lines joined points across the
    day gaps."""
    import matplotlib.dates as mdates

    fig = archive_figures(three_nights)["throughput_vs_time"]
    ax = fig.axes[0]
    fig.canvas.draw()
    assert isinstance(ax.xaxis.get_major_formatter(), mdates.ConciseDateFormatter)
    assert "e4" not in ax.xaxis.get_offset_text().get_text()
    assert "UT" in ax.get_xlabel()
    assert sorted(t.get_text() for t in ax.texts) == [
        f"night {n}" for n in np.unique(three_nights["night"].values)]
    lines = [line for line in ax.get_lines() if line.get_label().endswith(" A")]
    assert len(lines) == 4
    for line in lines:
        y = np.asarray(line.get_ydata(), dtype=float)
        assert np.isnan(y).sum() == 2 and y.size == 9 + 2  # a break between nights


def test_throughput_image_is_labelled_and_centred_on_one(three_nights):
    """Issue 16: fractional exposure ticks with no EXPID or night, a colour scale not centred
    on 1, NaN stripes left unexplained."""
    fig = archive_figures(three_nights)["throughput_image"]
    ax = fig.axes[0]
    ticks = ax.get_yticks()
    assert np.array_equal(ticks, np.round(ticks)) and len(ticks) == 9
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0].startswith("E0") and all(labels)
    assert "night" in ax.get_ylabel()
    (image,) = ax.collections
    assert image.norm.vmin + image.norm.vmax == pytest.approx(2.0)
    assert image.cmap.get_bad()[3] == 1.0  # an opaque colour for 'no measurement'
    assert any("no measurement" in t.get_text() for legend in fig.legends
               for t in legend.get_texts())


def test_rows_record_quality_tellurics_and_provenance(tmp_path):
    calibrated = _calibrated("A", 61000.6)
    calibrated.attrs.update(fcalqual="B", fcalmerr=0.012, fcallsf=1.021, fcalo2=1.31,
                            fcalh2o=2.4)
    writer = ArchiveWriter(tmp_path / "a.zarr")
    writer.append([archive_record(calibrated, _stars(), None,
                                  provenance={"grid_id": "g123", "config_hash": "c456"})])
    ds = open_archive(tmp_path / "a.zarr")
    row = ds.sel(expid="A")
    assert str(row["fcalqual"].values) == "B" and float(row["fcalo2"]) == 1.31
    assert float(row["fcalh2o"]) == 2.4 and float(row["fcallsf"]) == 1.021
    assert str(row["grid_id"].values) == "g123" and str(row["config_hash"].values) == "c456"
    assert str(row["version"].values) == __version__
    assert ds.attrs["schema_version"] == SCHEMA_VERSION


def test_an_older_archive_is_migrated_and_a_newer_one_refused(tmp_path):
    """A schema-1 archive (before quality, tellurics and provenance): the writer adds the new
    arrays, its old rows keep their values and read back with empty new fields."""
    path = tmp_path / "old.zarr"
    writer = ArchiveWriter(path)
    writer.append([archive_record(_calibrated("OLD", 61000.6), _stars(), None,
                                  input_hash="h-old")])
    group = zarr.open_group(path, mode="r+")
    for name in ("fcalqual", "fcalmerr", "fcallsf", "fcalo2", "fcalh2o", "version", "grid_id",
                 "config_hash", "cal_smooth"):
        del group[name]
    group.attrs["schema_version"] = 1
    writer = ArchiveWriter(path)
    calibrated = _calibrated("NEW", 61001.6)
    calibrated.attrs["fcalqual"] = "A"
    writer.append([archive_record(calibrated, _stars(), None)])
    ds = open_archive(path)
    assert list(ds["expid"].values) == ["OLD", "NEW"]
    assert str(ds.sel(expid="OLD")["fcalqual"].values) == ""
    assert str(ds.sel(expid="NEW")["fcalqual"].values) == "A"
    assert np.isnan(ds.sel(expid="OLD")["cal_smooth"].values).all()
    assert ds.attrs["schema_version"] == SCHEMA_VERSION
    assert writer.is_current("OLD", "h-old")  # --resume keeps working across the change
    zarr.open_group(path, mode="r+").attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(InputError, match=rf"newer kspec-fluxcal \(archive schema "
                                         rf"{SCHEMA_VERSION + 1}, this one knows "
                                         rf"{SCHEMA_VERSION}\)"):
        ArchiveWriter(path)


def test_star_fields_have_units(tmp_path):
    """The standards' parameters in the archive carry their units (Teff in K, RV in km/s...),
    also in an archive written before they were stored."""
    path = tmp_path / "archive.zarr"
    ArchiveWriter(path).append([archive_record(_calibrated("U1", 61000.2), _stars(), None)])
    expected = {"star_teff": "K", "star_logg": "dex", "star_feh": "dex", "star_rv": "km/s",
                "star_ebv": "mag", "star_snr": "1"}
    ds = open_archive(path)
    assert {name: ds[name].attrs.get("units") for name in expected} == expected
    group = zarr.open_group(path, mode="r+")
    for name in expected:  # as an older package wrote them
        del group[name].attrs["units"]
    ds = open_archive(path)
    assert {name: ds[name].attrs.get("units") for name in expected} == expected


@pytest.fixture
def with_model_rows(tmp_path):
    """Four exposures of one night: two measured (throughputs 1 and 1.1), two calibrated from
    the survey model alone (FCALSRC 'model', throughput 2)."""
    path = tmp_path / "archive.zarr"
    records = []
    for i, (level, source) in enumerate([(1.0, "standards"), (1 / 1.1, "standards+model"),
                                         (0.5, "model"), (0.5, "model")]):
        calibrated = _calibrated(f"M{i}", 61000.5 + 0.05 * i, level=level)
        calibrated.attrs["fcalsrc"] = source
        records.append(archive_record(calibrated, _stars(), None))
    ArchiveWriter(path).append(records)
    return open_archive(path)


def test_throughput_plots_mark_the_model_predictions(with_model_rows):
    """FCALSRC 'model' rows are the model's prediction, not measurements: the throughput
    curves drew them as measured points, and the image's 'survey median' counted them."""
    figures = archive_figures(with_model_rows)
    ax = figures["throughput_vs_time"].axes[0]
    opened = [line for line in ax.get_lines() if line.get_markerfacecolor() == "none"]
    assert len(opened) == 4 and all(len(line.get_xdata()) == 2 for line in opened)
    for line in (line for line in ax.get_lines() if line.get_label().endswith(" A")):
        assert list(line.get_markevery()) == [True, True, False, False]
    # The legend below the axes (inside, it covered the last night's name).
    assert ax.get_legend() is None
    texts = [t.get_text() for legend in figures["throughput_vs_time"].legends
             for t in legend.get_texts()]
    assert any("model (2)" in t for t in texts)
    ax = figures["throughput_image"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert [label.endswith("model)") for label in labels] == [False, False, True, True]
    rel = ax.collections[0].get_array().reshape(4, -1)
    grid = with_model_rows["wavelength"].values
    inside = (grid > 4000) & (grid < 8000)
    np.testing.assert_allclose(rel[:, inside].mean(axis=1), [1 / 1.05, 1.1 / 1.05, 2 / 1.05,
                                                             2 / 1.05], rtol=1e-4)


def _same_record(a, b):
    """Equal archive records: the same keys in order, spectra bit for bit."""
    import pickle

    assert list(a) == list(b)
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes()
        else:
            assert pickle.dumps(a[name]) == pickle.dumps(b[name]), name


def test_records_travel_lean_and_arrive_whole():
    """Pickled (a task's result), a record sends its spectra inside the exposure's range,
    own_smooth by name when it is cal_smooth, the mask as bits; one whose spectrum is not
    its fill value outside the range (a NaN of another sign too) sends that one whole.
    Unpickled, each is the record sent, bit for bit."""
    import pickle

    wave = np.linspace(3600.0, 8400.0, 800)
    rec = archive_record(_calibrated("A", 61000.6, wave=wave), _stars(), None)
    rec["cal_mask"][2000:2100:3] = False
    rec["cal_smooth"] = rec["own_smooth"] = rec["cal"] * 1.5
    whole = pickle.dumps({k: v.copy() if isinstance(v, np.ndarray) else v  # as before
                          for k, v in rec.items()}, protocol=pickle.HIGHEST_PROTOCOL)
    lean = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(lean) < 0.6 * len(whole)
    back = pickle.loads(lean)
    _same_record(rec, back)
    assert back["own_smooth"] is back["cal_smooth"]
    own = {"own_smooth": rec["cal"].copy(), "own_smooth_variance": rec["cal"].copy(),
           "star": rec["star"]}
    own["own_smooth"][0] = 1.0
    own["own_smooth_variance"][-1] = -np.nan
    other = archive_record(_calibrated("A", 61000.6, wave=wave), None, None, own=own)
    sent = pickle.dumps(other, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(lean) < len(sent) < len(whole)
    _same_record(other, pickle.loads(sent))
