"""Quality-control plots and a text summary of one calibrated exposure.

The astronomer judges a calibration by looking at it: the combined vector and each star's,
how far every star departs from the combination, how well each template matches, how the
catalog photometry agrees with the scaled models, each standard's Gaia XP spectrum against
its model (when XP spectra were given), and one calibrated science spectrum.
Files are ``<expid>_<kind>.png`` and ``<expid>_summary.txt`` in the output directory, each
written atomically.

Figures are drawn with :class:`matplotlib.figure.Figure` on an explicit Agg canvas, never
through pyplot: no global backend switch, no figure registry, so QC can run in Dask worker
threads next to each other and inside an interactive session without disturbing it.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from ._atomic import atomic_file
from .constants import CAL_UNIT, FLUX_UNIT
from .errors import ExposureError, FluxCalWarning
from .exposure import open_exposure, read_standard_stars
from .lsf import LineSpread
from .masks import load_regions
from .telluric import transmission

__all__ = ["write_qc", "qc_from_file", "qc_directory", "QC_PLOTS"]

#: Plot kinds, in the order they are written; each file is ``<expid>_<kind>.png``.
QC_PLOTS = ("calibration", "residuals", "telluric", "template_match", "photometry", "xp",
            "spectrum")

_DPI = 100
_WIDTH = 10.0
_ROW_HEIGHT = 5.0
_REJECTED_COLOUR = "0.55"
_BRIDGED_COLOUR = "#f6c8c8"
_TELLURIC_COLOUR = "#c9dcf0"
_MASKED_COLOUR = "0.88"
_REJECTED_MARKERS = ("s", "^", "v", "D", "P", "<", ">", "h")
# Pipeline notes (FluxCalWarnings) are stored in the history with this prefix.
_NOTE_PREFIX = "note: "
_HISTORY_START = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\b|note: )")
# FITS HISTORY cards hold 72 characters; longer entries continue on the next card.
_HISTORY_CARD = 72


@dataclass
class _QCData:
    """Everything the plots and the summary need, whatever the source."""

    expid: str
    source: str
    wavelength: np.ndarray
    cal: np.ndarray
    cal_variance: np.ndarray
    cal_mask: np.ndarray
    exposure: xr.Dataset
    stars: xr.Dataset | None
    status: np.ndarray
    used: np.ndarray
    grey: np.ndarray
    fcalnstr: int
    fcalrms: float
    single_star: bool
    fcalsrc: str
    history: list[str]
    warnings: list[str]
    telluric: tuple
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- public API


def qc_directory(calibrated_dir):
    """Where the QC of the calibrated files in ``calibrated_dir`` goes: ``<dir>/qc``, files
    ``<expid>_<kind>.png`` (the one layout of ``calibrate --qc`` and the demo).

    Parameters
    ----------
    calibrated_dir : path-like
        The directory of the calibrated files.

    Returns
    -------
    pathlib.Path
    """
    return Path(calibrated_dir) / "qc"


def write_qc(result, out_dir, *, telluric="telluric_default"):
    """Write the QC plots and summary of a :class:`~kspec_fluxcal.CalibrationResult`.

    Parameters
    ----------
    result : CalibrationResult
        From :func:`kspec_fluxcal.calibrate_exposure` (its ``calibrated``, ``stars`` and
        ``calibration``; Dask-backed members are computed here).
    out_dir : path-like
        Output directory, created if needed. Existing QC files of the same exposure are
        replaced.
    telluric : str, path-like or sequence of (lo, hi)
        Telluric bands to mark (a mask name or file for :func:`kspec_fluxcal.load_regions`);
        use the mask the calibration was made with.

    Returns
    -------
    list of pathlib.Path
        The files written: ``<expid>_<kind>.png`` for each kind of :data:`QC_PLOTS` that
        could be drawn, then ``<expid>_summary.txt`` (which lists what was not drawn, and
        why).

    Warns
    -----
    FluxCalWarning
        When drawing one plot fails on unexpected data; the other files are still written.
        Errors writing a file (disk full, permissions) are raised, and leave any previous
        version of that file intact.
    """
    return _write(_from_result(result, telluric), out_dir)


def qc_from_file(path, out_dir, *, telluric="telluric_default"):
    """Write the QC plots and summary of a calibrated FITS file (formats contract section 4).

    The per-star plots (residuals, template match, photometry) need the FCALSTAR table that
    :func:`kspec_fluxcal.write_calibrated` writes when given ``stars``; without it only the
    combined vector and a calibrated spectrum are drawn, and the summary says so.

    Parameters
    ----------
    path : path-like
        A calibrated file.
    out_dir : path-like
        Output directory, created if needed.
    telluric : str, path-like or sequence of (lo, hi)
        Telluric bands to mark.

    Returns
    -------
    list of pathlib.Path
        The files written (see :func:`write_qc`).

    Raises
    ------
    ExposureError
        When the file cannot be read or carries no calibration (no FLUXCAL table).
    """
    return _write(_from_file(path, telluric), out_dir)


# ----------------------------------------------------------------------------- gathering


def _from_result(result, telluric):
    calibration = result.calibration.compute()
    calibrated = result.calibrated
    stars = None if result.stars is None else result.stars.compute()
    nstar = 0 if stars is None else stars.sizes.get("star", 0)
    status = _star_status(stars, calibration)
    if "used" in calibration and calibration["used"].size == nstar:
        used = np.asarray(calibration["used"].values, dtype=bool)
    else:
        used = status == "ok"
    grey = (np.asarray(calibration["grey_level"].values, dtype=np.float64)
            if "grey_level" in calibration and calibration["grey_level"].size == nstar
            else np.full(nstar, np.nan))
    cal = np.asarray(calibration["cal"].values, dtype=np.float64)
    cal_mask = np.asarray(calibration["cal_mask"].values, dtype=bool)
    if stars is not None:
        grey = _fill_grey(stars, cal, cal_mask, grey)
    attrs = calibration.attrs
    rms = _as_float(attrs.get("fcalrms", calibrated.attrs.get("fcalrms")))
    nused = int(attrs.get("fcalnstr", calibrated.attrs.get("fcalnstr", used.sum())) or 0)
    history = [str(h) for h in calibrated.attrs.get("history", attrs.get("history", []))]
    notes_in_history = [h[len(_NOTE_PREFIX):] for h in history if h.startswith(_NOTE_PREFIX)]
    return _QCData(
        expid=str(calibrated.attrs.get("expid") or "exposure"),
        source=str(result.path) if result.path is not None else "calibration result (not written)",
        wavelength=np.asarray(calibration["wavelength"].values, dtype=np.float64),
        cal=cal,
        cal_variance=np.asarray(calibration["cal_variance"].values, dtype=np.float64),
        cal_mask=cal_mask,
        exposure=calibrated,
        stars=stars,
        status=status,
        used=used,
        grey=grey,
        fcalnstr=nused,
        fcalrms=rms,
        single_star=bool(attrs.get("single_star", nused == 1)),
        fcalsrc=str(calibrated.attrs.get("fcalsrc", "standards")),
        history=history,
        warnings=list(result.warnings) or notes_in_history,
        telluric=_regions(telluric),
    )


def _from_file(path, telluric):
    path = Path(path)
    exposure = open_exposure(path)
    if "cal" not in exposure:
        raise ExposureError(path, "HDU FLUXCAL", "missing: not a calibrated file "
                            "(run 'kspec-fluxcal calibrate' first)")
    stars = read_standard_stars(path)
    notes = []
    if stars is None:
        notes.append("no per-star table (FCALSTAR) in the file: residuals, template-match "
                     "and photometry plots not drawn")
    nstar = 0 if stars is None else stars.sizes.get("star", 0)
    status = _star_status(stars, None)
    used = status == "ok"
    grey = np.full(nstar, np.nan)
    # Newer tables may carry the combination's own verdict and grey levels: prefer them.
    if stars is not None and "used" in stars.variables and stars["used"].dims == ("star",):
        used = np.asarray(stars["used"].values, dtype=bool)
    if stars is not None and "grey_level" in stars.variables and \
            stars["grey_level"].dims == ("star",):
        grey = np.asarray(stars["grey_level"].values, dtype=np.float64)
    cal = np.asarray(exposure["cal"].values, dtype=np.float64)
    cal_mask = np.asarray(exposure["cal_mask"].values, dtype=bool)
    if stars is not None:
        grey = _fill_grey(stars, cal, cal_mask, grey)
    # The FITS header stores -1 for "no scatter estimate" (one star).
    rms = _as_float(exposure.attrs.get("fcalrms"))
    if not rms >= 0:
        rms = np.nan
    nused = int(exposure.attrs.get("fcalnstr") or 0)
    history = _header_history(exposure.attrs.get("fits_header", "")) + [
        str(h) for h in exposure.attrs.get("history", [])]
    return _QCData(
        expid=str(exposure.attrs.get("expid") or path.name.split(".")[0]),
        source=os.fspath(path),
        wavelength=np.asarray(exposure["wavelength"].values, dtype=np.float64),
        cal=cal,
        cal_variance=np.asarray(exposure["cal_variance"].values, dtype=np.float64),
        cal_mask=cal_mask,
        exposure=exposure,
        stars=stars,
        status=status,
        used=used,
        grey=grey,
        fcalnstr=nused,
        fcalrms=rms,
        single_star=nused == 1,
        fcalsrc=str(exposure.attrs.get("fcalsrc") or "standards"),
        history=history,
        warnings=[h[len(_NOTE_PREFIX):] for h in history if h.startswith(_NOTE_PREFIX)],
        telluric=_regions(telluric),
        notes=notes,
    )


def _star_status(stars, calibration):
    """Final status per star: the combination's verdict wins over the fit's."""
    if stars is None:
        return np.zeros(0, dtype=str)
    for source in (calibration, stars):
        if source is not None and "star_status" in source and \
                source["star_status"].size == stars.sizes.get("star", 0):
            return np.asarray(source["star_status"].values).astype(str)
    if "status" in stars:
        return np.asarray(stars["status"].values).astype(str)
    return np.full(stars.sizes.get("star", 0), "unknown")


def _fill_grey(stars, cal, cal_mask, grey):
    """Grey level of each star relative to the combined vector, where not known already.

    The combination leaves it NaN for rejected stars; their residuals still need a level.
    """
    grey = np.array(grey, dtype=np.float64)
    star_cal, star_mask = _star_vectors(stars)
    for s in np.flatnonzero(~np.isfinite(grey)):
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = star_cal[s] / cal
        ok = star_mask[s] & cal_mask & np.isfinite(ratio)
        if ok.any():
            grey[s] = np.median(ratio[ok])
    return grey


def _has(stars, *names, along):
    """Whether every one of ``names`` is a (star, ``along``) array of ``stars``.

    A one-band or one-pixel FITS vector column reads back as a per-star scalar; such a
    table cannot be drawn per band, but must not stop the QC.
    """
    return stars is not None and all(
        name in stars.variables and set(stars[name].dims) == {"star", along} for name in names)


def _star_vectors(stars):
    """Per-star calibration vectors and their reliable-pixel masks, (star, wavelength).

    A zero or negative factor (a model that does not cover the pixel) is no measurement.
    """
    cal = np.asarray(stars["cal"].transpose("star", "wavelength").values, dtype=np.float64)
    mask = np.asarray(stars["cal_mask"].transpose("star", "wavelength").values, dtype=bool)
    mask = mask & np.isfinite(cal) & (cal > 0)
    return cal, mask


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _regions(telluric):
    if telluric is None:
        return ()
    if isinstance(telluric, (str, os.PathLike)):
        return load_regions(telluric)
    return tuple((float(lo), float(hi)) for lo, hi in telluric)


def _header_history(text):
    """HISTORY entries of a FITS header, re-joined across 72-character cards."""
    entries = []
    previous_full = False
    for line in str(text).split("\n"):
        if not line.startswith("HISTORY"):
            previous_full = False
            continue
        body = line[8:8 + _HISTORY_CARD]
        if entries and previous_full and not _HISTORY_START.match(body):
            entries[-1] += body
        else:
            entries.append(body)
        # A card filled to (nearly) its end was most likely cut by astropy's wrapping.
        previous_full = len(body.rstrip()) >= _HISTORY_CARD - 2
    return [re.sub(r"\s+$", "", e) for e in entries if e.strip()]


# ----------------------------------------------------------------------------- writing


def _safe_name(expid):
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", expid).strip("._")
    return name or "exposure"


def _write(qc, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _safe_name(qc.expid)
    drawers = {
        "calibration": _plot_calibration,
        "residuals": _plot_residuals,
        "telluric": _plot_telluric,
        "template_match": _plot_template_match,
        "photometry": _plot_photometry,
        "xp": _plot_xp,
        "spectrum": _plot_spectrum,
    }
    written, skipped = [], []
    for kind in QC_PLOTS:
        try:
            fig, why = drawers[kind](qc)
        except Exception as err:  # one odd plot must not cost the others
            fig, why = None, f"drawing failed ({type(err).__name__}: {err})"
            warnings.warn(f"{qc.expid}: QC plot {kind}.png not drawn: {why}", FluxCalWarning,
                          stacklevel=3)
        if fig is None:
            skipped.append(f"{kind}.png: {why}")
            continue
        path = out_dir / f"{stem}_{kind}.png"
        with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=_DPI)
        written.append(path)
    summary = out_dir / f"{stem}_summary.txt"
    text = _summary_text(qc, [p.name for p in written], skipped)
    with atomic_file(summary, overwrite=True) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    written.append(summary)
    return written


# ----------------------------------------------------------------------------- helpers


def _figure(nrows=1, ncols=1, *, width=_WIDTH, height=None, sharex=False, height_ratios=None):
    height = _ROW_HEIGHT * nrows if height is None else height
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex,
                        height_ratios=height_ratios)
    return fig, axes


def _runs(flags):
    """(start, stop) index pairs of the runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], np.asarray(flags, dtype=np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _pixel_edges(wave):
    if wave.size < 2:
        return np.array([wave[0] - 0.5, wave[0] + 0.5])
    mid = 0.5 * (wave[1:] + wave[:-1])
    return np.concatenate([[2 * wave[0] - mid[0]], mid, [2 * wave[-1] - mid[-1]]])


def _shade_runs(ax, wave, flags, colour, label=None, **kw):
    """Shade the wavelength ranges where ``flags`` is True; return a legend handle or None."""
    edges = _pixel_edges(wave)
    runs = _runs(flags)
    for start, stop in runs:
        ax.axvspan(edges[start], edges[stop], color=colour, lw=0, zorder=0, **kw)
    if runs and label:
        return Patch(facecolor=colour, edgecolor="none", label=label, **kw)
    return None


def _shade_telluric(ax, wave, regions):
    lo, hi = wave[0], wave[-1]
    shown = [(a, b) for a, b in regions if b > lo and a < hi]
    for a, b in shown:
        ax.axvspan(max(a, lo), min(b, hi), color=_TELLURIC_COLOUR, alpha=0.6, lw=0, zorder=0)
    if shown:
        return Patch(facecolor=_TELLURIC_COLOUR, alpha=0.6, label="telluric band")
    return None


def _limits(values, lo=1.0, hi=99.0, pad=0.08, include=(), log=False):
    """Axis limits from robust percentiles, so a few wild pixels do not flatten the plot."""
    v = np.concatenate([np.ravel(np.asarray(x, dtype=np.float64)) for x in values]) \
        if values else np.zeros(0)
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if v.size == 0:
        return None
    if log:
        v = np.log10(v)
    a, b = np.percentile(v, [lo, hi])
    for x in include:
        a, b = min(a, x), max(b, x)
    span = b - a
    if span <= 0:
        span = abs(b) * 0.1 if b else 1.0
    a, b = a - pad * span, b + pad * span
    return (10.0**a, 10.0**b) if log else (a, b)


def _smooth(y, width):
    """NaN-aware running median over ``width`` pixels (NaN where fewer than half are valid).

    A median, not a mean: one wild pixel must not draw a bump ``width`` pixels wide.
    """
    half = width // 2
    padded = np.concatenate([np.full(half, np.nan), y, np.full(half, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    enough = np.isfinite(windows).sum(axis=1) >= width / 2
    out = np.full(y.shape, np.nan)
    if enough.any():
        out[enough] = np.nanmedian(windows[enough], axis=1)
    return out


def _label(qc, s, short=False):
    stars = qc.stars
    fiber = int(stars["fiber"].values[s]) if "fiber" in stars.coords else s
    name = str(stars["fiber_name"].values[s]).strip() if "fiber_name" in stars.coords else ""
    text = f"fiber {fiber}" + (f" ({name})" if name else "")
    if not short and "objid" in stars.coords:
        text += f" objid {int(stars['objid'].values[s])}"
    return text


def _star_styles(qc):
    """Colour, line style and marker of every star: used in colour, rejected grey dashed."""
    # C7 is grey, reserved for rejected stars; past nine used stars the markers change.
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
    used_markers = ("o", "D", "p", "*")
    styles, k, r = [], 0, 0
    for s in range(qc.status.size):
        if qc.used[s]:
            styles.append({"color": palette[k % len(palette)], "ls": "-",
                           "marker": used_markers[k // len(palette) % len(used_markers)]})
            k += 1
        else:
            styles.append({"color": _REJECTED_COLOUR, "ls": "--",
                           "marker": _REJECTED_MARKERS[r % len(_REJECTED_MARKERS)]})
            r += 1
    return styles


def _rejection(status, n=60):
    """'rejected: <reason>', without repeating 'rejected' when the reason already says it."""
    status = _shorten(status, n)
    return status if status.startswith("rejected") else f"rejected: {status}"


def _shorten(text, n=80):
    return text if len(text) <= n else text[: n - 3] + "..."


def _rms_text(qc):
    if np.isfinite(qc.fcalrms):
        return f"FCALRMS = {100 * qc.fcalrms:.2f}%"
    return "FCALRMS n/a (" + ("one star" if qc.fcalnstr == 1 else "no scatter estimate") + ")"


def _outside_legend(fig, handles, ncols=None):
    """A legend below the axes; labels are cut to what fits the columns of a 10-inch figure."""
    if not handles:
        return 0
    ncols = ncols or 1
    fit = 125 if ncols == 1 else 62
    for h in handles:
        h.set_label(_shorten(h.get_label(), fit))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize="small",
               frameon=False)
    return math.ceil(len(handles) / ncols)


# ----------------------------------------------------------------------------- plots


def _plot_calibration(qc):
    wave, cal = qc.wavelength, qc.cal
    good = np.isfinite(cal) & (cal > 0)
    if not good.any():
        return None, "the combined calibration vector has no positive finite value"
    star_cal = star_mask = None
    nstar = 0
    if _has(qc.stars, "cal", "cal_mask", along="wavelength"):
        star_cal, star_mask = _star_vectors(qc.stars)
        nstar = star_cal.shape[0]
    nlegend = 3 + nstar
    fig, axes = _figure(height=_ROW_HEIGHT + 0.22 * max(0, math.ceil(nlegend / 2) - 2))
    ax = axes[0, 0]
    handles = []
    styles = _star_styles(qc) if nstar else []
    shown = [cal[good & qc.cal_mask]]
    for s in range(nstar):
        st = styles[s]
        y = np.where(star_mask[s], star_cal[s], np.nan)
        if qc.used[s]:
            label = f"{_label(qc, s)}, grey level {qc.grey[s]:.3f}"
            shown.append(y)
        else:
            label = f"{_label(qc, s)}: {_rejection(qc.status[s], 70)}"
            if not np.isfinite(y).any():
                label += " (no vector)"
        (line,) = ax.plot(wave, y, color=st["color"], ls=st["ls"], lw=0.8,
                          alpha=0.9 if qc.used[s] else 0.7, label=label, zorder=2)
        handles.append(line)
    sigma = np.sqrt(np.clip(qc.cal_variance, 0, None))
    ax.fill_between(wave, np.where(good, cal - sigma, np.nan), np.where(good, cal + sigma, np.nan),
                    color="k", alpha=0.2, lw=0, zorder=3)
    label = (f"combined ({qc.fcalnstr} star{'s' if qc.fcalnstr != 1 else ''}) with 1 sigma"
             if qc.fcalnstr > 0 else f"applied calibration ({qc.fcalsrc}) with 1 sigma")
    (comb,) = ax.plot(wave, np.where(good, cal, np.nan), color="k", lw=1.8, zorder=4,
                      label=label)
    handles.insert(0, comb)
    bridged = _shade_runs(ax, wave, ~qc.cal_mask, _BRIDGED_COLOUR,
                          "bridged (no measurement in the combination)")
    telluric = _shade_telluric(ax, wave, qc.telluric)
    handles += [h for h in (bridged, telluric) if h is not None]
    # Log scale only when the vector spans a large range (steep blue throughput drop).
    lin = _limits(shown, 0.5, 99.5)
    ratio = lin[1] / lin[0] if lin and lin[0] > 0 else np.inf
    if ratio > 4:
        ax.set_yscale("log")
        lo, hi = _limits(shown, 0.5, 99.5, log=True)
        ax.set_ylim(lo, hi)
        # Plain numbers read better than 6x10^-2. Minor ticks are labelled too (else a vector
        # within a decade or two has one or two labels): all of them within a decade, only
        # 2 and 5 x 10^n over more (all would crowd at the top of each decade).
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        if hi / lo < 1000:
            ax.yaxis.set_minor_formatter(_minor_log_labels(range(2, 10) if hi / lo < 10
                                                           else (2, 5)))
            ax.tick_params(axis="y", which="minor", labelsize="small")
    elif lin:
        ax.set_ylim(*lin)
    ax.set_xlim(wave[0], wave[-1])
    ax.set_xlabel("wavelength in air [Angstrom]")
    ax.set_ylabel(f"Cal [{CAL_UNIT}]")
    ax.set_title(f"{qc.expid}: calibration vector, source {qc.fcalsrc}, {_rms_text(qc)}")
    ax.grid(alpha=0.3, which="both")
    _outside_legend(fig, handles, ncols=1 if nstar <= 2 else 2)
    return fig, None


def _minor_log_labels(mantissas):
    """A log axis' minor-tick formatter: the value at ``mantissas`` x 10^n, nothing else."""
    def label(value, _):
        if not value > 0:
            return ""
        mantissa = value / 10.0 ** np.floor(np.log10(value) + 1e-9)
        return f"{value:.3g}" if np.isclose(mantissa, np.asarray(mantissas, float)).any() \
            else ""

    return FuncFormatter(label)


def _plot_residuals(qc):
    if not _has(qc.stars, "cal", "cal_mask", along="wavelength"):
        return None, "no per-star calibration vectors"
    star_cal, star_mask = _star_vectors(qc.stars)
    nstar = star_cal.shape[0]
    if nstar == 0:
        return None, "no standard star"
    wave, cal = qc.wavelength, qc.cal
    width = max(5, int(round(wave.size / 100)) | 1)
    fig, axes = _figure(height=_ROW_HEIGHT + 0.22 * max(0, math.ceil(nstar / 2) - 1))
    ax = axes[0, 0]
    styles = _star_styles(qc)
    handles, raw_all, smooth_all = [], [], []
    for s in range(nstar):
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(star_mask[s] & (cal > 0), star_cal[s] / (qc.grey[s] * cal) - 1.0, np.nan)
        st = styles[s]
        sm = _smooth(r, width)
        ax.plot(wave, r, color=st["color"], lw=0.5, alpha=0.25, zorder=1)
        label = _label(qc, s) + ("" if qc.used[s] else f" ({_rejection(qc.status[s], 50)})")
        (line,) = ax.plot(wave, sm, color=st["color"], ls=st["ls"], lw=1.4, zorder=3, label=label)
        handles.append(line)
        if qc.used[s]:
            raw_all.append(r)
            smooth_all.append(sm)
    for y in (-0.01, 0.01):
        ax.axhline(y, color="k", ls=":", lw=1, zorder=2)
    ax.axhline(0, color="k", lw=0.8, zorder=2)
    handles.append(Line2D([], [], color="k", ls=":", label="+/-1%"))
    bridged = _shade_runs(ax, wave, ~qc.cal_mask, _BRIDGED_COLOUR, "bridged in the combination")
    telluric = _shade_telluric(ax, wave, qc.telluric)
    handles += [h for h in (bridged, telluric) if h is not None]
    # Symmetric limits from the used stars (rejected ones may be far off), at least +/-3%.
    lim = _limits(raw_all or [np.zeros(1)], 1, 99, pad=0.1)
    half = 0.03
    if lim:
        half = max(half, abs(lim[0]), abs(lim[1]))
    sm_lim = _limits(smooth_all, 0.5, 99.5, pad=0.1)
    if sm_lim:
        half = max(half, abs(sm_lim[0]), abs(sm_lim[1]))
    half = min(half, 0.5)
    ax.set_ylim(-half, half)
    ax.set_xlim(wave[0], wave[-1])
    digits = 0 if half >= 0.05 else 1
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda v, _: "0%" if abs(v) < 1e-12 else f"{100 * v:+.{digits}f}%"))
    ax.set_xlabel("wavelength in air [Angstrom]")
    ax.set_ylabel("cal_star / (grey level x Cal) - 1")
    what = (f"{width}-pixel running median; faint: per pixel"
            + ("; one star: deviations from the smoothing only" if qc.fcalnstr == 1 else ""))
    ax.set_title(f"{qc.expid}: each standard vs the combined vector, {_rms_text(qc)}\n"
                 f"({what})", fontsize="medium")
    ax.grid(alpha=0.3)
    _outside_legend(fig, handles, ncols=1 if nstar <= 2 else 2)
    return fig, None


def _plot_telluric(qc):
    """The telluric model against each standard's observed band transmission: the star's
    vector over (grey level x smooth response), on its own pixels, in every band in range."""
    attrs = qc.exposure.attrs
    o2, h2o = _as_float(attrs.get("fcalo2")), _as_float(attrs.get("fcalh2o"))
    if not (np.isfinite(o2) or np.isfinite(h2o)) or not (o2 >= 0 or h2o >= 0):
        return None, "no telluric model (no band in range, or [telluric] model = false)"
    if not _has(qc.stars, "cal", "cal_mask", along="wavelength"):
        return None, "no per-star calibration vectors"
    wave = qc.wavelength
    bands = [(lo, hi) for lo, hi in qc.telluric if hi > wave[0] and lo < wave[-1]]
    if not bands:
        return None, "no telluric band in the range"
    scale = _as_float(attrs.get("fcallsf"))
    lsf = LineSpread(tuple(attrs["lsf_fwhm_coeffs"])).scaled(scale if scale > 0 else 1.0)
    columns = (max(o2, 0.0) if np.isfinite(o2) else 0.0, max(h2o, 0.0) if np.isfinite(h2o)
               else 0.0)
    smooth = qc.cal * transmission(wave, lsf, *columns)
    star_cal, star_mask = _star_vectors(qc.stars)
    star_wave = (np.asarray(qc.stars["star_wavelength"].values, dtype=np.float64)
                 if "star_wavelength" in qc.stars.variables
                 else np.broadcast_to(wave, star_cal.shape))
    fig, axes = _figure(1, len(bands), height=_ROW_HEIGHT)
    styles = _star_styles(qc)
    handles = []
    for ax, (lo, hi) in zip(axes[0], bands, strict=True):
        inside = (wave >= lo - 10) & (wave <= hi + 10)
        for s in np.flatnonzero(qc.used):
            w = star_wave[s]
            with np.errstate(invalid="ignore", divide="ignore"):
                observed = np.interp(w, wave, smooth) * qc.grey[s] / star_cal[s]
            keep = star_mask[s] & (w >= lo - 10) & (w <= hi + 10)
            model = transmission(w[keep], lsf, *columns)
            st = styles[s]
            pts = ax.plot(w[keep], observed[keep], ".", color=st["color"], ms=3, alpha=0.6,
                          label=_label(qc, s, short=True))[0]
            ax.plot(w[keep], model, color=st["color"], lw=1.0)
            if ax is axes[0][0]:
                handles.append(pts)
        ax.set_xlim(wave[inside][0] if inside.any() else lo, wave[inside][-1] if inside.any()
                    else hi)
        ax.set_title(f"{lo:.0f}-{hi:.0f} A", fontsize="small")
        ax.grid(alpha=0.3)
        ax.set_xlabel("wavelength in air [A]")
    axes[0][0].set_ylabel("transmission")
    handles.append(Line2D([], [], color="k", lw=1.0, label=f"model: O2 {columns[0]:.2f}, "
                          f"H2O {columns[1]:.2f} (at each star's pixels)"))
    fig.suptitle(f"{qc.expid}: telluric model vs the standards' band absorption (points: "
                 "star / (grey x smooth response))", fontsize="medium")
    _outside_legend(fig, handles, ncols=2)
    return fig, None


def _fmt(value, spec, missing="n/a"):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return missing
    return format(value, spec) if np.isfinite(value) else missing


def _coord(stars, name, s):
    return stars[name].values[s] if name in stars.variables else np.nan


def _plot_template_match(qc):
    stars = qc.stars
    if not _has(stars, "obs_norm", "model_norm", along="wavelength"):
        return None, "no normalised spectra of the standards"
    nstar = stars.sizes.get("star", 0)
    if nstar == 0:
        return None, "no standard star"
    wave = np.asarray(stars["wavelength"].values, dtype=np.float64)
    obs = np.asarray(stars["obs_norm"].transpose("star", "wavelength").values, dtype=np.float64)
    model = np.asarray(stars["model_norm"].transpose("star", "wavelength").values,
                       dtype=np.float64)
    match = (np.asarray(stars["match_mask"].transpose("star", "wavelength").values, dtype=bool)
             if _has(stars, "match_mask", along="wavelength") else np.isfinite(obs))
    ncols = 1 if nstar <= 3 else 2
    nrows = math.ceil(nstar / ncols)
    fig, axes = _figure(nrows, ncols, width=_WIDTH if ncols == 1 else 16.0,
                        height=3.6 * nrows + 0.6)
    fig.suptitle(f"{qc.expid}: observed vs template (continuum-normalised; grey: not used "
                 "in matching)")
    for s in range(nstar):
        ax = axes.flat[s]
        # A model that does not cover a pixel (velocity shift at the edges) is zero there.
        m = np.where(np.isfinite(model[s]) & (model[s] != 0), model[s], np.nan)
        o = np.where(np.isfinite(obs[s]), obs[s], np.nan)
        _shade_runs(ax, wave, ~match[s], _MASKED_COLOUR)
        ax.plot(wave, o, color="k", lw=0.6, label="observed")
        ax.plot(wave, m, color="C3", lw=0.8, alpha=0.85, label="template")
        # Deep lines are real: keep zero in view, clip only the observed high side (cosmics).
        # The template is noiseless: all of it that is compared stays in view.
        compared = m[match[s] & np.isfinite(m)]
        whole = (compared.min(), compared.max()) if compared.size else ()
        lim = _limits([o[match[s]], compared], 0.5, 99.5, pad=0.05,
                      include=(0.0, 1.05, *whole))
        if lim:
            ax.set_ylim(*lim)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlim(wave[0], wave[-1])
        teff = _fmt(_coord(stars, "teff", s), ".0f")
        ax.set_title(
            f"{_label(qc, s)}: "
            + ("used" if qc.used[s] else _rejection(qc.status[s], 60)) + "\n"
            f"Teff {teff} K, logg {_fmt(_coord(stars, 'logg', s), '.2f')}, "
            f"[M/H] {_fmt(_coord(stars, 'feh', s), '+.2f')}, "
            f"RV {_fmt(_coord(stars, 'rv', s), '+.1f')} km/s, "
            f"E(B-V) {_fmt(_coord(stars, 'ebv', s), '.3f')}, "
            f"chi2/dof {_fmt(_coord(stars, 'chi2_dof', s), '.2f')}",
            fontsize=9, color="k" if qc.used[s] else "0.4")
        ax.set_ylabel("normalised flux")
        ax.grid(alpha=0.3)
        if s == 0:
            ax.legend(loc="lower right", fontsize="small")
    for ax in axes.flat[nstar:]:
        ax.set_visible(False)
    for ax in axes[-1, :]:
        ax.set_xlabel("wavelength in air [Angstrom]")
    if nstar % ncols:  # the last visible panel of a short last row carries the x label too
        axes.flat[nstar - 1].set_xlabel("wavelength in air [Angstrom]")
    return fig, None


_BAND_WAVELENGTHS = {}


def _band_wavelength(band):
    """Effective wavelength of a band, Angstrom (NaN for an unknown band)."""
    if band not in _BAND_WAVELENGTHS:
        try:
            from .photometry import load_band

            _BAND_WAVELENGTHS[band] = float(load_band(band).effective_wavelength.value)
        except Exception:  # an unknown band is put last rather than stopping the QC
            _BAND_WAVELENGTHS[band] = np.nan
    return _BAND_WAVELENGTHS[band]


def _plot_photometry(qc):
    stars = qc.stars
    if not _has(stars, "mag_obs", "mag_model", along="band"):
        return None, "no photometry of the standards"
    nstar = stars.sizes.get("star", 0)
    bands = [str(b) for b in stars["band"].values]
    if nstar == 0 or not bands:
        return None, "no standard star or no band"
    lam = np.array([_band_wavelength(b) for b in bands])
    order = np.argsort(np.where(np.isfinite(lam), lam, np.inf), kind="stable")
    obs = np.asarray(stars["mag_obs"].transpose("star", "band").values, dtype=np.float64)
    mod = np.asarray(stars["mag_model"].transpose("star", "band").values, dtype=np.float64)
    diff = (obs - mod)[:, order]
    used = (np.asarray(stars["band_used"].transpose("star", "band").values, dtype=bool)[:, order]
            if _has(stars, "band_used", along="band") else np.isfinite(diff))
    err = None
    if _has(stars, "mag_err", along="band"):
        err = np.asarray(stars["mag_err"].transpose("star", "band").values,
                         dtype=np.float64)[:, order]
    sorted_bands = [bands[i] for i in order]
    dropped = np.zeros_like(used)
    if "dropped_bands" in stars.variables:
        for s, text in enumerate(np.asarray(stars["dropped_bands"].values).astype(str)):
            names = {b.strip() for b in text.split(",") if b.strip()}
            dropped[s] = [b in names for b in sorted_bands]
    fig, axes = _figure(height=_ROW_HEIGHT + 0.22 * max(0, math.ceil((nstar + 2) / 2) - 2))
    ax = axes[0, 0]
    styles = _star_styles(qc)
    x = np.arange(len(bands), dtype=np.float64)
    step = min(0.6 / max(nstar, 1), 0.12)
    lim = _limits([diff[np.isfinite(diff) & used]], 2, 98, pad=0.15, include=(-0.05, 0.05))
    if lim is None:
        lim = (-0.1, 0.1)
    # Points beyond the robust range sit on its edge, labelled with their value, so that an
    # outlier neither flattens the plot nor disappears.
    span = lim[1] - lim[0]
    inner = (lim[0] + 0.05 * span, lim[1] - 0.05 * span)
    handles, shown = [], {"hollow": False, "dropped": False}
    for s in range(nstar):
        st = styles[s]
        xs = x + (s - (nstar - 1) / 2) * step
        d = diff[s]
        ok = np.isfinite(d)
        dp = np.clip(d, *inner)
        rms = _coord(stars, "phot_rms", s)
        label = f"{_label(qc, s, short=True)}: rms {_fmt(rms, '.3f')} mag" + \
            ("" if qc.used[s] else f" ({_rejection(qc.status[s], 40)})")
        sel = ok & used[s]
        if err is not None:
            _error_bars(ax, xs[sel], dp[sel], err[s][sel], inner, st["color"])
        ax.plot(xs[sel], dp[sel], ls="none", marker=st["marker"], color=st["color"], ms=6)
        # Measured but not used (dropped as outliers, or excluded): hollow markers.
        out = ok & ~used[s]
        ax.plot(xs[out], dp[out], ls="none", marker=st["marker"], mfc="none",
                mec=st["color"], ms=7, mew=1.3)
        drop = ok & dropped[s]
        ax.plot(xs[drop], dp[drop], ls="none", marker="x", color="C3", ms=10, mew=1.5)
        shown["hollow"] |= bool(out.any())
        shown["dropped"] |= bool(drop.any())
        for b in np.flatnonzero(ok & (dp != d)):
            ax.annotate(f"{d[b]:+.2f}", xy=(xs[b], dp[b]), xytext=(7, 0),
                        textcoords="offset points", va="center", fontsize=7, color=st["color"])
        handles.append(Line2D([], [], ls="none", marker=st["marker"], color=st["color"],
                              label=label))
    # Only markers that occur are explained.
    if shown["hollow"]:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="none", mec="k",
                              label="measured, not used in the fit"))
    if shown["dropped"]:
        handles.append(Line2D([], [], ls="none", marker="x", color="C3", ms=8,
                              label="dropped as outlier"))
    ax.axhline(0, color="k", lw=0.8)
    for y in (-0.02, 0.02):
        ax.axhline(y, color="k", ls=":", lw=0.8)
    ax.set_ylim(*lim)
    ax.set_xlim(-0.6, len(bands) - 0.4)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{b}\n{lam[i]:.0f} A" if np.isfinite(lam[i]) else b
                        for b, i in zip(sorted_bands, order, strict=True)], fontsize=8)
    ax.set_xlabel("band (by effective wavelength)")
    ax.set_ylabel("catalog - model [mag]")
    ax.set_title(f"{qc.expid}: photometry of the standards vs their scaled, reddened templates")
    ax.grid(alpha=0.3, axis="y")
    _outside_legend(fig, handles, ncols=2 if len(handles) > 3 else len(handles))
    return fig, None


def _plot_xp(qc):
    """Per standard with a Gaia XP spectrum: XP, the catalog photometry and the model before
    and after the warp (at XP's resolution), then their ratios to the final model."""
    stars = qc.stars
    if not _has(stars, "xp_flux", "xp_model", "xp_model_warped", along="xp_wavelength"):
        return None, "no Gaia XP spectra given (--xp)"
    flux = np.asarray(stars["xp_flux"].transpose("star", "xp_wavelength").values, np.float64)
    shown = np.flatnonzero(np.isfinite(flux).any(axis=1))
    if not shown.size:
        return None, "no standard has a Gaia XP spectrum (none matched)"
    fig, axes = _figure(2 * shown.size, height=4.6 * shown.size + 0.4, sharex=True,
                        height_ratios=[2, 1] * shown.size)
    fig.suptitle(f"{qc.expid}: Gaia XP spectra, photometry and models at XP's resolution")
    for k, s in enumerate(shown):
        _xp_panels(qc, s, axes[2 * k, 0], axes[2 * k + 1, 0])
    axes[-1, 0].set_xlabel("wavelength in air [Angstrom]")
    axes[0, 0].legend(loc="upper right", fontsize="small", ncols=2)
    return fig, None


def _xp_panels(qc, s, top, bottom):
    """One star's XP panels: flux densities (top) and ratios to the final model (bottom)."""
    stars = qc.stars
    wave = np.asarray(stars["xp_wavelength"].values, dtype=np.float64)
    xp, err, before, after = (np.asarray(stars[n].transpose("star", "xp_wavelength")
                                         .values[s], np.float64)
                              for n in ("xp_flux", "xp_flux_error", "xp_model",
                                        "xp_model_warped"))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no overlap: all NaN
        level = np.nanmedian(xp / after)
    top.fill_between(wave, xp - err, xp + err, color="0.7", lw=0)
    top.plot(wave, xp, color="k", lw=1.0, label="XP")
    top.plot(wave, before, color="C0", ls="--", lw=1.0, label="model before the warp")
    top.plot(wave, after, color="C3", lw=1.2, label="final model (warped)")
    # Bands drawn on the final model (at their effective wavelengths) times catalog / model:
    # a broad band's mean flux is not the spectrum's value at one wavelength.
    ok = np.isfinite(after)
    lam, ratio, ratio_err = _xp_bands(stars, s, wave[ok] if ok.sum() > 1 else wave[:0])
    on_model = np.interp(lam, wave[ok], after[ok]) if lam.size else lam
    top.errorbar(lam, on_model * ratio, yerr=on_model * ratio_err, ls="none", marker="o",
                 color="C2", ms=5, label="catalog photometry (on the model)")
    lim = _limits([xp, after, on_model * ratio], 0.5, 99.5, pad=0.08)
    if lim:
        top.set_ylim(*lim)
    top.set_ylabel(f"[{FLUX_UNIT}]", fontsize="small")
    used = bool(_coord(stars, "xp_used", s))
    flag = str(_coord(stars, "flags", s)) if "flags" in stars.variables else ""
    why = next((p.strip() for p in flag.split(", ") if p.startswith("XP")), "")
    top.set_title(f"{_label(qc, s)}: XP {'used' if used else 'not used'}, XP / model "
                  f"{_fmt(_coord(stars, 'xp_ratio', s), '.3f')} before the warp, XP rms "
                  f"about the final model "
                  f"{_fmt(100 * _as_float(_coord(stars, 'xp_rms', s)), '.2f')}"
                  "%" + (f"\n{_shorten(why, 110)}" if why else ""), fontsize=9)
    with np.errstate(invalid="ignore", divide="ignore"):
        bottom.plot(wave, xp / after / level, color="k", lw=1.0)
        bottom.plot(wave, before / after, color="C0", ls="--", lw=1.0)
        bottom.errorbar(lam, ratio, yerr=ratio_err, ls="none", marker="o", color="C2", ms=5)
    for y in (0.99, 1.01):
        bottom.axhline(y, color="k", ls=":", lw=0.8)
    bottom.axhline(1.0, color="k", lw=0.6)
    bottom.set_ylim(0.95, 1.05)
    bottom.set_ylabel("/ final model", fontsize="small")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)


def _xp_bands(stars, s, wave):
    """Catalog over model photometry of star ``s`` (flux ratio, its error) at the effective
    wavelengths of the bands inside ``wave``."""
    if not (_has(stars, "mag_obs", "mag_model", along="band") and wave.size):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    lam = np.array([_band_wavelength(str(b)) for b in stars["band"].values])
    obs = np.asarray(stars["mag_obs"].transpose("star", "band").values[s], np.float64)
    model = np.asarray(stars["mag_model"].transpose("star", "band").values[s], np.float64)
    err = (np.asarray(stars["mag_err"].transpose("star", "band").values[s], np.float64)
           if _has(stars, "mag_err", along="band") else np.zeros(obs.size))
    keep = np.isfinite(lam) & (lam >= wave[0]) & (lam <= wave[-1]) & np.isfinite(obs - model)
    ratio = 10.0 ** (-0.4 * (obs - model)[keep])
    return lam[keep], ratio, ratio * np.nan_to_num(err[keep]) * np.log(10.0) / 2.5


def _error_bars(ax, x, y, err, inner, colour):
    """Error bars kept inside the panel (``inner`` y range): one cut at the edge ends in an
    arrowhead, so that it reads as longer than shown rather than disappearing."""
    err = np.where(np.isfinite(err), err, 0.0)
    low, high = np.maximum(y - err, inner[0]), np.minimum(y + err, inner[1])
    ax.vlines(x, low, high, colors=colour, lw=1, alpha=0.8)
    for cut, edge, marker in ((y - err < inner[0], low, "v"), (y + err > inner[1], high, "^")):
        ax.plot(x[cut], edge[cut], ls="none", marker=marker, color=colour, ms=4, alpha=0.8)


def _pick_fiber(exposure):
    """The brightest program fiber (TYPE 'P'), else the brightest fiber with data."""
    # In memory: a Dask median along a chunked wavelength axis is not supported.
    flux = exposure["flux"].compute()
    good = exposure["good"].compute() if "good" in exposure else np.isfinite(flux)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN fibers are expected
        level = np.asarray(flux.where(good).median("wavelength").values, dtype=np.float64)
    level = np.where(np.isfinite(level), level, -np.inf)
    types = (np.asarray(exposure["fiber_type"].values).astype(str)
             if "fiber_type" in exposure.coords else np.full(level.size, ""))
    for candidates in (types == "P", np.ones(level.size, dtype=bool)):
        values = np.where(candidates, level, -np.inf)
        if np.isfinite(values).any():
            return int(np.argmax(values))
    return None


def _plot_spectrum(qc):
    exposure = qc.exposure
    if exposure is None or "flux" not in exposure or exposure.sizes.get("fiber", 0) == 0:
        return None, "no calibrated spectra"
    row = _pick_fiber(exposure)
    if row is None:
        return None, "no fiber has valid calibrated data"
    one = exposure.isel(fiber=row).compute()
    wave = np.asarray(one["wavelength"].values, dtype=np.float64)
    flux = np.asarray(one["flux"].values, dtype=np.float64)
    var = np.asarray(one["variance"].values, dtype=np.float64)
    good = np.asarray(one["good"].values, dtype=bool) if "good" in one else np.isfinite(flux)
    good &= np.isfinite(flux) & np.isfinite(var) & (var >= 0)
    flux = np.where(good, flux, np.nan)
    sigma = np.where(good, np.sqrt(np.where(good, var, 0.0)), np.nan)
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.fill_between(wave, flux - sigma, flux + sigma, color="C1", alpha=0.5, lw=0,
                    label="1 sigma")
    ax.plot(wave, flux, color="k", lw=0.7, label="calibrated flux")
    handles, _ = ax.get_legend_handles_labels()
    bridged = _shade_runs(ax, wave, ~qc.cal_mask, _BRIDGED_COLOUR, "calibration bridged")
    telluric = _shade_telluric(ax, wave, qc.telluric)
    handles += [h for h in (bridged, telluric) if h is not None]
    level = np.nanmedian(flux) if np.isfinite(flux).any() else np.nan
    lim = _limits([flux], 0.5, 99.5, pad=0.1, include=(0.0,) if level > 0 else ())
    if lim:
        ax.set_ylim(*lim)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlim(wave[0], wave[-1])
    ax.set_xlabel("wavelength in air [Angstrom]")
    ax.set_ylabel(f"flux density [{FLUX_UNIT}]")
    fiber = int(one["fiber"].values) if "fiber" in one.coords else row
    name = str(one["fiber_name"].values).strip() if "fiber_name" in one.coords else ""
    ftype = str(one["fiber_type"].values) if "fiber_type" in one.coords else "?"
    objid = int(one["objid"].values) if "objid" in one.coords else -1
    ax.set_title(f"{qc.expid}: calibrated spectrum of fiber {fiber}"
                 + (f" ({name})" if name else "") + f", TYPE {ftype}"
                 + (f", objid {objid}" if objid >= 0 else "")
                 + (" - brightest program fiber" if ftype == "P" else ""))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    return fig, None


# ----------------------------------------------------------------------------- summary


def _check_lines(attrs):
    """The survey model used (FCALMOD) and the spectrophotometric check (FCALSP*)."""
    lines = [f"survey model (FCALMOD): {attrs['model_id']}"] if attrs.get("model_id") else []
    n = int(attrs.get("sphot_n") or 0)
    if not n:
        return [*lines, "spectrophotometric check: no program star with catalog photometry"]
    bands = ", ".join(f"{b} {attrs[f'sphot_{b}']:+.3f}" for b in "gri"
                      if attrs.get(f"sphot_{b}") is not None)
    scatter = attrs.get("sphot_scatter")
    return [*lines, f"spectrophotometric check (FCALSP*): {n} program star(s), median "
            f"synthetic - catalog {bands} mag"
            + (f", scatter {scatter:.3f} mag" if scatter is not None else "")]


def _summary_text(qc, written, skipped):
    nstar = qc.status.size
    lines = [
        f"kspec-fluxcal QC summary for exposure {qc.expid}",
        f"source: {qc.source}",
        f"calibration source (FCALSRC): {qc.fcalsrc}",
        f"standards used (FCALNSTR): {qc.fcalnstr}"
        + (f" of {nstar}" if qc.stars is not None else " (per-star table not available)"),
        f"single-star calibration: {'yes' if qc.single_star else 'no'}",
        "FCALRMS (fractional rms between the standards): "
        + (f"{qc.fcalrms:.5f} ({100 * qc.fcalrms:.2f}%)" if np.isfinite(qc.fcalrms)
           else "n/a" + (" (one star)" if qc.fcalnstr == 1 else "")),
        *_check_lines(qc.exposure.attrs),
    ]
    measured = int(qc.cal_mask.sum())
    lines.append(f"calibration vector: {qc.wavelength.size} pixels, "
                 f"{qc.wavelength[0]:.1f}-{qc.wavelength[-1]:.1f} A, "
                 f"{qc.wavelength.size - measured} bridged (not measured)")
    for note in qc.notes:
        lines.append(f"NOTE: {note}")
    if qc.stars is not None:
        lines += ["", f"standard stars ({nstar}):"]
        if nstar:
            lines += _star_table(qc)
        rejected = [s for s in range(nstar) if not qc.used[s]]
        lines += ["", f"rejected ({len(rejected)}):"]
        lines += [f"  {_label(qc, s)}: {qc.status[s]}" for s in rejected] or ["  none"]
    lines += ["", f"warnings ({len(qc.warnings)}):"]
    lines += [f"  {w}" for w in qc.warnings] or ["  none"]
    lines += ["", f"history ({len(qc.history)}):"]
    lines += [f"  {h}" for h in qc.history] or ["  none"]
    lines += ["", "plots written:"]
    lines += [f"  {name}" for name in written] or ["  none"]
    if skipped:
        lines += ["plots not drawn:"] + [f"  {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def _star_table(qc):
    stars = qc.stars
    columns = [  # header, width, value of star s
        ("fiber", 6, lambda s: str(int(stars["fiber"].values[s])) if "fiber" in stars.variables
         else str(s)),
        ("name", 10, lambda s: str(stars["fiber_name"].values[s]).strip()
         if "fiber_name" in stars.variables else ""),
        ("objid", 20, lambda s: str(int(stars["objid"].values[s])) if "objid" in stars.variables
         else ""),
        ("used", 5, lambda s: "yes" if qc.used[s] else "no"),
        ("grey", 7, lambda s: _fmt(qc.grey[s], ".3f")),
        ("teff", 7, lambda s: _fmt(_coord(stars, "teff", s), ".0f")),
        ("logg", 6, lambda s: _fmt(_coord(stars, "logg", s), ".2f")),
        ("feh", 6, lambda s: _fmt(_coord(stars, "feh", s), "+.2f")),
        ("rv", 8, lambda s: _fmt(_coord(stars, "rv", s), "+.1f")),
        ("ebv", 6, lambda s: _fmt(_coord(stars, "ebv", s), ".3f")),
        ("chi2/dof", 9, lambda s: _fmt(_coord(stars, "chi2_dof", s), ".2f")),
        ("snr", 7, lambda s: _fmt(_coord(stars, "snr", s), ".1f")),
        ("phot_rms", 9, lambda s: _fmt(_coord(stars, "phot_rms", s), ".3f")),
        ("bands", 6, lambda s: _fmt(_coord(stars, "n_bands", s), ".0f")),
        ("dropped", 12, lambda s: (str(stars["dropped_bands"].values[s]).strip() or "-")
         if "dropped_bands" in stars.variables else "-"),
        ("xp", 4, lambda s: "-" if "xp_used" not in stars.variables
         or str(_coord(stars, "xp_match", s)) in ("none", "")
         else "yes" if bool(_coord(stars, "xp_used", s)) else "no"),
    ]
    head = " ".join(f"{h:>{w}}" for h, w, _ in columns) + "  status"
    rows = ["  " + head]
    for s in range(qc.status.size):
        rows.append("  " + " ".join(f"{f(s):>{w}}" for _, w, f in columns) + f"  {qc.status[s]}")
    return rows
