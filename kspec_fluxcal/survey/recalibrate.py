"""One exposure recalibrated with the survey model: its own standards with the model as a
prior, or the model alone when it has no usable standard.

With standards (FCALSRC 'standards+model'): on the archive grid, the exposure's own smooth
response ``y`` (ln of 1 / (own_smooth exptime)) and the model's prediction at its night,
airmass and seeing ``m`` (grey-free) are combined point by point with inverse-variance
weights: ``y`` has the variance of its shape (formal, plus sigma_star^2 / n for n standards),
``m + g`` (g the exposure's own grey level against the model) the model's parameter variance
plus tau^2 (the exposures' real scatter about the model). One noisy standard takes most of
its shape from the model, three good ones keep theirs; the level stays the standards'.
The telluric columns and the line-spread width stay the exposure's own.

Without standards (FCALSRC 'model', grade D): the model's prediction, with the grey level of
its night's line against airmass at the exposure's airmass (the night's mean transparency
and grey extinction, per second of exposure time), O2 = the airmass and H2O = the night's
median water column per airmass times the airmass, at the exposure's line spread times the
night's median fitted width (FCALLSF).

The result is a calibration Dataset like :func:`kspec_fluxcal.combine_vectors`'s, applied to
every fiber on its own pixels by :func:`kspec_fluxcal.apply_calibration`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..constants import CAL_UNIT
from ..errors import CalibrationError
from ..exposure import add_history
from ..lsf import exposure_lsf
from ..telluric import transmission
from .archive import archive_grid, night_of

__all__ = ["combine_with_model", "model_calibration", "MODEL_GRADE", "SOURCES"]

#: FCALSRC values of calibrations made with the survey model.
SOURCES = {"with": "standards+model", "alone": "model"}
#: Quality grade (FCALQUAL) of a calibration from the model alone: D ("not from the
#: exposure's own standards"; kspec_fluxcal.calibration.QUALITY_GRADES).
MODEL_GRADE = "D"
#: Relative error of a predicted O2 column (O2 follows the airmass to a few per cent).
_O2_ERROR = 0.03


def combine_with_model(y, formal, pred, pred_var, *, nstars, tau2, star_var):
    """Inverse-variance combination of an exposure's own ln response with the model's.

    Parameters
    ----------
    y, formal : numpy.ndarray
        The exposure's ln(1 / (own_smooth exptime)) and its formal variance (NaN: no data).
    pred, pred_var : numpy.ndarray
        The model's grey-free prediction and its variance, same points.
    nstars : int
        Standards used.
    tau2, star_var : numpy.ndarray or float
        The model's error model at the same points
        (:meth:`kspec_fluxcal.survey.model.SurveyModel.errors`).

    Returns
    -------
    combined, variance : numpy.ndarray
        NaN where the exposure has no data.
    grey : float
        The exposure's own level against the model (ln).
    own_weight : float
        Median share of the exposure's own response in the combination (0-1).
    """
    v_own = np.nan_to_num(formal, nan=0.0) + star_var / max(int(nstars), 1)
    v_model = pred_var + tau2
    ok = np.isfinite(y) & np.isfinite(pred)
    if not ok.any():
        raise CalibrationError("no overlap between the exposure's own response and the model")
    w = 1.0 / (v_own + v_model)
    grey = float(np.sum(w[ok] * (y - pred)[ok]) / np.sum(w[ok]))
    share = v_model / (v_own + v_model)
    combined = np.where(ok, share * y + (1.0 - share) * (pred + grey), np.nan)
    variance = np.where(ok, v_own * v_model / (v_own + v_model), np.nan)
    return combined, variance, grey, float(np.median(share[ok]))


def model_calibration(exposure, model, levels, own, row, config, *, utc_offset, model_id):
    """The calibration of an exposure with the survey model (module docstring).

    Parameters
    ----------
    exposure : xarray.Dataset
        From :func:`kspec_fluxcal.open_exposure`.
    model : kspec_fluxcal.survey.model.SurveyModel
    levels : kspec_fluxcal.survey.levels.Levels
    own : dict or None
        The exposure's own-standards data (:func:`kspec_fluxcal.survey.archive.read_own`); None
        without usable standards.
    row : dict or None
        Its archive row's fields (n_stars_used, fcalrms, fcalqual, fcalmerr, fcallsf,
        fcalo2, fcalh2o and their errors) with ``own``.
    config : Config
    utc_offset : float
        Site clock (names the night).
    model_id : str
        Recorded as FCALMOD.

    Returns
    -------
    xarray.Dataset
        As :func:`kspec_fluxcal.combine_vectors` returns, on the exposure's reference grid.
    """
    attrs = exposure.attrs
    airmass = float(attrs.get("airmass", np.nan))
    if not np.isfinite(airmass):
        raise CalibrationError("no AIRMASS in the header: the survey model cannot predict its "
                               "extinction")
    session = night_of(attrs["mjd"], utc_offset)
    grid = archive_grid()
    inside = (grid >= model.spec.wave_range[0]) & (grid <= model.spec.wave_range[1])
    loglam = np.log(grid[inside])
    exptime = float(attrs["exptime"])
    p = _prediction(model, levels, own, row, session, airmass,
                    float(attrs.get("seeing", np.nan)), loglam, inside, exptime)
    per_aa = np.exp(-p["combined"]) / exptime  # flux per (count per Angstrom)
    wave = exposure["wavelength"].values
    x = np.log(wave)
    valid = np.isfinite(per_aa)
    smooth = np.interp(x, loglam[valid], per_aa[valid], left=np.nan, right=np.nan) / np.gradient(
        wave)
    rel_var = np.interp(x, loglam[valid], p["variance"][valid])  # the level's: FCALLERR
    lsf = exposure_lsf(exposure, config).scaled(p["lsf_scale"])
    trans = _transmission(wave, lsf, p["telluric"], own, grid, inside, config)
    out = _dataset(exposure, smooth, rel_var, trans, p["telluric"], lsf, config)
    out.attrs.update(_model_attrs(own, row, p, model_id))
    add_history(out, _history(p, session, airmass, exptime, model))
    return out


def _prediction(model, levels, own, row, session, airmass, seeing, loglam, inside, exptime):
    """The exposure's ln response on the archive grid's points ``loglam``: own standards
    combined with the model, or the model alone; with its variance (shape, and level apart),
    telluric columns and line-spread scale."""
    pred, pred_var = (a[0] for a in model.predict([session], [airmass], [seeing],
                                                  grid_index=inside))
    tau2, star_var = model.errors(loglam)
    level = {k: float(v[0]) for k, v in levels.of([session]).items()}
    if own is None:
        grey = level["intercept"] + level["slope"] * airmass
        return {"combined": pred + grey, "variance": pred_var + tau2, "grey": grey,
                "level_var": level["scatter"] ** 2, "share": 0.0, "lsf_scale": level["lsf"],
                "telluric": {"fcalo2": airmass, "fcalo2_err": _O2_ERROR * airmass,
                             "fcalh2o": level["water"] * airmass,
                             "fcalh2o_err": level["water_scatter"] * airmass},
                "source": SOURCES["alone"], "scatter": level["scatter"]}
    smooth = own["own_smooth"][inside].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = -np.log(smooth * exptime)
        formal = own["own_smooth_variance"][inside] / smooth**2
    combined, variance, grey, share = combine_with_model(
        y, formal, pred, pred_var, nstars=row["n_stars_used"], tau2=tau2, star_var=star_var)
    level_var = float(row.get("level_variance", np.nan))
    return {"combined": combined, "variance": variance, "grey": grey, "share": share,
            # The level stays the standards', with its (photometric) variance.
            "level_var": level_var if np.isfinite(level_var) else 0.0,
            "lsf_scale": float(row["fcallsf"]) if np.isfinite(row["fcallsf"]) else 1.0,
            "telluric": {k: float(row[k]) for k in ("fcalo2", "fcalo2_err", "fcalh2o",
                                                    "fcalh2o_err")},
            "source": SOURCES["with"], "scatter": np.nan}


def _transmission(wave, lsf, telluric, own, grid, inside, config):
    """The telluric transmission at the reference pixels: the model of the columns, or (the
    exposure's own calibration without a telluric fit) its own bands' absorption."""
    if np.isfinite([telluric["fcalo2"], telluric["fcalh2o"]]).any():
        return transmission(wave, lsf, *np.nan_to_num([telluric["fcalo2"],
                                                       telluric["fcalh2o"]]),
                            source=config.telluric.lines)
    if own is None or "band_ratio" not in own:
        return np.ones(wave.size)
    ratio = own["band_ratio"]
    ok = np.isfinite(ratio) & inside
    return np.interp(np.log(wave), np.log(grid[ok]), ratio[ok], left=1.0, right=1.0)


def _dataset(exposure, smooth, rel_var, trans, telluric, lsf, config):
    """The calibration Dataset (the layout of combine_vectors') on the reference grid."""
    measured = np.isfinite(smooth)
    smooth_var = smooth**2 * rel_var
    fitted = np.isfinite([telluric["fcalo2"], telluric["fcalh2o"]]).any()
    return xr.Dataset(
        {"cal": ("wavelength", smooth / trans, {"units": CAL_UNIT}),
         "cal_variance": ("wavelength", smooth_var / trans**2, {"units": f"({CAL_UNIT})**2"}),
         "cal_mask": ("wavelength", measured, {"description": "True = inside the model's "
                                               "range"}),
         "cal_smooth": ("wavelength", smooth, {"units": CAL_UNIT,
                                               "description": "smooth response (no tellurics)"}),
         "cal_smooth_variance": ("wavelength", smooth_var, {"units": f"({CAL_UNIT})**2"}),
         "transmission": ("wavelength", trans, {"units": "1"})},
        coords={"wavelength": exposure["wavelength"]},
        attrs={**telluric, **({"telluric_lines": str(config.telluric.lines)} if fitted else {}),
               "lsf_fwhm_coeffs": list(lsf.coeffs), "history": []})


def _model_attrs(own, row, p, model_id):
    """The calibration's header attrs (FCAL*): the standards' figures, or the model's."""
    common = {"fcalsrc": p["source"], "model_id": model_id, "model_grey": p["grey"],
              "level_variance": p["level_var"], "fcallerr": float(np.sqrt(p["level_var"]))}
    if own is None:
        return {**common, "fcalnstr": 0, "fcalrms": np.nan, "fcalqual": MODEL_GRADE,
                "fcalmerr": np.nan, "fcallsf": np.nan, "level_scatter": p["scatter"]}
    return {**common, "fcalnstr": int(row["n_stars_used"]), "fcalrms": float(row["fcalrms"]),
            "fcalqual": str(row["fcalqual"]), "fcalmerr": float(row["fcalmerr"]),
            "fcallsf": float(row["fcallsf"]), "model_share": 1.0 - p["share"]}


def _history(p, session, airmass, exptime, model):
    night = f"night {session}" + ("" if session in model.labels else " (no standards that "
                                  "night: the survey means)")
    if p["source"] == SOURCES["alone"]:
        return (f"no usable standard star: calibrated from the survey model at {night}, "
                f"airmass {airmass:.3f}; grey level from the night's line against airmass "
                f"({np.exp(p['grey']) * exptime:.4g} counts/A per flux unit over {exptime:g} s)")
    return (f"recalibrated with the survey model at {night}, airmass {airmass:.3f}: the "
            f"standards' shape weighs {100 * p['share']:.0f}% (median), the model's the rest; "
            f"their level kept")
