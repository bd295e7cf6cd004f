"""Plots of the calibration archive (``kspec-fluxcal archive plot``): throughput against
time and a wavelength x time image; with the survey model (``model.zarr`` beside the
archive), its extinction curves per night and the outlier exposures.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..constants import FLUX_UNIT
from ..errors import InputError
from .archive import throughput

__all__ = ["plot_archive", "archive_figures", "model_figures"]


def plot_archive(archive, out_dir, bands=((4000, 5000), (5000, 6000), (6000, 7000), (7000, 8000)),
                 model=None):
    """The archive's plots (and the survey model's) as PNG files.

    Parameters
    ----------
    archive : xarray.Dataset
        From :func:`kspec_fluxcal.survey.archive.open_archive`.
    out_dir : path-like
        Where the PNGs go.
    bands : sequence of (lo, hi)
        Wavelength windows (Angstrom) for the throughput curves.
    model : xarray.Dataset, optional
        A setup's survey model (:func:`kspec_fluxcal.survey.model_store.open_model`).

    Returns
    -------
    list of pathlib.Path
        ``throughput_vs_time.png`` and ``throughput_image.png`` (see :func:`archive_figures`),
        and with a model ``extinction_per_night.png`` and ``model_outliers.png`` (see
        :func:`model_figures`).

    Raises
    ------
    FluxCalError
        When ``out_dir`` cannot be created or written (checked before the plots are drawn).
    InputError
        When the archive has no exposures.
    """
    from .._atomic import atomic_file, check_output_directory

    out_dir = Path(out_dir)
    check_output_directory(out_dir)
    figures = archive_figures(archive, bands)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        figures.update(model_figures(model))
    written = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        with atomic_file(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png")
        written.append(path)
    return written


#: Largest MJD step within one run of exposures: a larger one (a day) breaks the curves.
_SAME_RUN_DAYS = 0.5
#: Exposures labelled one by one on the image's axis, up to this many; nights beyond.
_LABEL_EACH = 40


def archive_figures(archive, bands=((4000, 5000), (5000, 6000), (6000, 7000), (7000, 8000))):
    """The archive's plots as matplotlib figures (Agg canvas, no pyplot).

    Parameters
    ----------
    archive : xarray.Dataset
        From :func:`open_archive`.
    bands : sequence of (lo, hi)
        Wavelength windows (Angstrom) for the throughput curves.

    Returns
    -------
    dict of str to matplotlib.figure.Figure
        ``throughput_vs_time``: mean throughput in ``bands`` against UT date, curves broken
        between nights, open markers for exposures calibrated from the survey model alone
        (FCALSRC 'model': its prediction, not a measurement); ``throughput_image``:
        throughput relative to the median of the measured exposures, wavelength x exposure
        (time order, labelled by EXPID, 'model' for those, or night), colour scale centred
        on 1, grey where there is no measurement.

    Raises
    ------
    InputError
        When the archive has no exposures.
    """
    if not archive.sizes["exposure"]:
        raise InputError(None, None, "the archive has no exposures: nothing to plot")
    ds = archive.where(archive["cal_mask"]).isel(exposure=np.argsort(archive["mjd"].values))
    measured = throughput(ds)
    return {"throughput_vs_time": _throughput_figure(ds, measured, bands),
            "throughput_image": _throughput_image(ds, measured)}


def _figure(height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _dates(mjd):
    """UT datetimes of MJDs (matplotlib dates read them without an offset)."""
    epoch = np.datetime64("1858-11-17T00:00:00")
    return epoch + np.round(np.asarray(mjd, dtype=float) * 86400e3).astype("timedelta64[ms]")


def _broken(x, y, gaps):
    """x and y with a NaN inserted after each index in ``gaps``: a line breaks there."""
    return np.insert(x, gaps + 1, x[gaps]), np.insert(y.astype(float), gaps + 1, np.nan)


def _model_rows(ds):
    """Rows calibrated from the survey model alone (FCALSRC 'model'): predictions, not
    measurements of the throughput."""
    if "fcalsrc" not in ds.variables:
        return np.zeros(ds.sizes["exposure"], bool)
    return np.asarray(ds["fcalsrc"].values).astype(str) == "model"


def _throughput_figure(ds, measured, bands):
    import matplotlib.dates as mdates
    from matplotlib.lines import Line2D

    fig, ax = _figure(5)
    mjd = ds["mjd"].values
    when = _dates(mjd)
    gaps = np.flatnonzero(np.diff(mjd) > _SAME_RUN_DAYS)
    model = _model_rows(ds)
    # Filled markers where measured; the model's predictions open (the line joins both).
    filled = np.insert(~model, gaps + 1, False)
    for lo, hi in bands:
        t = measured.sel(wavelength=slice(lo, hi)).mean("wavelength").compute().values
        (line,) = ax.plot(*_broken(when, t, gaps), "o-", ms=4, markevery=filled,
                          label=f"{lo}-{hi} A")
        if model.any():
            ax.plot(when[model], t[model], "o", ms=5, mfc="none", color=line.get_color(),
                    label="_model")
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    nights = ds["night"].values
    for night in np.unique(nights):  # the observers' name of each group of points
        at = when[nights == night]
        ax.annotate(f"night {night}", (at[0] + (at[-1] - at[0]) / 2, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(0, -3),
                    textcoords="offset points", ha="center", va="top", fontsize="small")
    ax.margins(y=0.12)  # room for the night names at the top
    ax.set_xlabel("time (UT); curves break between nights")
    ax.set_ylabel(f"throughput [counts/s/A per {FLUX_UNIT}]")
    ax.set_title(f"Throughput vs time ({ds.sizes['exposure']} exposures, "
                 f"{len(np.unique(ds['night'].values))} nights)")
    handles, _ = ax.get_legend_handles_labels()
    if model.any():
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="0.3",
                              label=f"open: FCALSRC model ({int(model.sum())}), predicted"))
    # Below the axes: inside, it hid the last night's name.
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
               fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    return fig


def _throughput_image(ds, measured):
    import matplotlib as mpl
    from matplotlib.patches import Patch

    fig, ax = _figure(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns outside the range
        # Relative to the measured rows: the model's predictions are not measurements.
        model = _model_rows(ds)
        reference = measured.isel(exposure=np.flatnonzero(~model)) if (~model).any() \
            else measured
        rel = (measured / reference.median("exposure")).compute().values
    finite = rel[np.isfinite(rel)]
    lo, hi = np.percentile(finite, [2, 98]) if finite.size else (0.99, 1.01)
    half = max(abs(lo - 1.0), abs(hi - 1.0), 0.01)  # identical exposures: +/-1 %, not noise
    cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="0.75")
    wave = ds["wavelength"].values
    rows = np.arange(rel.shape[0])
    # pcolormesh, not imshow: the grid is uniform in ln(lambda), not in lambda.
    image = ax.pcolormesh(wave, rows, rel, cmap=cmap, vmin=1.0 - half, vmax=1.0 + half,
                          shading="nearest")
    inside = np.isfinite(rel).any(axis=0)
    if inside.any():
        ax.set_xlim(wave[inside][[0, -1]])
    _label_exposures(ax, ds, rows, model)
    ax.set_xlabel("wavelength [Angstrom, air]")
    ax.set_title("Throughput relative to the survey median (of the measured exposures)"
                 if model.any() else "Throughput relative to the survey median")
    fig.legend(handles=[Patch(color=cmap.get_bad(), label="no measurement: outside the "
                              "exposure's range, or masked in its calibration (stellar line "
                              "cores, bridged gaps)")],
               loc="outside lower left", fontsize="small", frameon=False)
    fig.colorbar(image, ax=ax, label="throughput / median")
    return fig


def _label_exposures(ax, ds, rows, model):
    """One tick per exposure with its EXPID (few exposures; 'model' after those calibrated
    from the survey model alone) or one per night, and lines between nights."""
    nights = ds["night"].values
    first = np.flatnonzero(np.r_[True, nights[1:] != nights[:-1]])
    for row in first[1:]:
        ax.axhline(row - 0.5, color="k", lw=0.6)
    if rows.size <= _LABEL_EACH:
        ax.set_yticks(rows, [f"{e} ({n}{', model' if m else ''})" for e, n, m in zip(
            ds["expid"].values, nights, model, strict=True)], fontsize="small")
        ax.set_ylabel("exposure (night), in time order")
    else:
        ax.set_yticks(first, nights[first])
        ax.set_ylabel("night (first exposure), exposures in time order")


# ----------------------------------------------------------------------------- survey model

#: Exposures whose residual curves are drawn when none is an outlier: the worst ones.
_WORST = 3


def model_figures(model):
    """The survey model's figures (Agg canvas, no pyplot).

    Parameters
    ----------
    model : xarray.Dataset
        From :func:`kspec_fluxcal.survey.model_store.open_model`.

    Returns
    -------
    dict of str to matplotlib.figure.Figure
        ``extinction_per_night``: each night's extinction curve (mag/airmass) with its
        standard error; ``model_outliers``: every fitted exposure's shape residual from the
        model against time, outliers marked, and the residual curves of the outliers (or of
        the worst exposures when none is).
    """
    model = model.compute()
    return {"extinction_per_night": _extinction_figure(model),
            "model_outliers": _outlier_figure(model)}


def _extinction_figure(model):
    fig, ax = _figure(5)
    wave = model["wavelength"].values
    for k, night in enumerate(model["night"].values):  # a line per night
        k_curve = model["extinction"].values[k]
        err = model["extinction_err"].values[k]
        label = (f"{night} ({int(model['n_exposures'].values[k])} exp."
                 + (", photometric" if bool(model["photometric"].values[k]) else "") + ")")
        (line,) = ax.plot(wave, k_curve, lw=1.2, label=label)
        ax.fill_between(wave, k_curve - err, k_curve + err, color=line.get_color(), alpha=0.2,
                        lw=0)
    ax.set_xlabel("wavelength [Angstrom, air]")
    ax.set_ylabel("extinction [mag/airmass]")
    ax.set_title(f"Extinction per night, setup {model.attrs.get('setup', '')} (bands: 1 sigma "
                 "of the shape)")
    ax.legend(fontsize="small", ncols=2)
    ax.grid(alpha=0.3)
    return fig


def _outlier_figure(model):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    rms = 100 * model["residual_rms"].values
    outlier = model["outlier"].values.astype(bool)
    when = _dates(model["exposure_mjd"].values)
    expid = model["expid"].values
    top.plot(when[~outlier], rms[~outlier], "o", ms=4, label="fitted exposures")
    top.plot(when[outlier], rms[outlier], "o", ms=7, color="C3",
             label=f"outliers ({int(outlier.sum())}): weight < 1, flagged")
    for k in np.flatnonzero(outlier):
        top.annotate(str(expid[k]), (when[k], rms[k]), xytext=(4, 4),
                     textcoords="offset points", fontsize="small")
    top.set_ylabel("shape residual rms [%]")
    top.set_xlabel("time (UT)")
    top.set_title("Exposures' own standards against the survey model (grey removed)")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    chosen = np.flatnonzero(outlier) if outlier.any() else np.argsort(rms)[::-1][:_WORST]
    wave = model["fit_wavelength"].values
    for k in chosen:
        bottom.plot(wave, 100 * model["residual"].values[k], lw=1, label=str(expid[k]))
    bottom.axhline(0.0, color="k", lw=0.6)
    bottom.set_xlabel("wavelength [Angstrom, air]")
    bottom.set_ylabel("residual [%]")
    bottom.set_title("Residual curves of the outliers" if outlier.any()
                     else f"No outlier: residual curves of the {len(chosen)} worst exposures")
    if len(chosen):
        bottom.legend(fontsize="small")
    bottom.grid(alpha=0.3)
    return fig
