"""Accuracy of calibrations against known truth (simulated surveys).

Metrics, per exposure
---------------------
``cal_shape``
    rms of (Cal / Cal_true - 1) after a 100 A running median and removal of the median
    level, outside telluric bands, over the range where the standards are bright enough to
    measure (4000-8400 A by default): the calibration's own shape error.
``shape``
    the same for the calibrated science spectra (stars, galaxies, quasars): calibrated / true
    flux, the median over science fibers (target noise included: faint targets dominate).
``shape_bright``
    ``shape`` over the science fibers with a median S/N >= 30 per pixel.
``shape_snr10``
    ``shape`` over the science fibers with a median S/N > 10 per pixel: the headline metric
    of issue 11 (a calibration error seen through targets bright enough to show it).
``shape_snr10_noiseless``, ``telluric_science_noiseless``
    the same two over the same fibers, for the targets' noiseless counts calibrated with the
    factor actually applied to each fiber (``cal_factor`` x the fiber's true response x its
    aperture): the calibration's error as each fiber sees it (own pixels, line spread and
    tellurics), without the targets' own noise, which dominates ``shape_snr10`` below S/N ~ 50.
``level``
    median(calibrated / true) - 1 of science fibers (median over fibers): the absolute error,
    which includes each fiber's own aperture loss.
``level_cal``
    the calibration's level error alone: Cal x <aperture of the used standards> / Cal_true - 1.
    Calibration metrics refer to the aperture of the standards used: their mean; with the
    simulator's chromatic losses, their mean level (truth ``aperture_chromatic``) times the
    shape of a typical point source's aperture (truth ``aperture_expected``): a calibration
    should give science targets their flux, and their fibers do not share the standards'
    own chromatic losses. Without standards (FCALNSTR = 0: the survey model), the expected
    aperture of a point source (what a calibration from many standards refers to).
``telluric``
    rms of the smoothed ratio inside telluric bands, relative to outside.
``telluric_science``
    the telluric correction as science targets see it. For each science fiber with a median
    S/N > 10: the ratio calibrated / true, smoothed with a 25 A running median (S); for each
    band of the telluric mask that lies inside the compared range, the level L = median of S
    over the pixels outside every band within 100 A of the band's edges; then the median over
    the fiber's band pixels (all bands together) of |S / L - 1|. The metric is the median of
    that over the fibers (NaN without bands or fibers).
Per standard: fitted minus true Teff, log g, [M/H], RV and E(B-V) (NaN where the truth is
unknown, e.g. a CALSPEC star's own velocity); :func:`star_summary` sums them up.

Science fibers are compared on the common wavelength grid of the calibrated exposure, or,
when it has per-fiber wavelengths (a 2-D coordinate ``fiber_wavelength`` (fiber,
wavelength)), each on its own pixels against the simulator's ``true_flux_fiber`` (pixel by
pixel: with the simulator's ``arc_error``, the truth at where the light truly fell).
"""

from __future__ import annotations

import numpy as np

from ..exposure import open_exposure
from ..masks import load_regions, region_mask
from ..products import read_standard_stars
from ..smoothing import running_median

__all__ = ["compare_with_truth", "star_summary", "STAR_PARAMS"]

SCIENCE_KINDS = ("star", "galaxy", "qso")
#: Fitted parameters compared with the truth, per standard star.
STAR_PARAMS = ("teff", "logg", "feh", "rv", "ebv")
#: Science fibers above this median S/N per pixel enter ``shape_snr10`` and
#: ``telluric_science``.
SNR_SCIENCE = 10.0
#: Smoothing of ``telluric_science``, A: short enough to resolve the bands (>= 50 A wide).
TELLURIC_WINDOW = 25.0
#: Reach of the out-of-band level on each side of a telluric band, A.
TELLURIC_SIDE = 100.0


def _shape_rms(ratio, wave, use, window):
    """rms of the smoothed ratio about its median level; also the level and the smoothed
    ratio relative to it."""
    smooth = running_median(ratio, wave, window)
    level = np.nanmedian(np.where(use, smooth, np.nan), axis=-1, keepdims=True)
    rel = smooth / level - 1.0
    return np.sqrt(np.nanmean(np.where(use, rel, np.nan) ** 2, axis=-1)), level[..., 0], rel


def _nanmedian(values):
    values = np.asarray(values, dtype=float)
    return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else np.nan


def _science_truth(calibrated, truth, science):
    """(wavelength, true flux) of the science fibers: each fiber's own pixels when the
    calibrated exposure has per-fiber wavelengths, else the common grid."""
    if "fiber_wavelength" not in calibrated.coords:
        return calibrated["wavelength"].values, np.asarray(truth["true_flux"], float)[science]
    if "fiber_wavelength" not in truth:
        raise ValueError("the calibrated exposure has per-fiber wavelengths but the truth has "
                         "no fiber_wavelength (simulated before per-fiber truth existed)")
    wave = calibrated["fiber_wavelength"].transpose("fiber", "wavelength").values[science]
    # The file's solutions: the true ones plus the simulator's arc errors, if any.
    expected = np.asarray(truth["fiber_wavelength"], dtype=float)[science]
    if "arc_error" in truth:
        expected = expected + np.asarray(truth["arc_error"], dtype=float)[science]
    if wave.shape != expected.shape or not np.allclose(wave, expected, rtol=0, atol=1e-6):
        raise ValueError("the calibrated exposure's per-fiber wavelengths differ from the truth's")
    return wave, np.asarray(truth["true_flux_fiber"], dtype=float)[science]


def _telluric_science(ratio, wave, wave_range, telluric):
    """Per fiber: median |S / L - 1| over the telluric-band pixels (module docstring)."""
    lo, hi = max(wave_range[0], float(np.min(wave))), min(wave_range[1], float(np.max(wave)))
    regions = [(a, b) for a, b in load_regions(telluric) if a >= lo and b <= hi]
    if not regions or ratio.shape[0] == 0:
        return np.full(ratio.shape[0], np.nan)
    smooth = running_median(ratio, wave, TELLURIC_WINDOW)
    clear = region_mask(wave, telluric)
    deviation = []
    for a, b in regions:  # a handful of bands
        band = (wave >= a) & (wave <= b)
        side = clear & (wave >= a - TELLURIC_SIDE) & (wave <= b + TELLURIC_SIDE)
        level = np.nanmedian(np.where(side, smooth, np.nan), axis=-1, keepdims=True)
        deviation.append(np.where(band, np.abs(smooth / level - 1.0), np.nan))
    return np.nanmedian(np.concatenate(deviation, axis=-1), axis=-1)


def _science_metrics(calibrated, truth, kinds, window, wave_range, telluric):
    """Shape, level, S/N and telluric error of every science fiber."""
    science = np.flatnonzero(np.isin(kinds, SCIENCE_KINDS))
    wave, true_flux = _science_truth(calibrated, truth, science)
    flux = calibrated["flux"].values[science].astype(float)
    variance = calibrated["variance"].values[science].astype(float)
    use = (wave >= wave_range[0]) & (wave <= wave_range[1]) & region_mask(wave, telluric)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(true_flux > 0.05 * np.nanmedian(true_flux, axis=-1, keepdims=True),
                         flux / true_flux, np.nan)
        snr = np.nanmedian(np.where(use, flux / np.sqrt(variance), np.nan), axis=-1)
    shape, level, _ = _shape_rms(ratio, wave, np.broadcast_to(use, ratio.shape), window)
    tell = np.full(science.size, np.nan)
    bright = snr > SNR_SCIENCE
    if bright.any():
        tell[bright] = _telluric_science(ratio[bright], wave[bright] if wave.ndim == 2 else wave,
                                         wave_range, telluric)
    noiseless = _noiseless(calibrated, truth, science, wave, use, window, bright, wave_range,
                           telluric)
    return {"fiber": science, "kind": kinds[science], "snr": snr, "shape": shape,
            "level": level - 1.0, "telluric": tell, "per_fiber": wave.ndim == 2, **noiseless}


def _noiseless(calibrated, truth, science, wave, use, window, visible, wave_range, telluric):
    """Shape and telluric errors of the factor applied to each science fiber, seen through
    its true response (noiseless counts calibrated / true flux); NaN without the factor."""
    nan = np.full(science.size, np.nan)
    if "cal_factor" not in calibrated or "response_fiber" not in truth:
        return {"shape_noiseless": nan, "telluric_noiseless": nan}
    factor = calibrated["cal_factor"].transpose("fiber", "wavelength").values[science]
    aperture = _fiber_apertures(truth)[science]
    ratio = factor * np.asarray(truth["response_fiber"], dtype=float)[science] * aperture
    shape = _shape_rms(ratio, wave, np.broadcast_to(use, ratio.shape), window)[0]
    tell = nan.copy()
    if visible.any():
        tell[visible] = _telluric_science(ratio[visible],
                                          wave[visible] if wave.ndim == 2 else wave,
                                          wave_range, telluric)
    return {"shape_noiseless": shape, "telluric_noiseless": tell}


def _star_rows(stars, truth):
    """Per standard: fitted minus true parameters (NaN where the truth is unknown)."""
    rows = []
    fibers = np.asarray(stars["fiber"].values)
    for k, fiber in enumerate(np.asarray(truth["std_fiber"])):
        match = np.flatnonzero(fibers == fiber)
        if not match.size:
            continue
        s = int(match[0])
        row = {"fiber": int(fiber), "status": str(stars["status"].values[s]),
               "snr": float(truth["std_snr"][k])}
        if "std_source" in truth:
            row["source"] = str(truth["std_source"][k])
        if "chi2_dof" in stars:
            row["chi2_dof"] = float(stars["chi2_dof"].values[s])
        for name in STAR_PARAMS:
            fitted, true = float(stars[name].values[s]), float(truth[f"std_{name}"][k])
            row[f"fit_{name}"], row[f"true_{name}"] = fitted, true
            row[f"d_{name}"] = fitted - true
        rows.append(row)
    return rows


def star_summary(stars, only_ok=True):
    """Median and 90th percentile of |fitted - true| per parameter over standard stars.

    Parameters
    ----------
    stars : list of dict
        Rows of :func:`compare_with_truth`'s ``stars`` (of one or many exposures).
    only_ok : bool
        Only stars whose fit has status 'ok'.

    Returns
    -------
    dict
        ``n`` (stars counted), and ``<param>_median``, ``<param>_p90`` for each of
        :data:`STAR_PARAMS` (NaN when no star has a known truth), plus ``teff_bias`` (median
        signed Teff error).
    """
    chosen = [s for s in stars if not only_ok or s["status"] == "ok"]
    out = {"n": len(chosen)}
    for name in STAR_PARAMS:
        d = np.array([s[f"d_{name}"] for s in chosen], dtype=float)
        d = np.abs(d[np.isfinite(d)])
        out[f"{name}_median"] = float(np.median(d)) if d.size else np.nan
        out[f"{name}_p90"] = float(np.percentile(d, 90)) if d.size else np.nan
    out["teff_bias"] = _nanmedian([s["d_teff"] for s in chosen])
    return out


def with_true_calibration(calibrated, truth):
    """The calibrated exposure as a perfect calibration would have made it: the counts (flux
    over the applied factor) times 1 / (each fiber's true response x its aperture). Compared
    with the truth, it gives the floor the targets' own noise sets for every metric.

    Parameters
    ----------
    calibrated : xarray.Dataset
        A calibrated exposure with its applied factor ``cal_factor`` (fiber, wavelength).
    truth : mapping
        The simulator's truth (``response_fiber``, ``aperture``).

    Returns
    -------
    xarray.Dataset
        A copy with ``flux``, ``variance`` and ``cal_factor`` replaced.
    """
    counts = calibrated["flux"] / calibrated["cal_factor"]
    counts_var = calibrated["variance"] / calibrated["cal_factor"] ** 2
    factor = calibrated["cal_factor"].copy(data=1.0 / (np.asarray(truth["response_fiber"], float)
                                                      * _fiber_apertures(truth)))
    return calibrated.assign(flux=counts * factor, variance=counts_var * factor**2,
                             cal_factor=factor)


def _fiber_apertures(truth):
    """Each fiber's point-source aperture: (fiber, wavelength) with the simulator's chromatic
    losses (on the common grid: smooth, so also on each fiber's own pixels), else (fiber, 1)."""
    if "aperture_chromatic" in truth:
        return np.asarray(truth["aperture_chromatic"], dtype=float)
    return np.asarray(truth["aperture"], dtype=float)[:, None]


def _reference_aperture(truth, used_fibers):
    """The aperture a calibration's level and shape refer to (module docstring)."""
    if used_fibers.size:
        if "aperture_chromatic" in truth:
            own = np.asarray(truth["aperture_chromatic"], float)[used_fibers]
            expected = np.asarray(truth["aperture_expected"], float)
            return float(np.mean(np.median(own, axis=1))) * expected / np.median(expected)
        return float(np.mean(np.asarray(truth["aperture"], float)[used_fibers]))
    if "aperture_expected" in truth:
        return np.asarray(truth["aperture_expected"], dtype=float)
    return np.nan


def compare_with_truth(calibrated, truth, *, window=100.0, wave_range=(4000.0, 8400.0),
                       telluric="telluric_default"):
    """Compare a calibrated exposure with its simulated truth.

    Parameters
    ----------
    calibrated : path-like or xarray.Dataset
        A calibrated file (or :func:`open_exposure` of one); a Dataset with a
        ``fiber_wavelength`` (fiber, wavelength) coordinate is compared fiber by fiber on its
        own pixels.
    truth : path-like or mapping
        The simulator's ``truth/<expid>.npz``.
    window : float
        Running-median window of the shape metrics, Angstrom.
    wave_range : (float, float)
        Compared range, Angstrom.
    telluric : str or path-like
        Telluric mask (name or file).

    Returns
    -------
    dict
        The metrics of the module docstring, plus ``fibers`` (kind, median S/N per pixel and
        shape error of each science fiber), ``stars`` (a list of dicts of fitted, true and
        fitted minus true parameters), ``star_summary`` (:func:`star_summary` of them),
        ``per_fiber_wavelength`` and ``n_standards``.
    """
    stars = None
    if not hasattr(calibrated, "data_vars"):
        stars = read_standard_stars(calibrated)
        calibrated = open_exposure(calibrated)
    truth = dict(np.load(truth)) if not isinstance(truth, dict) else truth
    wave = calibrated["wavelength"].values
    if not np.allclose(wave, truth["wavelength"], rtol=0, atol=1e-6):
        raise ValueError("the calibrated exposure and the truth have different wavelengths")
    inside = (wave >= wave_range[0]) & (wave <= wave_range[1])
    clear = region_mask(wave, telluric)
    use = inside & clear
    kinds = np.asarray(truth["fiber_kind"]).astype(str)
    used_fibers = np.flatnonzero(kinds == "standard")
    if stars is not None and "used" in stars:
        used_fibers = np.asarray(stars["fiber"].values)[np.asarray(stars["used"].values, bool)]
    if not int(calibrated.attrs.get("fcalnstr") or 0):
        used_fibers = used_fibers[:0]  # calibrated without its standards (survey model)
    reference = _reference_aperture(truth, used_fibers)
    cal_ratio = calibrated["cal"].values * reference * np.asarray(truth["response"], float)
    cal_shape, _, cal_rel = _shape_rms(cal_ratio, wave, use, window)
    band = inside & ~clear
    tell = float(np.sqrt(np.nanmean(cal_rel[band] ** 2))) if band.any() else np.nan
    sci = _science_metrics(calibrated, truth, kinds, window, wave_range, telluric)
    shape, snr = sci["shape"], sci["snr"]
    bright, visible = snr >= 30, snr > SNR_SCIENCE
    out = {
        "expid": str(calibrated.attrs.get("expid")),
        "n_standards": int(calibrated.attrs.get("fcalnstr") or 0),
        "fcalsrc": str(calibrated.attrs.get("fcalsrc", "standards")),
        "cal_shape": float(cal_shape),
        "level_cal": float(np.nanmedian(np.where(use, cal_ratio, np.nan)) - 1.0),
        "telluric": tell,
        "shape": _nanmedian(shape),
        "shape_bright": _nanmedian(shape[bright]),
        "n_bright": int(bright.sum()),
        "shape_snr10": _nanmedian(shape[visible]),
        "n_snr10": int(visible.sum()),
        "telluric_science": _nanmedian(sci["telluric"][visible]),
        "shape_snr10_noiseless": _nanmedian(sci["shape_noiseless"][visible]),
        "telluric_science_noiseless": _nanmedian(sci["telluric_noiseless"][visible]),
        "level": _nanmedian(sci["level"]),
        "science_fibers": int(sci["fiber"].size),
        "per_fiber_wavelength": bool(sci["per_fiber"]),
        "fibers": [(str(k), float(n), float(r))
                   for k, n, r in zip(sci["kind"], snr, shape, strict=True)],
        "stars": [],
    }
    if stars is not None and "std_fiber" in truth:
        out["stars"] = _star_rows(stars, truth)
    out["star_summary"] = star_summary(out["stars"])
    return out
