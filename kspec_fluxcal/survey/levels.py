"""The grey levels of the survey model's nights: Bouguer's line of the exposures' grey factors
against airmass per night (its slope, the night's grey extinction, regularised towards the
survey's: on photometric nights it is the grey extinction, clouds make it noisy), and the
night's water column and line-spread scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .weights import VARIANCE_FLOOR

__all__ = ["Levels", "fit_levels"]


@dataclasses.dataclass
class Levels:
    """Per session: Bouguer's line of the grey factors ``g = a + b X`` (ln per second), its
    scatter and slope error, the water column per airmass and the line-spread scale; survey
    values for nights without exposures with standards. Arrays are per ``labels``, but
    ``grey_outlier``: per exposure given to :func:`fit_levels`, left out of its line."""

    labels: tuple
    intercept: np.ndarray
    slope: np.ndarray
    scatter: np.ndarray
    exposures: np.ndarray
    water: np.ndarray
    water_scatter: np.ndarray
    lsf: np.ndarray
    survey: dict
    slope_err: np.ndarray
    grey_outlier: np.ndarray  # per exposure given to fit_levels

    #: The per-session quantities (:meth:`of`).
    NAMES = ("intercept", "slope", "scatter", "water", "water_scatter", "lsf", "slope_err")

    def of(self, sessions):
        """Dict of per-session arrays (:attr:`NAMES`) for session labels; the survey's
        values where a session has none."""
        labels = np.asarray(sessions).astype(str)
        if not self.labels:
            return {n: np.full(labels.size, self.survey[n]) for n in self.NAMES}
        idx = np.clip(np.searchsorted(self.labels, labels), 0, len(self.labels) - 1)
        found = np.asarray(self.labels)[idx] == labels
        return {n: np.where(found & np.isfinite(getattr(self, n)[idx]), getattr(self, n)[idx],
                            self.survey[n]) for n in self.NAMES}


#: Grey factors further from their night's line than this many robust sigmas are left out
#: of it (a cloud, a standard on another star): a weighted least-squares line followed one.
GREY_CLIP = 3.0


def fit_levels(grey, airmass, sessions, weight, water, lsf, *, slope_sigma):
    """Bouguer's line per session, water and line spread per session.

    Parameters
    ----------
    grey, airmass : numpy.ndarray
        Per exposure with standards: g_e (ln, per second) and X_e.
    sessions : array_like of str
    weight : numpy.ndarray
        Huber weights (0: outlier exposures do not count).
    water, lsf : numpy.ndarray
        Per exposure: fitted H2O column per airmass (FCALH2O / X) and line-spread scale
        (FCALLSF); NaN where unknown.
    slope_sigma : float
        Prior width of a night's slope about the survey's, in ln per airmass (a grey
        extinction of 0.05 mag/airmass is 0.046).

    Returns
    -------
    Levels
        With ``grey_outlier`` (per exposure): left out of its night's line, beyond
        :data:`GREY_CLIP` robust sigmas of it.
    """
    labels, inv = np.unique(np.asarray(sessions).astype(str), return_inverse=True)
    usable = np.isfinite(grey) & np.isfinite(airmass) & (weight > 0)
    clipped = np.zeros(usable.shape, bool)
    for _ in range(5):  # the lines without the grey outliers, until they stay the same
        line = _lines(grey, airmass, inv, labels.size, usable & ~clipped, weight, slope_sigma)
        resid = grey - line["intercept"][inv] - line["slope"][inv] * airmass
        new = usable & (np.abs(resid) > GREY_CLIP * line["scatter"][inv])
        if np.array_equal(new, clipped):
            break
        clipped = new
    water_n, lsf_n = (_group_median(v, inv, labels.size) for v in (water, lsf))
    water_scatter = 1.4826 * _group_median(np.abs(water - water_n[inv]), inv, labels.size)
    survey = {"intercept": _median(line["intercept"], np.nan), "slope": line["pooled"],
              "scatter": _median(line["scatter"], np.nan), "water": _median(water, 1.0),
              "water_scatter": _median(water_scatter, 0.3), "lsf": _median(lsf, 1.0),
              "slope_err": float(slope_sigma)}
    return Levels(tuple(labels), line["intercept"], line["slope"], line["scatter"],
                  np.bincount(inv, (usable & ~clipped).astype(float),
                              labels.size).astype(np.int64),
                  water_n, water_scatter, lsf_n, survey, line["slope_err"], clipped)


def _lines(grey, airmass, inv, n, ok, weight, slope_sigma):
    """Each session's weighted line of ``grey`` against ``airmass`` over the exposures
    ``ok``, its slope pulled towards the pooled one with ``slope_sigma``: intercept, slope,
    slope_err, scatter (robust, of the fitted exposures) and the pooled slope."""
    w = np.where(ok, weight, 0.0)
    g, x = np.where(ok, grey, 0.0), np.where(ok, airmass, 0.0)
    sw = np.bincount(inv, w, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = np.bincount(inv, w * x, n) / sw
        gm = np.bincount(inv, w * g, n) / sw
    dx, dg = np.where(ok, x - xm[inv], 0.0), np.where(ok, g - gm[inv], 0.0)
    sxx = np.bincount(inv, w * dx * dx, n)
    sxy = np.bincount(inv, w * dx * dg, n)
    pooled = float(sxy.sum() / sxx.sum()) if sxx.sum() > 0 else 0.0
    var = _robust_var(np.where(ok, dg - pooled * dx, np.nan), inv, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = sxx / var + slope_sigma**-2
        slope = (sxy / var + pooled / slope_sigma**2) / precision
    slope = np.where(np.isfinite(slope), slope, pooled)
    scatter = np.sqrt(_robust_var(np.where(ok, dg - slope[inv] * dx, np.nan), inv, n))
    return {"intercept": gm - slope * xm, "slope": slope, "scatter": scatter,
            "slope_err": np.where(np.isfinite(precision), precision**-0.5, slope_sigma),
            "pooled": pooled}


def _median(values, default):
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() \
        else default


def _group_median(values, inv, n):
    """Median per group, NaN-aware (a loop over the groups: nights, not pixels)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(n, np.nan)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(n + 1))
    for k in range(n):
        v = values[order[bounds[k]:bounds[k + 1]]]
        v = v[np.isfinite(v)]
        if v.size:
            out[k] = np.median(v)
    return out


def _robust_var(resid, inv, n):
    """(1.4826 MAD)^2 per group, at least the floor; the median over groups for groups of
    fewer than three exposures."""
    mad = _group_median(np.abs(resid), inv, n)
    counts = np.bincount(inv, np.isfinite(resid).astype(float), n)
    var = (1.4826 * mad) ** 2
    fallback = np.nanmedian(var[counts >= 3]) if np.any(counts >= 3) else 1e-4
    return np.maximum(np.where(counts >= 3, var, fallback), VARIANCE_FLOOR)
