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
    scatter, the water column per airmass and the line-spread scale; survey values for
    nights without exposures with standards. Arrays are per ``labels``."""

    labels: tuple
    intercept: np.ndarray
    slope: np.ndarray
    scatter: np.ndarray
    exposures: np.ndarray
    water: np.ndarray
    water_scatter: np.ndarray
    lsf: np.ndarray
    survey: dict

    #: The per-session quantities (:meth:`of`).
    NAMES = ("intercept", "slope", "scatter", "water", "water_scatter", "lsf")

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
    """
    labels, inv = np.unique(np.asarray(sessions).astype(str), return_inverse=True)
    ok = np.isfinite(grey) & np.isfinite(airmass) & (weight > 0)
    w = np.where(ok, weight, 0.0)
    g, x = np.where(ok, grey, 0.0), np.where(ok, airmass, 0.0)
    sw = np.bincount(inv, w, labels.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = np.bincount(inv, w * x, labels.size) / sw
        gm = np.bincount(inv, w * g, labels.size) / sw
    dx, dg = np.where(ok, x - xm[inv], 0.0), np.where(ok, g - gm[inv], 0.0)
    sxx = np.bincount(inv, w * dx * dx, labels.size)
    sxy = np.bincount(inv, w * dx * dg, labels.size)
    pooled = float(sxy.sum() / sxx.sum()) if sxx.sum() > 0 else 0.0
    resid = np.where(ok, dg - pooled * dx, np.nan)
    var = _robust_var(resid, inv, labels.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (sxy / var + pooled / slope_sigma**2) / (sxx / var + slope_sigma**-2)
    slope = np.where(np.isfinite(slope), slope, pooled)
    intercept = gm - slope * xm
    scatter = np.sqrt(_robust_var(np.where(ok, dg - slope[inv] * dx, np.nan), inv,
                                  labels.size))
    water_n, lsf_n = (_group_median(v, inv, labels.size) for v in (water, lsf))
    water_scatter = 1.4826 * _group_median(np.abs(water - water_n[inv]), inv, labels.size)
    survey = {"intercept": _median(intercept, np.nan), "slope": pooled,
              "scatter": _median(scatter, np.nan), "water": _median(water, 1.0),
              "water_scatter": _median(water_scatter, 0.3), "lsf": _median(lsf, 1.0)}
    return Levels(tuple(labels), intercept, slope, scatter,
                  np.bincount(inv, ok.astype(float), labels.size).astype(np.int64),
                  water_n, water_scatter, lsf_n, survey)


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
