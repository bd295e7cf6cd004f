"""Drawing helpers shared by the QC plots: figures on an explicit Agg canvas, shaded
wavelength runs, robust axis limits, star labels and styles, legends below the axes.

Figures are made with :class:`matplotlib.figure.Figure` on a :class:`FigureCanvasAgg`, never
through pyplot (see :mod:`kspec_fluxcal.qc`).
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

_DPI = 100
_WIDTH = 10.0
_ROW_HEIGHT = 5.0
_REJECTED_COLOUR = "0.55"
_BRIDGED_COLOUR = "#f6c8c8"
_TELLURIC_COLOUR = "#c9dcf0"
_MASKED_COLOUR = "0.88"
_REJECTED_MARKERS = ("s", "^", "v", "D", "P", "<", ">", "h")


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


def _minor_log_labels(mantissas):
    """A log axis' minor-tick formatter: the value at ``mantissas`` x 10^n, nothing else."""
    def label(value, _):
        if not value > 0:
            return ""
        mantissa = value / 10.0 ** np.floor(np.log10(value) + 1e-9)
        return f"{value:.3g}" if np.isclose(mantissa, np.asarray(mantissas, float)).any() \
            else ""

    return FuncFormatter(label)



def _fmt(value, spec, missing="n/a"):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return missing
    return format(value, spec) if np.isfinite(value) else missing


def _coord(stars, name, s):
    return stars[name].values[s] if name in stars.variables else np.nan



def _error_bars(ax, x, y, err, inner, colour):
    """Error bars kept inside the panel (``inner`` y range): one cut at the edge ends in an
    arrowhead, so that it reads as longer than shown rather than disappearing."""
    err = np.where(np.isfinite(err), err, 0.0)
    low, high = np.maximum(y - err, inner[0]), np.minimum(y + err, inner[1])
    ax.vlines(x, low, high, colors=colour, lw=1, alpha=0.8)
    for cut, edge, marker in ((y - err < inner[0], low, "v"), (y + err > inner[1], high, "^")):
        ax.plot(x[cut], edge[cut], ls="none", marker=marker, color=colour, ms=4, alpha=0.8)

