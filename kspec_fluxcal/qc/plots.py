"""The QC plots of one calibrated exposure, one function per kind of plot.

Each takes the :class:`~kspec_fluxcal.qc.data._QCData` of the exposure and returns
``(figure, None)``, or ``(None, why)`` when the data for the plot are missing; the figures
are written by :func:`kspec_fluxcal.qc.write_qc`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from ..constants import CAL_UNIT, FLUX_UNIT
from ..lsf import LineSpread
from ..telluric import transmission
from .data import _as_float, _has, _star_vectors
from .figures import (
    _BRIDGED_COLOUR,
    _MASKED_COLOUR,
    _ROW_HEIGHT,
    _WIDTH,
    _coord,
    _error_bars,
    _figure,
    _fmt,
    _label,
    _limits,
    _minor_log_labels,
    _outside_legend,
    _rejection,
    _rms_text,
    _shade_runs,
    _shade_telluric,
    _shorten,
    _smooth,
    _star_styles,
)


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
    # As many digits as the tick has (a fixed .0f labelled +2.5 % as "+3%").
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda v, _: "0%" if abs(v) < 1e-12 else f"{100 * v:+.3g}%"))
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
        return None, ("no telluric model (no band in range, [telluric] model = false, or "
                      "[combine] smooth = false)")
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
    # The model is drawn in each star's colour: its legend line says so in grey.
    handles.append(Line2D([], [], color="0.5", lw=1.0, label=f"lines: the model in each "
                          f"star's colour, O2 {columns[0]:.2f}, H2O {columns[1]:.2f} (at its "
                          "pixels)"))
    fig.suptitle(f"{qc.expid}: telluric model vs the standards' band absorption (points: "
                 "star / (grey x smooth response))", fontsize="medium")
    _outside_legend(fig, handles, ncols=2)
    return fig, None



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
            from ..photometry import band_wavelength

            _BAND_WAVELENGTHS[band] = band_wavelength(band)
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
    lam, order, diff, used, err, dropped = _photometry_by_band(stars, bands)
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
    handles, hollow, shown_dropped = [], False, False
    for s in range(nstar):
        xs = x + (s - (nstar - 1) / 2) * step
        handle, out, drop = _photometry_points(
            ax, qc, s, xs, diff[s], used[s], None if err is None else err[s], dropped[s],
            inner, styles[s])
        handles.append(handle)
        hollow |= out
        shown_dropped |= drop
    # Only markers that occur are explained.
    if hollow:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="none", mec="k",
                              label="measured, not used in the fit"))
    if shown_dropped:
        handles.append(Line2D([], [], ls="none", marker="x", color="C3", ms=8,
                              label="dropped as outlier"))
    ax.axhline(0, color="k", lw=0.8)
    for y in (-0.02, 0.02):
        ax.axhline(y, color="k", ls=":", lw=0.8)
    ax.set_ylim(*lim)
    ax.set_xlim(-0.6, len(bands) - 0.4)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{bands[i]}\n{lam[i]:.0f} A" if np.isfinite(lam[i]) else bands[i]
                        for i in order], fontsize=8)
    ax.set_xlabel("band (by effective wavelength)")
    ax.set_ylabel("catalog - model [mag]")
    ax.set_title(f"{qc.expid}: photometry of the standards vs their scaled, reddened templates")
    ax.grid(alpha=0.3, axis="y")
    _outside_legend(fig, handles, ncols=2 if len(handles) > 3 else len(handles))
    return fig, None


def _photometry_by_band(stars, bands):
    """The standards' photometry with the bands in order of effective wavelength.

    Returns the bands' effective wavelengths (in the table's order), that order, and
    (star, band) arrays in it: catalog - model magnitudes, used in the fit, errors (None when
    the table has none), dropped as outliers.
    """
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
    return lam, order, diff, used, err, dropped


def _photometry_points(ax, qc, s, xs, d, used, err, dropped, inner, st):
    """Draw star ``s``'s catalog - model points ``d`` at ``xs``, clipped to ``inner``:
    used (filled, with error bars), measured but not used (hollow), dropped (crossed); a
    clipped point is labelled with its value. Returns its legend handle and whether hollow
    and dropped points were drawn."""
    ok = np.isfinite(d)
    dp = np.clip(d, *inner)
    rms = _coord(qc.stars, "phot_rms", s)
    label = f"{_label(qc, s, short=True)}: rms {_fmt(rms, '.3f')} mag" + \
        ("" if qc.used[s] else f" ({_rejection(qc.status[s], 40)})")
    sel = ok & used
    if err is not None:
        _error_bars(ax, xs[sel], dp[sel], err[sel], inner, st["color"])
    ax.plot(xs[sel], dp[sel], ls="none", marker=st["marker"], color=st["color"], ms=6)
    # Measured but not used (dropped as outliers, or excluded): hollow markers.
    out = ok & ~used
    ax.plot(xs[out], dp[out], ls="none", marker=st["marker"], mfc="none",
            mec=st["color"], ms=7, mew=1.3)
    drop = ok & dropped
    ax.plot(xs[drop], dp[drop], ls="none", marker="x", color="C3", ms=10, mew=1.5)
    for b in np.flatnonzero(ok & (dp != d)):
        ax.annotate(f"{d[b]:+.2f}", xy=(xs[b], dp[b]), xytext=(7, 0),
                    textcoords="offset points", va="center", fontsize=7, color=st["color"])
    handle = Line2D([], [], ls="none", marker=st["marker"], color=st["color"], label=label)
    return handle, bool(out.any()), bool(drop.any())


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
    # Two lines: one ran off a 10-inch figure with a long EXPID, name and objid.
    ax.set_title(f"{qc.expid}: calibrated spectrum of fiber {fiber}"
                 + (f" ({name})" if name else "")
                 + (", the brightest program fiber" if ftype == "P" else "")
                 + f"\nTYPE {ftype}" + (f", objid {objid}" if objid >= 0 else ""))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    return fig, None

