"""One calibration per exposure: per-star vectors combined, smoothed, and applied to every
fiber with variance propagation.

Combination
-----------
Per-star vectors differ by grey factors (each fiber loses its own share of the star's light)
and agree in shape. Each star's grey level ``g_s`` is its median ratio to the median of all
stars; the shapes ``cal_s / g_s`` are averaged with inverse-variance weights and iterative
per-wavelength sigma clipping (or their median is taken), and the result is put back on the
mean level of the stars (weighted by their photometric scale errors). Masked pixels therefore
never make steps in the combined vector. A star whose shape (median fractional deviation)
or level (|ln ratio|) is far from the others' is rejected first, when there are 3 or more.

Smoothing
---------
Outside telluric bands the combined vector is fitted by a cubic B-spline in ln(lambda), knots
every ``smooth_scale`` Angstrom, inverse-variance weighted; masked gaps (line cores, bad
pixels) are bridged by the spline. In telluric bands the telluric model fitted to the stars
(or, without one, the band's unsmoothed transmission) multiplies the curve interpolated
across the band. Savitzky-Golay is the alternative; without smoothing, gaps are linear.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import xarray as xr

from ._datasets import applied, dataset
from ._inputs import expect_dataset
from ._nan import nan_to_num
from .config import Config
from .constants import CAL_UNIT, FLUX_UNIT
from .continuum import nanmedian as _median_kept
from .errors import CalibrationError, FluxCalWarning
from .exposure import _computed, add_history
from .lsf import LineSpread
from .masks import region_mask
from .smoothing import _bridge, _smooth, running_median
from .telluric import divide_transmission, fit_telluric, transmission, uncovered_red
from .wavelength import distinct_rows, width_ratio

__all__ = ["combine_vectors", "apply_calibration", "calibration_factor", "running_median",
           "quality_grade", "QUALITY_GRADES"]


def _star_label(stars, s):
    name = str(stars.variables["fiber_name"].values[s]) if "fiber_name" in stars.coords else ""
    fiber, objid = (int(stars.variables[n].values[s]) for n in ("fiber", "objid"))  # not DataArrays
    return f"fiber {fiber}" + (f" ({name})" if name else "") + f" objid {objid}"


def _nanmedian(values, axis):
    """np.nanmedian without the warning for all-NaN slices (gaps are expected here); along
    an axis by :func:`~kspec_fluxcal.continuum.nanmedian`'s sort (the same values; numpy's
    masked-array path for short axes, the stars and the scatter's blocks, costs 3-7x more);
    of all values as one row's, by a partial sort (np.nanmedian's, without its copies)."""
    if axis is None:
        return _median_kept(np.reshape(values, (1, -1)))[0, 0]
    return np.squeeze(_median_kept(values, axis), axis)


def combine_vectors(stars, method=None, sigma_clip=None, smooth=None, *, config=None):
    """Combine per-star calibration vectors into the exposure's calibration.

    Parameters
    ----------
    stars : xarray.Dataset
        From :func:`kspec_fluxcal.fit_standards`.
    method : {'weighted_mean', 'median'}, optional
    sigma_clip : float, optional
        Per-wavelength clipping threshold, sigma.
    smooth : bool, optional
        Fit the smooth response (see the module docstring).
    config : Config, optional
        Other options ([combine], [masks], [telluric]); explicit arguments win.

    Returns
    -------
    xarray.Dataset
        Along ``wavelength`` (the reference grid): ``cal`` (= ``cal_smooth`` / ``transmission``),
        ``cal_variance``, ``cal_mask`` (True where measured, False where bridged),
        ``cal_smooth`` (the smooth response and its ``cal_smooth_variance``) and
        ``transmission`` (the telluric model at the exposure's line spread, 1 where none);
        along ``star``: ``star_status`` (the fit's status, or why the combination rejected
        the star), ``grey_level`` and ``used``. Attrs ``fcalnstr``, ``fcalrms`` (robust
        fractional scatter between the stars' shapes, their medians over blocks of the
        smoothing scale; NaN for one star), ``fcalqual`` (quality grade,
        :data:`QUALITY_GRADES`), ``fcalmerr`` (median model error of the stars used),
        ``fcallsf`` (the stars' fitted line-spread width), ``fcalo2``, ``fcalh2o`` (fitted
        telluric columns, with ``_err``; NaN without a telluric model), ``telluric_outliers``
        (pixels out of that fit), ``lsf_fwhm_coeffs`` (line spread), ``single_star``, history.

    Raises
    ------
    CalibrationError
        When no star is usable; the message gives each star's reason.
    """
    expect_dataset(stars, "stars", "combine_vectors", "kspec_fluxcal.fit_standards",
                   ("cal", "cal_variance", "status"))
    config = Config() if config is None else config
    opts = config.combine
    method = opts.method if method is None else method
    sigma_clip = opts.sigma_clip if sigma_clip is None else sigma_clip
    smooth = opts.smooth if smooth is None else smooth
    if method not in ("weighted_mean", "median"):
        raise ValueError(f"method must be 'weighted_mean' or 'median', not {method!r}")
    stars = _computed(stars)
    status = np.array(stars.variables["status"].values, dtype=object)
    use, last_resort = _usable_stars(stars, status, config)
    vec = _StarVectors(stars)
    level_conflict = _reject_stars(stars, vec, use, status, opts)
    idx = np.flatnonzero(use)
    stack = _stack(vec, idx, sigma_clip, opts)
    comb, comb_var = _mean_shape(stack, method)
    measured = stack.m.any(axis=0) & np.isfinite(comb)
    level, level_var = _level(stars, idx, stack.g, opts.aperture_scatter)
    resp = _response(stars, vec, idx, stack, comb, comb_var, measured, smooth, config)
    fcalrms = _scatter(vec.wave, stack, comb, opts, method)
    uncovered = resp.fitted and uncovered_red(vec.wave, config.telluric.lines)
    if uncovered:
        warnings.warn(f"{stars.attrs.get('expid', 'exposure')}: {uncovered}", FluxCalWarning,
                      stacklevel=2)
    if idx.size == 1:
        warnings.warn(f"{stars.attrs.get('expid', 'exposure')}: one usable standard star "
                      f"({_star_label(stars, idx[0])}); no combination, no scatter estimate",
                      FluxCalWarning, stacklevel=2)
    quality = _quality(stars, idx, fcalrms, last_resort, level_conflict)
    out = _calibration(stars, status, use, stack.g, level, level_var, resp, measured, quality)
    out.attrs.update(method=method, smooth=int(bool(smooth)), history=[])
    add_history(out, f"combined {idx.size} of {status.size} standard(s) ({method}, "
                f"clip {sigma_clip:g} sigma{_smoothing_text(smooth, opts)}); rms between "
                f"standards {fcalrms:.4f}; quality {quality.fcalqual}"
                + (f"; telluric columns O2 {resp.telluric['fcalo2']:.3f}, H2O "
                   f"{resp.telluric['fcalh2o']:.3f}" if resp.fitted else
                   "; no telluric model: the bands keep the vector's own absorption"
                   + ("" if smooth else " (it is fitted with the smooth response, [combine] "
                      "smooth = false)")))
    if n := resp.telluric.get("telluric_outliers"):
        add_history(out, f"{n} standards' pixel(s) left out of the telluric fit (cosmic rays?)")
    return out


def _usable_stars(stars, status, config):
    """Which stars the combination starts from: the fit's 'ok' ones, or (none) the last
    resort (:func:`_last_resort`, with a warning). Takes the fit's result and its
    ``status`` (S,); returns ``use`` (S, bool) and whether it is the last resort. Raises
    CalibrationError when there is no star, or none usable (each star's reason given)."""
    if status.size == 0:
        raise CalibrationError("no standard-star fiber in the exposure (HDU FIBRES column TYPE "
                               "has no 'C')")
    use = np.array([s == "ok" for s in status])
    last_resort = not use.any()
    if last_resort:
        use = _last_resort(stars, status, config)
    if not use.any():
        raise CalibrationError("no usable standard star",
                               {_star_label(stars, s): status[s] for s in range(status.size)})
    if last_resort:
        warnings.warn(f"{stars.attrs.get('expid', 'exposure')}: no standard fitted within "
                      f"{100 * config.fit.max_model_error:g}% model error; calibrated from "
                      f"{int(use.sum())} that no template fits well (grade D)", FluxCalWarning,
                      stacklevel=3)
    return use, last_resort


class _Quality(NamedTuple):
    fcalrms: float
    fcalqual: str
    fcalmerr: float


def _quality(stars, idx, fcalrms, last_resort, level_conflict):
    """The calibration's quality figures from the stars used (``idx``): the scatter
    ``fcalrms`` between them (given), the median model error, and the grade (D for the last
    resort, at worst C when two standards' levels conflict, with a warning; else
    :func:`quality_grade`)."""
    merr = _per_star(stars, "model_error", idx)
    fcalmerr = float(np.nanmedian(merr)) if np.isfinite(merr).any() else np.nan
    fcalqual = "D" if last_resort else quality_grade(stars, idx, fcalrms, fcalmerr)
    if level_conflict:
        fcalqual = max(fcalqual, "C")  # the grades are ordered A < B < C < D
        warnings.warn(f"{stars.attrs.get('expid', 'exposure')}: the two standards disagree in "
                      "level by more than aperture losses allow (wrong photometry for one of "
                      "them?); their mean level is used", FluxCalWarning, stacklevel=3)
    return _Quality(fcalrms, fcalqual, fcalmerr)


def _calibration(stars, status, use, g, level, level_var, resp, measured, quality):
    """The combination as a Dataset: the response ``resp`` put back on the stars' mean
    ``level`` (with its variance), per-star status, grey levels (``g`` of the used stars,
    over the level) and use, and the attrs (FCAL* keywords, telluric columns, line spread)."""
    idx = np.flatnonzero(use)
    grey = np.full(status.size, np.nan)
    grey[idx] = g / level
    return dataset(
        {
            "cal": ("wavelength", level * resp.curve, {"units": CAL_UNIT}),
            # Pixel to pixel only: the level's error, common to every pixel of every fiber,
            # is FCALLERR (as a per-pixel variance it hid the noise of bright fibers).
            "cal_variance": ("wavelength", level**2 * resp.curve_var,
                             {"units": f"({CAL_UNIT})**2"}),
            "cal_mask": ("wavelength", measured,
                         {"description": "True = measured, False = bridged over a gap"}),
            "cal_smooth": ("wavelength", level * resp.smooth,
                           {"units": CAL_UNIT, "description": "smooth response (no tellurics)"}),
            "cal_smooth_variance": ("wavelength", level**2 * resp.smooth_var,
                                    {"units": f"({CAL_UNIT})**2"}),
            "transmission": ("wavelength", resp.transmission,
                             {"units": "1", "description": "telluric model at the exposure's "
                              "line spread (1: none)"}),
            "star_status": ("star", status.astype(str)), "grey_level": ("star", grey),
            "used": ("star", use),
        },
        # Variables: DataArrays would be built with coordinates, then aligned (0.3 ms).
        {"wavelength": stars.variables["wavelength"], "star": np.arange(status.size),
         **{name: ("star", stars.variables[name].values) for name in ("fiber", "objid")}},
        {"fcalnstr": int(idx.size), "fcalrms": quality.fcalrms,
         "single_star": int(idx.size == 1), "fcalqual": quality.fcalqual,
         "fcalmerr": quality.fcalmerr, "fcallsf": float(stars.attrs.get("lsf_scale", np.nan)),
         # The level's fractional variance (FCALLERR its square root); the vectors'
         # variances are the shape's (the survey model's input).
         "level_variance": float(level_var), "fcallerr": float(np.sqrt(level_var)),
         **resp.telluric, "lsf_fwhm_coeffs": list(stars.attrs.get("lsf_fwhm_coeffs", []))},
        # The stars' wavelength index, not built again from its 4k values (0.16 -> 0.03 ms).
        {"wavelength": stars.xindexes["wavelength"],
         "star": xr.indexes.PandasIndex(np.arange(status.size), "star")},
    )


def _smoothing_text(smooth, opts):
    """How the response was smoothed, for the history entry."""
    if not smooth:
        return ", unsmoothed"
    kind = "B-spline knots" if opts.smooth_method == "bspline" else "Savitzky-Golay"
    return f", {kind} {opts.smooth_scale:g} A"


class _StarVectors:
    """The stars' vectors as arrays: reference and own wavelengths, values, masks."""

    def __init__(self, stars):
        # Variables: a DataArray of the stars' Dataset would carry its ~40 coordinates.
        variables = stars.variables
        self.wave = variables["wavelength"].values
        self.star_wave = (variables["star_wavelength"].values if "star_wavelength" in stars.coords
                          else np.broadcast_to(self.wave, variables["cal"].shape))
        self.cal = variables["cal"].values
        self.var = variables["cal_variance"].values
        if "star_wavelength" in stars.coords:
            # Per count on the star's own pixels -> per count on a reference pixel (counts
            # scale with the pixel's width): stars on solutions of other dispersions agree.
            width = width_ratio(self.wave, self.star_wave)
            self.cal, self.var = self.cal * width, self.var * width**2
        self.mask = (variables["cal_mask"].values & np.isfinite(self.cal) & np.isfinite(self.var)
                     & (self.var > 0))
        self._grey = (None, None)

    def grey_levels(self, idx):
        """Grey levels of stars ``idx``, kept: the rejection's last ones are the stack's."""
        if self._grey[0] != tuple(idx):
            ref = _nanmedian(np.where(self.mask[idx], self.cal[idx], np.nan), axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(self.mask[idx], self.cal[idx] / ref, np.nan)
            self._grey = (tuple(idx), _nanmedian(ratio, axis=1))
        return self._grey[1]


def _reject_stars(stars, vec, use, status, opts):
    """Whole stars rejected (``use`` and ``status`` updated in place), worst first, while a
    majority can outvote one: shape or grey level far from the others'. Of two standards
    whose levels disagree beyond aperture losses, the one implying an implausible throughput
    goes. Returns True when two remain in such disagreement."""
    while use.sum() >= 3:
        idx = np.flatnonzero(use)
        g = vec.grey_levels(idx)
        shapes = vec.cal[idx] / g[:, None]
        dev_shape = np.empty(idx.size)
        for k in range(idx.size):  # leave-one-out, over a handful of stars
            others = _nanmedian(np.where(vec.mask[np.delete(idx, k)], np.delete(shapes, k, 0),
                                         np.nan), axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                dev_shape[k] = _nanmedian(np.abs(np.where(vec.mask[idx[k]], shapes[k] / others,
                                                          np.nan) - 1.0), axis=None)
        dev_level = np.abs(np.log(g / np.median(g)))
        bad = (dev_shape > opts.star_deviation) | (dev_level > opts.star_level)
        if not bad.any():
            break
        worst = np.argmax(np.where(bad, np.maximum(dev_shape / opts.star_deviation,
                                                   dev_level / opts.star_level), -np.inf))
        s = idx[worst]
        status[s] = (f"rejected in combination: shape deviates {100 * dev_shape[worst]:.1f}%, "
                     f"level {100 * np.expm1(dev_level[worst]):+.0f}% from the others"
                     + (" (photometry of another star, or a blend?)"
                        if dev_level[worst] / opts.star_level > dev_shape[worst]
                        / opts.star_deviation else ""))
        use[s] = False
    idx = np.flatnonzero(use)
    if idx.size != 2:
        return False
    g = vec.grey_levels(idx)
    if abs(np.log(g[0] / g[1])) <= 2 * opts.star_level:
        return False
    # More than aperture losses allow: one star's photometry is wrong. The one whose implied
    # throughput the instrument cannot have goes; if neither (or both) can be told, both stay
    # and the grade says how little the level is worth.
    odd = [k for k in range(2) if "implied throughput" in _per_star_text(stars, "flags", idx[k])]
    if len(odd) != 1:
        return True
    s = idx[odd[0]]
    status[s] = (f"rejected in combination: level ratio {g[odd[0]] / g[1 - odd[0]]:.3g} to the "
                 "other standard, and an implausible implied throughput")
    use[s] = False
    return False


def _stack(vec, idx, sigma_clip, opts):
    """The used stars' shapes (grey levels removed), variances and clipped masks."""
    g = vec.grey_levels(idx)
    shapes = vec.cal[idx] / g[:, None]
    svar = vec.var[idx] / g[:, None] ** 2
    m = vec.mask[idx].copy()
    for _ in range(opts.iterations if idx.size >= 3 else 0):
        w = np.where(m, 1.0 / svar, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(w * nan_to_num(shapes), 0) / w.sum(0)
        new = m & (np.abs(shapes - mean) <= sigma_clip * np.sqrt(svar))
        if np.array_equal(new, m):
            break
        m = new
    return SimpleNamespace(g=g, shapes=shapes, svar=svar, m=m, star_wave=vec.star_wave[idx])


#: Variance of the median of n normal values over that of their mean, n = 0..7 (Gaussian
#: order statistics; the median of 2 is their mean); pi/2 beyond.
_MEDIAN_EFFICIENCY = np.array([1.0, 1.0, 1.0, 1.346, 1.193, 1.434, 1.288, 1.473])


def _mean_shape(stack, method, shapes=None):
    """Weighted mean (or median) of the stars' shapes per pixel, and its variance."""
    shapes = stack.shapes if shapes is None else shapes
    w = np.where(stack.m, 1.0 / stack.svar, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "median":
            n = stack.m.sum(0)
            factor = np.where(n < _MEDIAN_EFFICIENCY.size,
                              _MEDIAN_EFFICIENCY[np.minimum(n, _MEDIAN_EFFICIENCY.size - 1)],
                              np.pi / 2)
            return _nanmedian(np.where(stack.m, shapes, np.nan), axis=0), factor / w.sum(0)
        return np.nansum(w * nan_to_num(shapes), 0) / w.sum(0), 1.0 / w.sum(0)


def _level(stars, idx, g, aperture_scatter):
    """Mean grey level, weighted by each star's photometric scale error, and its fractional
    variance: the mean's photometric error and the standards' aperture losses, whose mean
    over n fibers differs from another fiber's by ``aperture_scatter`` / sqrt(n) (the level
    a point source in a fiber is calibrated to).

    Not the scatter of the standards' own levels: from 2 or 3 values it is an estimate of
    one or two degrees of freedom, which grew the error with the number of standards."""
    scale, scale_err = (stars.variables[name].values[idx] for name in ("scale", "scale_err"))
    rel = nan_to_num(scale_err / scale, nan=0.05)
    lw = 1.0 / np.maximum(rel, 1e-3) ** 2
    level = np.sum(lw * g) / lw.sum()
    return level, 1.0 / lw.sum() + aperture_scatter**2 / idx.size


def _scatter(wave, stack, comb, opts, method):
    """FCALRMS: the stars' shapes about the combination on the smoothing scale (pixel noise
    averaged out: medians over blocks of ``smooth_scale``, at least 50 A), robust; NaN for
    one star."""
    n = stack.shapes.shape[0]
    if n < 2:
        return np.nan
    size = max(3, int(round(max(opts.smooth_scale, 50.0) / float(np.median(np.diff(wave))))))
    nblock = -(-wave.size // size)

    def block_medians(values):  # (n, P) -> (n, nblock), the star's pixels only
        padded = np.full((n, nblock * size), np.nan)
        padded[:, :wave.size] = np.where(stack.m, values, np.nan)
        return _nanmedian(padded.reshape(n, nblock, size), axis=2)

    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "median":
            # Each star and the combination averaged over a block before they are compared:
            # a per-pixel median IS one of the stars at each pixel, and the block medians of
            # star / combination came out at zero where noise dominates (FCALRMS 0, grade A).
            blocks = block_medians(stack.shapes) / block_medians(
                np.broadcast_to(comb, stack.shapes.shape)) - 1.0
        else:  # the ratio per pixel, as graded so far (blocks first read ~1.4 x higher)
            blocks = block_medians(stack.shapes / comb) - 1.0
    return float(1.4826 * _nanmedian(np.abs(blocks), axis=None) * np.sqrt(n / (n - 1)))


#: Quality grades (header FCALQUAL), from the standards used: (grade, meaning).
QUALITY_GRADES = {
    "A": "two or more standards that agree (FCALRMS <= 2 %), fitted within 3 % (FCALMERR), "
         "S/N >= 20",
    "B": "two or more standards agreeing within 5 %, or one standard of S/N >= 30 fitted "
         "within 3 % whose photometry agrees within 0.05 mag",
    "C": "one standard (noisy, or a model error of 3-10 %), or standards disagreeing by more "
         "than 5 %",
    "D": "calibrated, but flagged: not from the exposure's own standards, an implausible "
         "throughput, or only standards no template fits (model error beyond max_model_error, "
         "up to twice it)",
}
#: Thresholds of the grades: FCALRMS (A, B), model error, S/N (A, single star), photometry.
_GRADE_LIMITS = {"rms_a": 0.02, "rms_b": 0.05, "model_error": 0.03, "snr_a": 20.0,
                 "snr_single": 30.0, "phot_rms": 0.05}


def _last_resort(stars, status, config):
    """Stars rejected only for their model error, up to twice ``max_model_error``: an
    exposure none of whose standards any template fits well is calibrated from them (grade
    D) rather than lost; beyond that the spectrum is not a star like the templates at all."""
    merr = _per_star(stars, "model_error", np.arange(status.size))
    limit = 2.0 * config.fit.max_model_error
    return np.array([str(s).startswith("model error") and m <= limit
                     for s, m in zip(status, merr, strict=True)])


def quality_grade(stars, used, fcalrms, fcalmerr):
    """The quality grade of a calibration from the standards ``used`` (indices); see
    :data:`QUALITY_GRADES`."""
    lim = _GRADE_LIMITS
    flags = stars.variables["flags"].values[used] if "flags" in stars.coords else []
    if any("throughput" in str(f) for f in flags):
        return "D"
    # What the fit did not record (NaN) does not lower the grade.
    snr = _per_star(stars, "snr", used)
    phot = _per_star(stars, "phot_rms", used)
    fitted_well = not (fcalmerr > lim["model_error"])
    if len(used) >= 2:
        if fcalrms <= lim["rms_a"] and fitted_well and not np.any(snr < lim["snr_a"]):
            return "A"
        return "B" if fcalrms <= lim["rms_b"] else "C"
    if not snr[0] < lim["snr_single"] and fitted_well and not phot[0] > lim["phot_rms"]:
        return "B"
    return "C"


def _per_star_text(stars, name, index):
    """A per-star text coordinate at ``index`` ('' where the fit did not record it)."""
    return str(stars.variables[name].values[index]) if name in stars.coords else ""


def _per_star(stars, name, index):
    """A per-star coordinate at ``index``, NaN where the fit did not record it."""
    if name in stars.coords or name in stars:
        return np.asarray(stars.variables[name].values, dtype=float)[index]
    return np.full(np.size(index), np.nan)


# ----------------------------------------------------------------------------- response


def _response(stars, vec, idx, stack, comb, comb_var, measured, smooth, config):
    """The calibration's shape: curve = smooth response / telluric transmission.

    The response is a spline without knots inside the telluric bands (one smooth piece
    across each: a knot every ``smooth_scale`` could follow a band's broad absorption).
    With the telluric model (``[telluric] model``, bands in range), it is first fitted
    outside the bands; the stars' observed transmissions (response / shape, each on its own
    pixels and line spread) give the columns (o2, h2o); the stars' shapes times their model
    transmission are combined again and the response fitted through the bands; twice. The
    model transmission is the curve's absorption. Without it, the bands keep the combined
    vector's own (unsmoothed) absorption.
    """
    opts = config.combine
    wave = vec.wave
    bands = ~region_mask(wave, config.masks.telluric)
    none = {"fcalo2": np.nan, "fcalo2_err": np.nan, "fcalh2o": np.nan, "fcalh2o_err": np.nan}
    if not smooth:
        curve, var = _bridge(wave, comb, comb_var, measured)
        return _Response(curve, var, curve, var, np.ones(wave.size), none, False)
    lsf = LineSpread(tuple(stars.attrs["lsf_fwhm_coeffs"])) if stars.attrs.get(
        "lsf_fwhm_coeffs") else None
    # No knot inside a band: there the response is one smooth piece from both sides, which
    # cannot mimic a band's broad absorption (the telluric columns would be biased low).
    bands_padded = ~region_mask(wave, config.masks.telluric, pad=opts.smooth_scale / 2)
    # The smooth curve's variance is computed only for the fit that is kept.
    smooth_curve, smooth_var = _smooth(wave, comb, comb_var, measured & ~bands, opts,
                                       bands_padded)
    band_pixels = stack.m & ~region_mask(stack.star_wave, config.masks.telluric)
    if not (config.telluric.model and lsf is not None and band_pixels.any()):
        return _copied_bands(wave, comb, comb_var, measured, bands, smooth_curve, smooth_var())
    airmass = float(stars.attrs.get("airmass", np.nan))
    start = (airmass, airmass) if np.isfinite(airmass) and airmass >= 1 else (1.0, 1.0)
    scale = _per_star(stars, "fiber_lsf_scale", idx)
    scale, n_out = np.where(np.isfinite(scale), scale, 1.0), 0
    star_x, x = np.log(stack.star_wave), np.log(wave)
    shapes4 = np.square(np.square(stack.shapes))  # (numpy's power of 4: 100x slower)
    for _ in range(2):  # the columns from the response, the response through the bands
        expected = np.interp(star_x, x, smooth_curve)
        with np.errstate(invalid="ignore", divide="ignore"):
            observed = expected / stack.shapes
            weight = np.where(band_pixels, shapes4 / (expected**2 * stack.svar), 0.0)
        fit = fit_telluric(stack.star_wave, observed, nan_to_num(weight), lsf, start=start,
                           scale=scale, source=config.telluric.lines)
        # A cosmic ray in a band: out of the next fit and of the response.
        band_pixels, stack.m = band_pixels & ~fit["outliers"], stack.m & ~fit["outliers"]
        n_out += int(fit["outliers"].sum())
        columns = np.array([fit["o2"], fit["h2o"]])
        if not np.isfinite(columns).any():
            return _copied_bands(wave, comb, comb_var, measured, bands, smooth_curve, smooth_var())
        start = tuple(nan_to_num(columns))
        corrected, corrected_var = _mean_shape(stack, "weighted_mean", stack.shapes * fit["model"])
        smooth_curve, smooth_var = _smooth(wave, corrected, corrected_var,
                                           measured & stack.m.any(axis=0), opts, bands_padded)
    trans = transmission(wave, lsf, *start, source=config.telluric.lines)
    telluric = {"fcalo2": float(fit["o2"]), "fcalo2_err": float(fit["o2_err"]),
                "fcalh2o": float(fit["h2o"]), "fcalh2o_err": float(fit["h2o_err"]),
                "telluric_lines": str(config.telluric.lines),
                "telluric_outliers": n_out}
    smooth_var = smooth_var()
    return _Response(smooth_curve / trans, smooth_var / trans**2, smooth_curve, smooth_var,
                     trans, telluric, True)


class _Response(NamedTuple):
    curve: np.ndarray
    curve_var: np.ndarray
    smooth: np.ndarray
    smooth_var: np.ndarray
    transmission: np.ndarray
    telluric: dict
    fitted: bool


def _copied_bands(wave, comb, comb_var, measured, bands, smooth_curve, smooth_var):
    """Telluric bands keep the combined vector's own absorption on top of the smooth curve."""
    x = np.log(wave)
    with np.errstate(invalid="ignore", divide="ignore"):
        trans = np.where(bands & measured, smooth_curve / comb, np.nan)
    have = np.isfinite(trans)
    trans_full = np.ones(wave.size)
    if have.any():
        trans_full = np.where(bands, np.interp(x, x[have], trans[have]), 1.0)
    none = {"fcalo2": np.nan, "fcalo2_err": np.nan, "fcalh2o": np.nan, "fcalh2o_err": np.nan}
    curve_var = np.where(bands & measured, comb_var, smooth_var / trans_full**2)
    return _Response(smooth_curve / trans_full, curve_var, smooth_curve, smooth_var,
                     trans_full, none, False)


# ----------------------------------------------------------------------------- application


def calibration_factor(calibration, fiber_wavelength, fiber_lsf_scale=None):
    """The calibration evaluated on each fiber's own pixels (no pixel is resampled).

    With a telluric model (attrs ``fcalo2``/``fcalh2o``): the smooth response interpolated
    at each pixel (in ln lambda) over the model transmission at the pixel, seen through the
    fiber's own line spread (the exposure's, times ``fiber_lsf_scale``). Without one: the
    vector ``cal`` interpolated at each pixel.

    Parameters
    ----------
    calibration : xarray.Dataset
        From :func:`combine_vectors`, on the reference grid.
    fiber_wavelength : xarray.DataArray or xarray.Variable
        (fiber, wavelength): each fiber's pixel wavelengths, Angstrom (air); NaN where a
        pixel has none.
    fiber_lsf_scale : array_like, shape (fiber,), optional
        Each fiber's line-spread width relative to the exposure's (FIBRES column LSF_SCALE).

    Returns
    -------
    factor, variance : xarray.DataArray (Variable for a Variable)
        (fiber, wavelength), flux unit per count; NaN where a pixel has no wavelength or lies
        more than half a pixel beyond the reference grid.
    """
    attrs = calibration.attrs
    model = np.isfinite([attrs.get("fcalo2", np.nan), attrs.get("fcalh2o", np.nan)]).any()
    names = ("cal_smooth", "cal_smooth_variance") if model else ("cal", "cal_variance")
    ref_wave = calibration.variables["wavelength"].values
    ref = np.log(ref_wave)
    values = np.stack([calibration.variables[n].values for n in names])
    columns = nan_to_num([attrs.get("fcalo2", np.nan), attrs.get("fcalh2o", np.nan)])
    errors = nan_to_num([attrs.get("fcalo2_err", np.nan), attrs.get("fcalh2o_err", np.nan)])
    margin = 0.5 * np.array([ref[1] - ref[0], ref[-1] - ref[-2]]) if ref.size > 1 else (0, 0)

    def kernel(fiber_wave):
        # Each distinct row (wavelengths, line spread) once: fibers often share a solution.
        rows, inverse = distinct_rows(fiber_wave, fiber_lsf_scale)
        wave, scale = rows[:, 1:].astype(fiber_wave.dtype, copy=False), rows[:, 0]
        ok = np.isfinite(wave) & (wave > 0)
        x = np.log(np.where(ok, wave, 1.0))
        # Within half a pixel beyond the reference grid (the median of the fibers' own
        # solutions, so each fiber's first or last pixel may lie just outside it) the ends'
        # values hold; beyond, a pixel has no calibration.
        inside = ok & (x >= ref[0] - margin[0]) & (x <= ref[-1] + margin[1])
        # Value and variance: one interpolation each over all pixels (no gather and scatter),
        # then in place, not stacked (14 fibers' own solutions: 0.5 MB arrays, ~0.2 ms each).
        out, outside = [np.interp(x, ref, value) for value in values], ~inside
        for part in out:
            np.copyto(part, np.nan, where=outside)
        # Per count on a reference pixel -> per count on the fiber's own (1 on the grid).
        width = width_ratio(ref_wave, wave, ln=(ref, x))
        out[0] /= width
        out[1] /= np.square(width)
        if model:  # on the stars' and reference grid's rows, the combination's model (cache)
            divide_transmission(out, np.where(inside, wave, np.nan), LineSpread(tuple(
                attrs["lsf_fwhm_coeffs"])), columns, errors, scale=scale,
                source=attrs.get("telluric_lines", "telluric_lines"))
        own = np.array_equal(inverse, np.arange(inverse.size))  # every row its own: no copy
        return tuple(part if own else part[inverse] for part in out)

    factor, variance = applied(kernel, ("fiber", "wavelength"), fiber_wavelength) or xr.apply_ufunc(
        kernel, fiber_wavelength, input_core_dims=[["fiber", "wavelength"]],
        output_core_dims=[["fiber", "wavelength"]] * 2, dask="parallelized",
        output_dtypes=[np.float64, np.float64])
    factor.attrs = {"units": CAL_UNIT, "description": "factor applied to each pixel"}
    variance.attrs = {"units": f"({CAL_UNIT})**2"}
    return factor, variance


def _calibrated(flux, variance, factor, factor_var):
    """Flux and variance (float32) calibrated by ``factor`` (variance ``factor_var``); a value
    beyond float32's range (from a damaged pixel of ~1e38 counts) is no data, NaN, not an
    infinity and a cast warning that names no file."""
    flux = flux.astype(np.float64)
    # The reader made infinite counts NaN: an infinity here is float32's overflow.
    with np.errstate(over="ignore"):
        out = ((flux * factor).astype(np.float32),
               (variance * factor**2 + flux**2 * factor_var).astype(np.float32))
    for values in out:
        values[np.isinf(values)] = np.nan
    return out


def apply_calibration(exposure, calibration):
    """Calibrate every fiber on its own pixels: flux x F, variance x F^2 + flux^2 x var(F),
    with F the calibration evaluated at each pixel's wavelength. Lazy.

    Parameters
    ----------
    exposure : xarray.Dataset
        From :func:`kspec_fluxcal.open_exposure` (counts); may be Dask-backed. Without a
        ``fiber_wavelength`` coordinate every fiber is on the ``wavelength`` grid.
    calibration : xarray.Dataset
        From :func:`combine_vectors`: ``cal``, ``cal_variance``, ``cal_mask`` on the
        exposure's reference wavelengths.

    Returns
    -------
    xarray.Dataset
        The exposure with ``flux``/``variance`` in flux density (FLUX_UNIT) on the same
        pixels, ``cal_factor`` and ``cal_factor_variance`` (fiber, wavelength: what was
        applied), the calibration variables (reference grid), attrs ``fcalnstr``,
        ``fcalrms``, ``fcalsrc``, ``fcalqual``, ... and the history.
    """
    expect_dataset(exposure, "exposure", "apply_calibration", "kspec_fluxcal.open_exposure",
                   ("flux", "variance", "wavelength"))
    expect_dataset(calibration, "calibration", "apply_calibration",
                   "kspec_fluxcal.combine_vectors", ("cal", "cal_variance", "cal_mask"))
    # Variables: a DataArray carries (and compares) the exposure's coordinates at every step.
    variables = exposure.variables
    flux, variance = variables["flux"], variables["variance"]
    fiber_wave = (variables["fiber_wavelength"] if "fiber_wavelength" in exposure.coords
                  else variables["wavelength"].set_dims(flux.dims, flux.shape))
    scale = variables["fibres_lsf_scale"].values if "fibres_lsf_scale" in exposure.coords else None
    factor, factor_var = calibration_factor(calibration, fiber_wave.transpose("fiber", ...), scale)
    calibrated = dict(zip(("flux", "variance"), applied(
        _calibrated, flux.dims, flux, variance, factor, factor_var) or xr.apply_ufunc(
        _calibrated, flux, variance, factor, factor_var, output_core_dims=[[], []],
        dask="parallelized", output_dtypes=[np.float32, np.float32]), strict=True))
    # The exposure's attrs with the new unit (not the factor's: its description is not the flux's).
    calibrated["flux"].attrs = flux.attrs | {"units": FLUX_UNIT}
    calibrated["variance"].attrs = variance.attrs | {"units": f"({FLUX_UNIT})**2"}
    calibrated.update(cal_factor=factor, cal_factor_variance=factor_var)
    # On the exposure's grid (NaN where the calibration's differs; the same grid: no alignment).
    names = [n for n in ("cal", "cal_variance", "cal_mask", "cal_smooth") if n in calibration]
    same = exposure.xindexes["wavelength"].equals(calibration.xindexes.get("wavelength"))
    cal = calibration if same else calibration[names].reindex_like(exposure)
    calibrated.update({name: cal.variables[name] for name in names})
    data = {name: calibrated.pop(name, variables[name]) for name in exposure.data_vars}
    out = dataset(data | calibrated, {name: variables[name] for name in exposure.coords},
                  exposure.attrs, dict(exposure.xindexes))  # not assign's merge: 0.6 -> 0.35 ms
    out.attrs["history"] = list(exposure.attrs.get("history", [])) + list(
        calibration.attrs.get("history", []))
    out.attrs.update({"fcalnstr": calibration.attrs.get("fcalnstr", 0),
                      "fcalrms": calibration.attrs.get("fcalrms", np.nan),
                      "fcalsrc": calibration.attrs.get("fcalsrc", "standards")})
    out.attrs.update({name: calibration.attrs[name] for name in (
        "fcalqual", "fcalmerr", "fcallerr", "fcallsf", "fcalo2", "fcalo2_err", "fcalh2o",
        "fcalh2o_err", "model_id", "model_grey") if name in calibration.attrs})
    add_history(out, f"flux calibrated all {exposure.sizes['fiber']} fibers on their own "
                "pixels: flux x F, variance x F^2 + flux^2 x var(F), F the calibration at "
                "each pixel's wavelength (extension FCALFAC); BUNIT " + FLUX_UNIT)
    unsolved = exposure.attrs.get("unsolved") or {}
    out.attrs["fcalunsl"] = int(sum(unsolved.values()))
    if unsolved:
        text = ", ".join(f"fiber {f}: {n}" for f, n in sorted(unsolved.items()))
        add_history(out, f"pixels without a wavelength solution, left uncalibrated (NaN): {text}")
        warnings.warn(f"{exposure.attrs.get('expid', 'exposure')}: pixels without a wavelength "
                      f"solution left uncalibrated ({text})", FluxCalWarning, stacklevel=2)
    return out
