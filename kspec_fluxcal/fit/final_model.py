"""Each standard's final model (step 7 of :mod:`kspec_fluxcal.fit.standards`): the interpolated
template at its refined parameters, its velocity once more, its model error, and the model at
Earth (photometric scale, E(B-V), a smooth photometric warp, jointly with Gaia XP)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import scipy.sparse

from .._nan import nan_to_num
from ..constants import FLUX_UNIT_SCALE
from ..errors import FluxCalWarning
from ..photometric_fit import band_extinction, fit_warp, warp_basis
from ..photometry import band_wavelength, catalog_parallax, logg_from_parallax
from ..reddening import extinction_per_ebv
from ..xp import xp_level, xp_resolution, xp_rows
from .acceptance import line_depth, line_variance
from .exposure_templates import corner_combination, interpolated_corners
from .matching import correction_parameters, fit_corrected
from .model_photometry import final_photometry, model_magnitudes
from .shifts import rest_positions, sample_sets
from .velocity import refine_rv

__all__ = ["final_model", "outlier_pixels"]

_LN10_04 = 0.4 * np.log(10.0)
# Normalised model pixels shallower than this are continuum for the line-mismatch estimate.
_CONTINUUM_DEPTH = 0.02


def final_model(obs, tm, scan, params, matched, phot, config, xp=None):
    """The model at the refined parameters: velocity, chi^2, model error, photometry (step 7).

    Takes the observed standards, the exposure's templates, the scan, the chosen ``params``,
    the matched catalog rows, the photometric score of the parameter choice
    (:class:`~kspec_fluxcal.fit.model_photometry.PhotometricScore`, with the priors), the
    config and the standards' XP spectra (or None).
    Returns a namespace: ``rv``, ``rv_err``, ``model_nobs`` (S, P; the normalised model as
    compared with each star), ``chi2_dof``, ``model_error``, ``line_error``, and the model at Earth
    (:func:`_scaled_model`: ``model_flux``, ``scale``, ``ebv``, ``phot``, ``mag_model``,
    ``warp_rms``, ``logg_parallax``, ``xp``...), ``phot_rms_spectral`` (the photometric rms
    of each star's best template by its spectrum alone,
    :func:`~kspec_fluxcal.fit.model_photometry.final_photometry`) and ``residuals`` (the
    stars against ``model_nobs``, :class:`_Residuals`, kept for :func:`outlier_pixels`)."""

    corners, weight = interpolated_corners(tm.library, params)
    nstar = obs.nstar
    # Combined, then convolved: at a fitted width no operator is built for the few templates
    # (about half the exposures), and each kind is the product of S columns, not of ~25.
    model, model_n = np.split(tm.models(*corner_combination(corners, weight), ("flux", "norm")),
                              2)
    rv, rv_err = scan.rv.copy(), scan.rv_err.copy()
    ok = np.flatnonzero(scan.usable)
    if ok.size:  # the velocity once more, against the final model
        rv[ok], rv_err[ok] = refine_rv(obs.norm[ok], obs.ivar[ok], model_n[ok], obs.wave, rv[ok],
                                       knot_spacing=scan.knots, star_wavelength=obs.star_wave[ok])
    moved_n, model_obs = _moved(obs, rv, model_n, model)
    model_nobs = _compared(obs, moved_n, scan.knots)
    residuals = _residuals(obs, model_nobs)
    chi2_dof, model_error = _model_error(residuals, obs, scan)
    line_error = _line_error(residuals, model_nobs)
    rows = np.repeat(np.arange(nstar), corners.shape[1])
    weights = scipy.sparse.csr_matrix((weight.ravel(), (rows, corners.ravel())),
                                      shape=(nstar, tm.library.sizes["template"]))
    scaled = _scaled_model(obs, model_obs, weights, matched, phot, scan, config, xp)
    return SimpleNamespace(rv=rv, rv_err=rv_err, model_nobs=model_nobs, chi2_dof=chi2_dof,
                           model_error=model_error, line_error=line_error,
                           residuals=residuals, **scaled)


def _compared(obs, moved_n, knots):
    """The normalised models ``moved_n`` (S, P; :func:`_moved`) as compared with the stars:
    each with its smooth correction fitted to the star, NaN where the model is NaN. The
    stars' inputs prepared at once, fitted star by star (one call for the stars of a
    wavelength solution took as long: the sparse products' cost is per row)."""
    finite = np.isfinite(moved_n)
    weight = np.where(finite, obs.ivar, 0.0)
    flux, shifted = nan_to_num(obs.norm), nan_to_num(moved_n)
    model_nobs = np.empty(moved_n.shape)
    for s in range(obs.nstar):  # a few stars
        model_nobs[s] = fit_corrected(flux[s], weight[s], shifted[s][None], obs.star_wave[s],
                                      knots)[0]
    model_nobs[~finite] = np.nan
    return model_nobs


def _moved(obs, rv, *spectra):
    """Each star's row of each of ``spectra`` (S, P; on the reference pixels, rest frame)
    moved to the star's velocity ``rv`` and sampled at its own pixels, NaN beyond the ends:
    the shift operators' kernel applied tap by tap to every row at once, its weights once for
    all ``spectra`` (:func:`~kspec_fluxcal.fit.shifts.sample_sets`), without an operator
    built per star."""
    if not obs.nstar:
        return [np.zeros((0, obs.wave.size)) for _ in spectra]
    pos = rest_positions(obs.star_wave, rv, obs.wave)
    out = sample_sets(spectra, pos)
    beyond = ~np.isfinite(pos)
    for moved in out:
        moved[beyond] = np.nan
    return out


def _scaled_model(obs, model_obs, weights, matched, phot, scan, config, xp=None):
    """The model at Earth: flux scale and E(B-V) from the photometry (whose residuals judge
    the star), then a smooth photometric warp fitted with the scale at that E(B-V) (the
    template's broad shape corrected where the bands ask for it; see
    :func:`kspec_fluxcal.photometric_fit.warp_basis`), jointly with the star's Gaia XP spectrum
    where it has a usable one (:mod:`kspec_fluxcal.xp`). With the spectral photometry of the
    ``scan``'s best templates (the same fit_photometry call)."""
    fit = config.fit
    prior = phot.prior
    pf, rms_spectral = final_photometry(phot, weights, scan)
    ebv = pf["ebv"]
    mags, ext, slope = model_magnitudes(phot, weights)
    reddened = mags + band_extinction(ebv, ext, slope)
    a_lambda = extinction_per_ebv(obs.star_wave, fit.extinction_law)
    compared = _xp_comparison(obs, model_obs, pf, a_lambda, matched, xp, config)
    warped = _warp(obs, phot, pf, reddened, matched, config, compared)
    scale = 10.0 ** (-0.4 * warped["mu"])
    scale_err = scale * _LN10_04 * warped["mu_err"]
    mag_model = reddened - 2.5 * np.log10(scale)[:, None] + warped["band_warp"]
    logg_p, logg_p_err = logg_from_parallax(scale, prior.parallax, prior.parallax_err)
    curve = warped["curve"]
    model_flux = scale[:, None] * model_obs * curve * _attenuation(ebv, a_lambda) / FLUX_UNIT_SCALE
    with np.errstate(invalid="ignore"):
        warp_rms = np.sqrt(np.nanmean((curve - 1.0) ** 2, axis=1)) if obs.nstar else np.zeros(0)
    return {"phot": pf, "scale": scale, "scale_err": scale_err, "ebv": ebv,
            "warp_rms": warp_rms, "mag_model": mag_model, "model_flux": model_flux,
            "logg_parallax": logg_p, "logg_parallax_err": logg_p_err,
            "has_parallax": catalog_parallax(prior.parallax, prior.parallax_err)[2],
            "phot_rms_spectral": rms_spectral,
            "xp": _xp_outputs(obs, model_flux, compared)}


def _flux_factor(mag):
    """10^(-0.4 ``mag``), by exp: pow is ~3x slower on a spectrum's pixels (0.2 against
    0.07 ms for 3 x 4096), for a difference of an ulp or two."""
    return np.exp(-_LN10_04 * mag)


def _attenuation(ebv, a_lambda):
    """The factor 10^(-0.4 E(B-V) A_lambda/E(B-V)) of stars' E(B-V) ``ebv`` (S,) on their
    pixels ``a_lambda`` (S, P) (:func:`_flux_factor`)."""
    return np.exp(-_LN10_04 * ebv[:, None] * a_lambda)


def _warp(obs, phot, pf, reddened, matched, config, compared):
    """Flux scale (``mu``, mag) and photometric warp of every star: from its bands (``[fit]
    warp_degree``), or from its bands and its XP spectrum jointly where that is usable
    (``[xp] xp_warp_degree``); the fit's own scale where there is no warp."""
    out = {"mu": pf["mu"].copy(), "mu_err": pf["mu_err"].copy(),
           "curve": np.ones(obs.star_wave.shape), "band_warp": np.zeros(reddened.shape)}
    with_xp = np.zeros(obs.nstar, bool) if compared is None else compared.usable
    bands = matched.variables["band"].values
    context = (obs, phot, pf, reddened, [band_wavelength(b) for b in bands], config)
    _apply_warp(out, ~with_xp, config.fit.warp_degree, None, *context)
    if with_xp.any():
        _apply_warp(out, with_xp, config.xp.xp_warp_degree, compared, *context)
    return out


def _apply_warp(out, stars, degree, compared, obs, phot, pf, reddened, band_wave, config):
    """:func:`kspec_fluxcal.photometric_fit.fit_warp` for the ``stars`` (mask), in ``out``.

    Bands only: the warp spans the exposure's range. With XP: each star's warp spans its
    compared XP samples and is held beyond them (a warp of high degree must not swing where
    nothing constrains it)."""
    rows = np.flatnonzero(stars)
    if degree < 1 or not rows.size:
        return
    if compared is None:
        wave_range = (float(obs.wave[0]), float(obs.wave[-1]))
        band_basis = np.broadcast_to(warp_basis(band_wave, wave_range, degree),
                                     (rows.size, len(band_wave), degree))
        pixel_basis = warp_basis(obs.star_wave[rows], wave_range, degree)
        xp = None
    else:
        spans = compared.span[rows]
        band_basis = np.stack([warp_basis(band_wave, r, degree) for r in spans])
        pixel_basis = np.stack([warp_basis(obs.star_wave[s], r, degree)
                                for s, r in zip(rows, spans, strict=True)])
        xp = {k: v[rows] for k, v in compared.rows.items()}
        xp["basis"] = np.stack([warp_basis(compared.wave, r, degree) for r in spans])
    wf = fit_warp(phot.mag_obs[rows], phot.mag_err[rows], reddened[rows], band_basis,
                  pf["used"][rows], warp_sigma=config.fit.warp_sigma,
                  error_floor=config.photometry.error_floor, xp=xp)
    out["mu"][rows], out["mu_err"][rows] = wf["mu"], wf["mu_err"]
    out["curve"][rows] = _flux_factor((pixel_basis @ wf["warp"][:, :, None])[..., 0])
    # One basis for all (bands only): the product as it always was, to the last bit.
    out["band_warp"][rows] = ((band_basis[0] @ wf["warp"].T).T if compared is None
                              else np.einsum("sbk,sk->sb", band_basis, wf["warp"]))


def _xp_comparison(obs, model_obs, pf, a_lambda, matched, xp, config):
    """Each star's XP spectrum against its model at Earth before the warp (photometric scale
    and E(B-V)), at XP's resolution: the level check and the rows of the joint warp fit.
    None without XP. A star whose XP fails the check is named in a warning and flagged."""
    if xp is None:
        return None
    scale = 10.0 ** (-0.4 * pf["mu"])
    model = scale[:, None] * model_obs * _attenuation(pf["ebv"], a_lambda)
    has = np.isfinite(xp.flux).any(axis=1)
    model_xp = np.full(xp.flux.shape, np.nan)
    if has.any():
        model_xp[has] = xp_resolution(obs.star_wave[has], model[has], xp.wave)
    ratio, ok, note = xp_level(xp.flux, model_xp, config.xp.level_tolerance)
    # A star without a model (no catalog photometry: its own reason is recorded) has no XP
    # comparison to explain ('no XP sample inside the range' misled).
    note = [n if np.isfinite(mu) else "" for n, mu in zip(note, pf["mu"], strict=True)]
    for s in np.flatnonzero([bool(n) for n in note]):
        warnings.warn(f"{obs.expid}: fiber {int(matched['fiber'].values[s])} objid "
                      f"{int(matched['objid'].values[s])}: {note[s]}", FluxCalWarning,
                      stacklevel=2)
    rows = xp_rows(xp.flux, xp.error, model_xp, xp.wave, config.xp)
    compared = np.isfinite(rows["resid"])
    span = np.array([(xp.wave[c].min(), xp.wave[c].max()) if c.sum() > 1 else
                     (obs.wave[0], obs.wave[-1]) for c in compared], dtype=np.float64)
    return SimpleNamespace(wave=xp.wave, flux=xp.flux, error=xp.error, how=xp.how,
                           model=model_xp, ratio=ratio, note=note, rows=rows,
                           span=span.reshape(-1, 2),
                           usable=ok & (config.xp.xp_warp_degree >= 1) & (compared.sum(1) > 1))


def _xp_outputs(obs, model_flux, compared):
    """Per-star XP results: used, level ratio, rms of XP about the final model (its median
    level removed), how it was matched, the flag; and the spectra for QC (FLUX_UNIT)."""
    nstar = obs.nstar
    if compared is None:
        return {"used": np.zeros(nstar, bool), "ratio": np.full(nstar, np.nan),
                "rms": np.full(nstar, np.nan), "match": np.full(nstar, "none"),
                "note": [""] * nstar, "arrays": None}
    has = np.isfinite(compared.flux).any(axis=1)
    final = np.full(compared.flux.shape, np.nan)
    if has.any():
        final[has] = xp_resolution(obs.star_wave[has], model_flux[has] * FLUX_UNIT_SCALE,
                                   compared.wave)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a star without XP: all NaN
        r = compared.flux / final
        r = r / np.nanmedian(r, axis=1, keepdims=True)
        rms = np.sqrt(np.nanmean((r - 1.0) ** 2, axis=1))
    arrays = {"xp_flux": compared.flux, "xp_flux_error": compared.error,
              "xp_model": compared.model, "xp_model_warped": final}
    return {"used": compared.usable, "ratio": compared.ratio, "rms": rms,
            "match": compared.how, "note": compared.note,
            "arrays": {k: v / FLUX_UNIT_SCALE for k, v in arrays.items()},
            "wave": compared.wave}


class _Residuals(NamedTuple):
    """Each star's normalised spectrum against its final model, pixel by pixel: ``fit``
    (compared), ``resid2`` (squared residual), ``var`` (noise variance; inf where not
    compared) and ``m2`` (squared model)."""

    fit: np.ndarray
    resid2: np.ndarray
    var: np.ndarray
    m2: np.ndarray


def _residuals(obs, model_nobs):
    w = np.where(np.isfinite(model_nobs) & np.isfinite(obs.norm), obs.ivar, 0.0)
    fit = w > 0
    # Computed where compared only (both finite there), without nan_to_num's copies: the
    # same numbers in half the time (0.2 ms per call).
    resid2 = np.zeros(w.shape)
    np.subtract(obs.norm, model_nobs, out=resid2, where=fit)
    np.square(resid2, out=resid2)
    var = np.full(w.shape, np.inf)
    np.divide(1.0, w, out=var, where=fit)
    # nan_to_num's squares: 0 for NaN (an infinite model squares to inf either way)
    return _Residuals(fit, resid2, var, np.where(np.isnan(model_nobs), 0.0, model_nobs) ** 2)


def outlier_pixels(obs, model, fit, sigma):
    """Pixels of each star that its final model cannot explain (a cosmic ray, a hot pixel):
    a residual of the normalised spectrum beyond ``sigma`` times the pixel's noise, the
    star's model error and its lines' mismatch (:func:`~kspec_fluxcal.fit.acceptance.
    line_variance`, ``fit`` the [fit] options) in quadrature. Template mismatch is in the
    last two: a line the template gets wrong is not an outlier. Returns (S, P) bool.

    ``model`` is :func:`final_model`'s for ``obs``: its ``residuals`` are taken as it kept
    them (a model without them has them computed)."""
    res = getattr(model, "residuals", None) or _residuals(obs, model.model_nobs)
    frac = nan_to_num(model.model_error)[:, None] ** 2 + line_variance(model, fit)
    with np.errstate(invalid="ignore", divide="ignore"):
        z2 = res.resid2 / (res.var + frac * res.m2)
    return res.fit & (z2 > sigma**2)


def _model_error(res, obs, scan):
    """chi^2/dof of each star against its final model, and the model error: the fractional
    per-pixel mismatch sigma_m with sum r^2 / (var + (sigma_m model)^2) = dof (0 when the
    model fits within the noise), between 1e-5 and 1 (:func:`_mismatch`)."""
    resid2, var, m2 = res.resid2, res.var, res.m2
    dof = np.maximum(res.fit.sum(axis=1) - correction_parameters(obs.wave, scan.knots), 1)
    chi2_dof = np.sum(resid2 / var, axis=1) / dof
    sigma = np.zeros(obs.nstar)
    above = chi2_dof > 1.0
    if above.all():  # most stars: no copies
        sigma = _mismatch(resid2, var, m2, dof)
    elif above.any():
        sigma[above] = _mismatch(resid2[above], var[above], m2[above], dof[above])
    return chi2_dof, np.where(res.fit.any(axis=1), sigma, np.nan)


#: log10 sigma_m's bounds, and the Newton step below which it has converged (dex).
_LOG_MISMATCH = (-5.0, 0.0)
_MISMATCH_TOLERANCE = 1e-13


def _mismatch(resid2, var, m2, dof):
    """sigma_m of stars whose chi^2/dof exceeds 1: the root in x = log10 sigma_m of
    chi^2(x) / dof - 1, which falls with x, by Newton steps kept inside the bracket
    :data:`_LOG_MISMATCH` that the steps narrow (a bisection step where a Newton step would
    leave it: a root beyond the bracket gives its end), from the mean excess of the squared
    residuals over the noise. Each star's steps are its own (a converged star stops)."""
    lo, hi = (np.full(dof.shape, b) for b in _LOG_MISMATCH)
    with np.errstate(divide="ignore", invalid="ignore"):
        guess = 0.5 * np.log10(np.sum(np.where(np.isfinite(var), resid2 - var, 0.0), axis=1)
                               / np.sum(m2, axis=1))
    x = np.where((guess > lo) & (guess < hi), guess, 0.5 * (lo + hi))
    active = np.arange(dof.size)
    arrays = (resid2, var, m2, dof)
    now = x
    for _ in range(100):  # a bisection step halves the bracket: converged long before
        g, dg = _excess(now, *arrays)
        lo, hi = np.where(g > 0.0, now, lo), np.where(g > 0.0, hi, now)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = now - g / dg
        # A step to the bracket's end it has just set is a converged one, not one out.
        inside = (step >= lo) & (step <= hi)
        now = np.where(inside, step, 0.5 * (lo + hi))
        # Converged, or as far as chi^2's rounding lets a flat one go, or at a bound.
        done = (inside & (np.abs(g / dg) < _MISMATCH_TOLERANCE)) | (hi - lo < _MISMATCH_TOLERANCE)
        x[active] = now
        if done.all():
            break
        if done.any():
            keep = ~done
            active, lo, hi, now = active[keep], lo[keep], hi[keep], now[keep]
            arrays = tuple(a[keep] for a in arrays)
    return 10.0 ** x


def _excess(x, resid2, var, m2, dof):
    """chi^2/dof - 1 of stars at log10 sigma_m ``x`` (one per star) and its derivative."""
    s = 10.0 ** (2.0 * x)[:, None]
    denom = var + s * m2
    q = resid2 / denom
    slope = -2.0 * np.log(10.0) * s[:, 0] * np.sum(q * m2 / denom, axis=1)
    return np.sum(q, axis=1) / dof - 1.0, slope / dof


def _line_error(res, model_nobs):
    """Each star's line mismatch k: the rms error of its model's lines per unit line depth
    d = 1 - model (normalised), from the excess of the squared residuals over the noise
    and over the continuum's own excess (pixels with d < ``_CONTINUUM_DEPTH``), regressed
    on (d model)^2. A star made by the templates' own physics gives k ~ 0.1, a real
    star against a real grid 0.4-0.6, another model's line list ~ 1."""
    fit, m2 = res.fit, res.m2
    excess = np.where(fit, res.resid2 - res.var, 0.0)
    depth2 = line_depth(model_nobs) ** 2
    cont = fit & (depth2 < _CONTINUUM_DEPTH**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        cont_excess = np.where(cont, excess / np.where(cont, m2, 1.0), 0.0).sum(1) / cont.sum(1)
    cont_excess = np.where(cont.sum(1) >= 10, np.maximum(nan_to_num(cont_excess), 0.0), 0.0)
    x = np.where(fit, depth2 * m2, 0.0)
    y = np.where(fit, excess - cont_excess[:, None] * m2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        k2 = np.sum(x * y, axis=1) / np.sum(x * x, axis=1)
    return np.where(fit.any(axis=1), np.sqrt(np.maximum(nan_to_num(k2), 0.0)), np.nan)
