"""QC plots and summary: every file written, atomically, readable, for any number of stars."""

from __future__ import annotations

import dataclasses
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from kspec_fluxcal import qc
from kspec_fluxcal._atomic import TEMP_PREFIX
from kspec_fluxcal.calibration import apply_calibration, combine_vectors
from kspec_fluxcal.constants import CAL_UNIT, FLUX_UNIT
from kspec_fluxcal.errors import ExposureError, FluxCalWarning
from kspec_fluxcal.exposure import open_exposure, red_hdulist
from kspec_fluxcal.lsf import LineSpread
from kspec_fluxcal.pipeline import CalibrationResult
from kspec_fluxcal.products import write_calibrated
from kspec_fluxcal.qc import QC_PLOTS, qc_from_file, write_qc
from kspec_fluxcal.telluric import transmission

NPIX = 400
EXPID = "QC0042"
BANDS = ["gaiadr2-BP", "panstarrs-g", "panstarrs-r", "gaiadr2-G", "panstarrs-i"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Standards: fibers 0-4; program fibers 5 (faint) and 6 (bright); sky 7.
TYPES = ["C", "C", "C", "C", "C", "P", "P", "S"]
FIT_REJECT = "S/N 3.0 < 5"


def _wave():
    return np.linspace(4000.0, 8000.0, NPIX)


LSF = LineSpread.constant(6.0)
COLUMNS = (1.2, 2.0)  # O2 (airmasses) and H2O (cm) the telluric model should find


def _true_cal(wave):
    """A throughput-like vector: steep in the blue, with telluric bumps (counts are lower
    in the bands, so model / counts is higher)."""
    cal = 0.02 * (1.0 + 3.0 * ((wave - 6200.0) / 2200.0) ** 2)
    return cal / transmission(wave, LSF, *COLUMNS)


def _stars(fibers, grey, status, tilt=None, seed=1):
    """A per-star Dataset shaped like fit_standards' result."""
    rng = np.random.default_rng(seed)
    wave = _wave()
    n = len(fibers)
    tilt = np.zeros(n) if tilt is None else np.asarray(tilt, dtype=float)
    shape = 1.0 + tilt[:, None] * (wave - 6000.0) / 2000.0
    cal = np.asarray(grey)[:, None] * _true_cal(wave) * shape
    cal = cal * (1.0 + 0.004 * rng.standard_normal(cal.shape))
    var = (0.004 * cal) ** 2
    cal_mask = np.ones((n, NPIX), dtype=bool)
    cal_mask[:, 120:126] = False  # a line core
    bad = np.array([s != "ok" and s.startswith("S/N") for s in status])
    cal[bad] = np.nan  # a star rejected by the fit may have no vector at all
    var[bad] = np.nan
    lines = 1.0 - 0.5 * np.exp(-0.5 * ((wave - 6563.0) / 4.0) ** 2)
    model_norm = np.tile(lines, (n, 1))
    obs_norm = model_norm + 0.01 * rng.standard_normal((n, NPIX))
    match_mask = np.ones((n, NPIX), dtype=bool)
    match_mask[:, (wave > 7590) & (wave < 7700)] = False
    mag_obs = 15.0 + 0.1 * np.arange(len(BANDS)) + np.zeros((n, 1))
    resid = 0.01 * rng.standard_normal((n, len(BANDS)))
    resid[0, 3] = 0.3  # an outlier band, dropped by the fit
    band_used = np.ones((n, len(BANDS)), dtype=bool)
    band_used[0, 3] = False
    dropped = np.array(["gaiadr2-G"] + [""] * (n - 1), dtype=object)
    per_star = {
        "teff": 5800.0 + 100 * np.arange(n), "logg": np.full(n, 4.3), "feh": np.full(n, -0.2),
        "alpha": np.zeros(n), "ebv": np.full(n, 0.03), "rv": np.linspace(-50, 50, n),
        "scale": np.full(n, 1e-21), "scale_err": np.full(n, 1e-23), "chi2_dof": np.full(n, 1.1),
        "phot_rms": np.full(n, 0.01), "snr": np.full(n, 80.0), "n_bands": np.full(n, 5),
    }
    coords = {
        "fiber": ("star", np.asarray(fibers)),
        "objid": ("star", 5000 + np.asarray(fibers)),
        "fiber_name": ("star", np.array([f"s{f:02d}" for f in fibers])),
        **{k: ("star", v) for k, v in per_star.items()},
        "dropped_bands": ("star", dropped),
        "status": ("star", np.array(status, dtype=object)),
        "wavelength": ("wavelength", wave, {"units": "Angstrom"}),
        "band": ("band", np.array(BANDS)),
    }
    # Gaia XP spectra (issue 15): every star has one, the first is not used.
    xp_wave = np.linspace(3360.0, 10200.0, 343)
    inside = (xp_wave > 4200.0) & (xp_wave < 7800.0)
    xp_model = np.where(inside, 50.0 * (xp_wave / 6000.0) ** -1, np.nan)
    xp_flux = 50.0 * (xp_wave / 6000.0) ** -1 * (1.0 + 0.01 * rng.standard_normal((n, 343)))
    coords.update(xp_used=("star", np.arange(n) > 0), xp_ratio=("star", np.full(n, 1.01)),
                  xp_rms=("star", np.full(n, 0.012)), xp_match=("star", np.full(n, "source_id")),
                  xp_wavelength=("xp_wavelength", xp_wave, {"units": "Angstrom"}))
    xp = {"xp_flux": xp_flux, "xp_flux_error": 0.01 * xp_flux,
          "xp_model": np.tile(xp_model, (n, 1)), "xp_model_warped": np.tile(xp_model, (n, 1))}
    return xr.Dataset(
        {
            **{k: (("star", "xp_wavelength"), v) for k, v in xp.items()},
            "cal": (("star", "wavelength"), cal, {"units": CAL_UNIT}),
            "cal_variance": (("star", "wavelength"), var),
            "cal_mask": (("star", "wavelength"), cal_mask),
            "model_flux": (("star", "wavelength"), np.full((n, NPIX), 50.0)),
            "obs_norm": (("star", "wavelength"), obs_norm),
            "model_norm": (("star", "wavelength"), model_norm),
            "match_mask": (("star", "wavelength"), match_mask),
            "mag_obs": (("star", "band"), mag_obs),
            "mag_model": (("star", "band"), mag_obs - resid),
            "phot_resid": (("star", "band"), np.where(band_used, resid, np.nan)),
            "band_used": (("star", "band"), band_used),
        },
        coords=coords,
        attrs={"lsf_fwhm_coeffs": list(LSF.coeffs), "airmass": COLUMNS[0]},
    )


def _red_file(path):
    wave = _wave()
    cal = _true_cal(wave)
    spectrum = 100.0 * (wave / 6000.0) ** -2
    level = np.array([1, 1, 1, 1, 1, 0.2, 3.0, 0.01])[:, None]
    counts = level * spectrum / cal
    counts[7] += 5.0
    header = {"EXPTIME": 900.0, "MJD-OBS": 61000.25, "EXPID": EXPID, "SPECFWHM": 6.0}
    fibres = {
        "NAME": np.array([f"s{i:02d}" for i in range(len(TYPES))]),
        "TYPE": np.array(TYPES),
        "RA": 150.0 + 0.01 * np.arange(len(TYPES)),
        "DEC": np.full(len(TYPES), 2.0),
        "OBJID": 5000 + np.arange(len(TYPES)),
    }
    red_hdulist(counts, np.abs(counts) + 4.0, fibres, header, wavelength=wave).writeto(path)
    return path


def _result(exposure, stars):
    with pytest.warns(FluxCalWarning) if _n_ok(stars) == 1 else _no_context():
        calibration = combine_vectors(stars)
    calibrated = apply_calibration(exposure, calibration)
    stars = stars.assign(star_status=("star", calibration["star_status"].values))
    return CalibrationResult(calibrated, stars, calibration, None, ("a note from the fit",))


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _n_ok(stars):
    return int(sum(s == "ok" for s in stars["status"].values))


@pytest.fixture(scope="module")
def exposure(tmp_path_factory):
    return open_exposure(_red_file(tmp_path_factory.mktemp("red") / "red.fits"))


@pytest.fixture(scope="module")
def many(exposure):
    """Five standards: three good, one whose shape is off (rejected in the combination) and
    one rejected by the fit."""
    stars = _stars([0, 1, 2, 3, 4], grey=[1.0, 0.9, 1.1, 0.95, 1.0],
                   status=["ok", "ok", "ok", "ok", FIT_REJECT], tilt=[0, 0, 0, 0.3, 0])
    return _result(exposure, stars)


@pytest.fixture(scope="module")
def single(exposure):
    return _result(exposure, _stars([1], grey=[0.9], status=["ok"]))


@pytest.fixture(scope="module")
def many_qc(many, tmp_path_factory):
    """Drawn once: the figures take most of this module's time."""
    out = tmp_path_factory.mktemp("qc") / "nested" / "dir"
    return out, write_qc(many, out)


@pytest.fixture
def only(monkeypatch):
    """Draw only some kinds of plot (the summary is always written), for speed."""

    def select(*kinds):
        monkeypatch.setattr(qc, "QC_PLOTS", kinds)

    return select


def _assert_png(path, min_width=900):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000
    image = matplotlib.image.imread(path)
    assert image.shape[1] >= min_width and image.shape[0] >= 400
    assert image[..., :3].std() > 0.05  # not a blank canvas


def _no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


# ----------------------------------------------------------------------------- from a result


def test_write_qc_writes_every_file(many_qc):
    out, paths = many_qc
    expected = [f"{EXPID}_{kind}.png" for kind in QC_PLOTS] + [f"{EXPID}_summary.txt"]
    assert [p.name for p in paths] == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for path in paths[:-1]:
        _assert_png(path)
    assert _no_temp_files(out) == []


def test_summary_lists_stars_reasons_and_scatter(many, many_qc):
    text = many_qc[1][-1].read_text()
    rms = many.calibration.attrs["fcalrms"]
    assert np.isfinite(rms)
    assert EXPID in text
    assert f"{rms:.5f}" in text and f"{100 * rms:.2f}%" in text
    assert "standards used (FCALNSTR): 3 of 5" in text
    assert "single-star calibration: no" in text
    status = list(many.calibration["star_status"].values)
    assert status[3].startswith("rejected in combination") and status[4] == FIT_REJECT
    for s in status:
        assert s in text
    rejected = text.split("rejected (2):")[1].split("warnings")[0]
    assert "fiber 3 (s03)" in rejected and "fiber 4 (s04)" in rejected
    assert "fiber 0" not in rejected
    assert "a note from the fit" in text
    for entry in many.calibrated.attrs["history"]:
        assert entry in text
    # The per-star table carries the parameters.
    assert "5800" in text and "gaiadr2-G" in text


def test_single_star(single, tmp_path, only):
    only("residuals")
    paths = write_qc(single, tmp_path)
    assert [p.name for p in paths] == [f"{EXPID}_residuals.png", f"{EXPID}_summary.txt"]
    _assert_png(paths[0])
    text = paths[-1].read_text()
    assert "single-star calibration: yes" in text
    assert "n/a (one star)" in text
    assert "1 of 1" in text


def test_lazy_result_and_threads(many, single, tmp_path):
    """Dask-backed members are computed; two exposures drawn at once in worker threads."""
    lazy = CalibrationResult(many.calibrated.chunk({"fiber": 3}), many.stars.chunk({"star": 2}),
                             many.calibration, None, ())
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(write_qc, r, tmp_path / name)
                for r, name in ((lazy, "a"), (single, "b"))]
        results = [j.result() for j in jobs]
    assert all(len(r) == len(QC_PLOTS) + 1 for r in results)
    for path in results[0][:-1]:
        _assert_png(path)


def test_pyplot_is_never_used(many, tmp_path, monkeypatch):
    """The global pyplot state of an interactive session must not be touched."""

    class NoPyplot(types.ModuleType):
        def __getattr__(self, name):
            raise AssertionError(f"matplotlib.pyplot.{name} used by the QC")

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", NoPyplot("matplotlib.pyplot"))
    assert len(write_qc(many, tmp_path)) == len(QC_PLOTS) + 1


def test_failed_write_leaves_old_files_and_no_temp(many, tmp_path, monkeypatch, only):
    only("calibration", "spectrum")
    write_qc(many, tmp_path)
    assert len(list(tmp_path.iterdir())) == 3
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(self, fh, **kwargs):
        fh.write(b"\x89PNG half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_qc(many, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _no_temp_files(tmp_path) == []


def test_an_interrupted_set_publishes_nothing(many, tmp_path, monkeypatch, only):
    """Ctrl-C while the third plot is drawn: the two drawn before are not published alone
    (a set of some plots and no summary would pass for a complete one), no temporary file
    is left; the next run writes the whole set."""
    only("calibration", "spectrum", "photometry")

    def interrupted(data):
        raise KeyboardInterrupt

    monkeypatch.setattr(qc, "_plot_photometry", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_qc(many, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    only("calibration", "spectrum")
    assert len(write_qc(many, tmp_path)) == 3 and _no_temp_files(tmp_path) == []


def test_plots_are_labelled_and_robust_to_wild_pixels(many):
    """Titles name the exposure, axes carry units, and one wild pixel does not set the scale."""
    stars = many.stars.copy(deep=True)
    stars["cal"][0, 200] = 1e4
    stars["obs_norm"][1, 50] = 1e3
    wild = CalibrationResult(many.calibrated, stars, many.calibration, None, ())
    data = qc._from_result(wild, "telluric_default")
    figs = {kind: getattr(qc, f"_plot_{kind}")(data)[0] for kind in QC_PLOTS}
    for kind, fig in figs.items():
        ax = fig.axes[0]
        assert EXPID in (ax.get_title() + (fig.get_suptitle() or "")), kind
    assert CAL_UNIT in figs["calibration"].axes[0].get_ylabel()
    assert FLUX_UNIT in figs["spectrum"].axes[0].get_ylabel()
    assert "mag" in figs["photometry"].axes[0].get_ylabel()
    assert "Angstrom" in figs["residuals"].axes[0].get_xlabel()
    assert max(figs["calibration"].axes[0].get_ylim()) < 1.0
    assert max(np.abs(figs["residuals"].axes[0].get_ylim())) <= 0.1
    assert max(figs["template_match"].axes[1].get_ylim()) < 2.0
    # Bands in wavelength order (PS1 g is bluer than Gaia BP), whatever the dataset's order.
    ticks = [t.get_text().split("\n")[0] for t in figs["photometry"].axes[0].get_xticklabels()]
    assert ticks[:2] == ["panstarrs-g", "gaiadr2-BP"]
    # The brightest program fiber is shown, in a title that fits the figure (it ran off it).
    assert "fiber 6" in figs["spectrum"].axes[0].get_title()
    fig = figs["spectrum"]
    fig.canvas.draw()
    box = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width
    # Percent ticks say their value (a fixed .0f labelled +2.5 % as "+3%").
    ax = figs["residuals"].axes[0]
    ax.set_ylim(-0.075, 0.075)
    formatter = ax.yaxis.get_major_formatter()
    for value in (-0.075, -0.025, 0.0, 0.005, 0.025):
        label = formatter(value, 0)
        assert float(label.rstrip("%")) == pytest.approx(100 * value), label


# ----------------------------------------------------------------------------- from a file


def test_qc_from_file_with_stars(many, tmp_path):
    path = write_calibrated(many.calibrated, tmp_path / "x_fluxcal.fits", stars=many.stars)
    paths = qc_from_file(path, tmp_path / "qc")
    assert [p.name for p in paths] == ([f"{EXPID}_{k}.png" for k in QC_PLOTS]
                                       + [f"{EXPID}_summary.txt"])
    for p in paths[:-1]:
        _assert_png(p)
    text = paths[-1].read_text()
    rms = many.calibration.attrs["fcalrms"]
    assert f"{100 * rms:.2f}%" in text
    assert "standards used (FCALNSTR): 3 of 5" in text
    for s in many.calibration["star_status"].values:
        assert s in text
    # HISTORY cards are 72 characters: long entries come back whole.
    for entry in many.calibrated.attrs["history"]:
        assert len(entry) > 72 and entry in text
    assert _no_temp_files(tmp_path / "qc") == []


def test_qc_from_file_without_stars(many, tmp_path):
    path = write_calibrated(many.calibrated, tmp_path / "x_fluxcal.fits")
    paths = qc_from_file(path, tmp_path / "qc")
    assert [p.name for p in paths] == [f"{EXPID}_calibration.png", f"{EXPID}_spectrum.png",
                                       f"{EXPID}_summary.txt"]
    for p in paths[:-1]:
        _assert_png(p)
    text = paths[-1].read_text()
    assert "FCALSTAR" in text and "not drawn" in text
    assert f"{100 * many.calibration.attrs['fcalrms']:.2f}%" in text
    # The grade and what it rests on, not only inside a HISTORY line.
    attrs = many.calibration.attrs

    def shown(key, form):
        return form.format(attrs[key]) if np.isfinite(attrs[key]) else "n/a"

    assert f"quality grade (FCALQUAL): {attrs['fcalqual']}\n" in text
    assert f"model error of the standards (FCALMERR): {shown('fcalmerr', '{:.2%}')}\n" in text
    assert (f"telluric columns (FCALO2, FCALH2O): O2 {shown('fcalo2', '{:.3f}')}, "
            f"H2O {shown('fcalh2o', '{:.3f}')}\n") in text
    assert np.isfinite(attrs["fcalo2"])  # the fixture has a telluric fit to show


def test_qc_from_file_single_star(single, tmp_path):
    path = write_calibrated(single.calibrated, tmp_path / "one.fits", stars=single.stars)
    text = qc_from_file(path, tmp_path)[-1].read_text()
    # FCALRMS is -1 in the header for one star: that is "n/a", not -100%. (Not "-100"
    # alone: the text names its files, and pytest's temporary directories count up to
    # pytest-100.)
    assert "n/a (one star)" in text and "-100%" not in text and "-100.00%" not in text
    assert "single-star calibration: yes" in text


def test_qc_from_file_no_usable_star(many, tmp_path):
    """A calibration from elsewhere, with a star table in which every star was rejected."""
    stars = many.stars.assign(star_status=("star", np.array(
        ["no catalog match", FIT_REJECT, "chi2/dof 9.0 > 5", "no usable template",
         "photometric rms 0.3 > 0.1 mag"])))
    calibrated = many.calibrated.copy()
    calibrated.attrs.update(fcalnstr=0, fcalrms=np.nan, fcalsrc="nightly")
    path = write_calibrated(calibrated, tmp_path / "zero.fits", stars=stars)
    paths = qc_from_file(path, tmp_path / "qc")
    assert len(paths) == len(QC_PLOTS) + 1
    text = paths[-1].read_text()
    assert "standards used (FCALNSTR): 0 of 5" in text and "nightly" in text
    assert "rejected (5):" in text
    for s in stars["star_status"].values:
        assert s in text


def test_qc_from_file_refuses_uncalibrated(tmp_path):
    path = _red_file(tmp_path / "red.fits")
    with pytest.raises(ExposureError, match="not a calibrated file"):
        qc_from_file(path, tmp_path / "qc")
    assert not (tmp_path / "qc").exists() or not any((tmp_path / "qc").iterdir())


def test_qc_from_file_uses_stored_grey_levels(many, tmp_path, only):
    only()
    """When the star table carries the combination's grey levels, they are reported as is."""
    stars = many.stars.assign(grey_level=("star", [0.5, 0.25, 0.125, np.nan, np.nan]),
                              used=("star", many.calibration["used"].values))
    path = write_calibrated(many.calibrated, tmp_path / "g.fits", stars=stars)
    text = qc_from_file(path, tmp_path / "qc")[-1].read_text()
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert [r[4] for r in rows[:2]] == ["0.500", "0.250"]


def test_qc_from_file_one_band_table(many, tmp_path, only):
    """A one-band FCALSTAR (vector columns of length 1) must not stop the QC."""
    only("calibration", "residuals", "photometry")
    path = write_calibrated(many.calibrated, tmp_path / "b.fits",
                            stars=many.stars.isel(band=[0]))
    names = [p.name for p in qc_from_file(path, tmp_path / "qc")]
    assert f"{EXPID}_calibration.png" in names and f"{EXPID}_residuals.png" in names
    assert names[-1] == f"{EXPID}_summary.txt"


def test_a_star_table_without_its_widths_is_an_input_error(many, tmp_path):
    """A FCALSTAR rewritten without its NWAVE and BANDS keywords (e.g. emptied with
    astropy) was an 'internal error' from xarray; it is a damaged file, said so."""
    path = write_calibrated(many.calibrated, tmp_path / "w.fits", stars=many.stars)
    with fits.open(path, mode="update") as hdul:
        del hdul["FCALSTAR"].header["NWAVE"], hdul["FCALSTAR"].header["BANDS"]
    with pytest.raises(ExposureError, match="HDU FCALSTAR: columns of inconsistent widths, "
                       "NWAVE = missing, BANDS = missing"):
        qc_from_file(path, tmp_path / "qc")


def test_a_failing_plot_costs_only_itself(many, tmp_path, monkeypatch, only):
    """A drawing bug on odd data is reported (warning, summary); the other files are written.
    Write errors (disk full) still raise: see test_failed_write_leaves_old_files_and_no_temp."""
    only("calibration", "photometry")

    def broken(data):
        raise ValueError("odd data")

    monkeypatch.setattr(qc, "_plot_photometry", broken)
    with pytest.warns(FluxCalWarning, match="photometry.png not drawn"):
        paths = write_qc(many, tmp_path)
    assert [p.name for p in paths] == [f"{EXPID}_calibration.png", f"{EXPID}_summary.txt"]
    assert "photometry.png: drawing failed (ValueError: odd data)" in paths[-1].read_text()


# ----------------------------------------------------------------------------- issue 16


def _overlaps(fig, axis):
    """Pairs of visible tick labels of ``axis`` (major and minor) that overlap when drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = sorted(axis.get_view_interval())
    ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    boxes = [t.label1.get_window_extent(renderer) for t in ticks
             if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]
    return boxes, [(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1:] if a.overlaps(b)]


@pytest.mark.parametrize("steepness", [0, 3, 4])
def test_log_axis_labels_do_not_crowd(many, steepness):
    """Issue 16: on the calibration's log axis every minor tick was labelled (crowded, up to
    overlapping) when the vector spans less than 30x, and only the decades when more."""
    data = qc._from_result(many, "telluric_default")
    data = dataclasses.replace(data, stars=None,
                               cal=data.cal * (data.wavelength / 4000.0) ** -steepness)
    fig, _ = qc._plot_calibration(data)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    boxes, overlapping = _overlaps(fig, ax.yaxis)
    assert 3 <= len(boxes) <= 8 and overlapping == []


def test_template_panel_shows_the_whole_template(many):
    """Issue 16: the template panel was clipped (at ~1.2): a template is noiseless, all of it
    that is compared must be in view (only the observed spectrum's cosmics are clipped)."""
    stars = many.stars.copy(deep=True)
    stars["model_norm"][0, 300:302] = 1.35
    stars["obs_norm"][0, 310] = 40.0  # a cosmic: still clipped
    data = qc._from_result(CalibrationResult(many.calibrated, stars, many.calibration, None, ()),
                           "telluric_default")
    fig, _ = qc._plot_template_match(data)
    low, high = fig.axes[0].get_ylim()
    assert 1.35 <= high < 2.0


def _photometry(many, **changes):
    stars = many.stars.copy(deep=True)
    stars["mag_err"] = (("star", "band"), np.full((stars.sizes["star"], len(BANDS)), 0.01))
    for name, value in changes.items():
        stars[name] = stars[name].copy(data=value(stars[name].values))
    data = qc._from_result(CalibrationResult(many.calibrated, stars, many.calibration, None, ()),
                           "telluric_default")
    fig, _ = qc._plot_photometry(data)
    return fig


def test_photometry_error_bars_are_not_clipped(many):
    """Issue 16: error bars ran out of the photometry panel."""
    def larger(err):
        err = np.array(err, dtype=float)
        err[1, 2] = 0.15  # one band of a used star much less certain than the others
        return err

    fig = _photometry(many, mag_err=larger)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    segments = [seg for c in ax.collections for seg in c.get_segments()]
    assert segments
    for seg in segments:
        assert low <= seg[:, 1].min() and seg[:, 1].max() <= high, (seg, (low, high))


def test_photometry_legend_lists_only_markers_shown(many):
    """Issue 16: the legend explained hollow and crossed markers that were not drawn."""
    def labels(fig):
        return [t.get_text() for legend in fig.legends for t in legend.get_texts()]

    shown = labels(_photometry(many))  # star 0 has a band dropped as an outlier
    assert "dropped as outlier" in shown and "measured, not used in the fit" in shown
    clean = labels(_photometry(many, band_used=lambda v: np.ones_like(v),
                               dropped_bands=lambda v: np.full_like(v, "")))
    assert "dropped as outlier" not in clean
    assert "measured, not used in the fit" not in clean


def test_telluric_plot_shows_the_fitted_columns(many, many_qc):
    """The telluric page is drawn from the combination's own fit, which finds the columns the
    vectors were made with."""
    attrs = many.calibration.attrs
    assert attrs["fcalo2"] == pytest.approx(COLUMNS[0], rel=0.1)
    assert attrs["fcalh2o"] == pytest.approx(COLUMNS[1], rel=0.15)
    _assert_png(many_qc[0] / f"{EXPID}_telluric.png")
