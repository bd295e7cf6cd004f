"""Each standard's calibration vector and whether it can calibrate (steps 8-9 of
:mod:`kspec_fluxcal.fit.standards`): Cal_star with variance and mask, the throughput it implies,
the reason for rejection or 'ok', and notes on accepted fits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .._nan import nan_to_num
from ..constants import FLUX_UNIT_SCALE, HC_ERG_AA, MIN_PARALLAX_SNR
from ..grid import PARAMS, _cell
from ..masks import load_regions, region_mask
from ..templates import library_arrays
from ..wavelength import central_steps

__all__ = ["star_vectors", "line_variance", "line_depth", "implied_throughput", "acceptance",
           "star_flags"]


def star_vectors(obs, model, config, lsf):
    """Cal_star = model at Earth / counts, with variance and the reliability mask (step 8).

    Takes the observed standards, the final model, the config (line masks) and the line
    spread (mask padding). Returns a namespace of (S, P) arrays: ``cal``, ``cal_var`` (NaN
    where not computable) and ``cal_mask`` (True = reliable)."""
    line_good = region_mask(obs.star_wave, load_regions(config.masks.lines),
                            pad=0.5 * lsf.fwhm(obs.star_wave))
    rel_scale = nan_to_num(model.scale_err / model.scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        cal = model.model_flux / obs.flux
        # Photon noise, the model's per-pixel mismatch, its lines' and the photometric scale.
        cal_var = cal**2 * (obs.var / obs.flux**2 + nan_to_num(model.model_error)[:, None] ** 2
                            + line_variance(model, config.fit) + rel_scale[:, None] ** 2)
    cal_ok = obs.good & (obs.flux > 0) & np.isfinite(cal) & np.isfinite(model.model_flux)
    return SimpleNamespace(cal=np.where(cal_ok, cal, np.nan),
                           cal_var=np.where(cal_ok, cal_var, np.nan),
                           cal_mask=cal_ok & line_good & obs.extra_good)


def line_variance(model, fit):
    """The fractional variance of the model's lines, (k d)^2 per pixel: d the normalised
    model's line depth, k the star's line mismatch times ``line_error_scale``, at least
    ``line_error_floor``. Line regions weigh less than continuum in the combination and the
    smooth response where the templates' lines are less certain than the star's noise: a
    soft line mask that adapts to how well the templates fit the star."""
    k = np.maximum(fit.line_error_floor, fit.line_error_scale * nan_to_num(model.line_error))
    return (k[:, None] * line_depth(model.model_nobs)) ** 2


def line_depth(model_nobs):
    """Line depth 1 - model of normalised models (S, P), at least 0; 0 where a model is NaN.

    np.clip(1 - np.nan_to_num(model_nobs, nan=1), 0, None)'s values for finite or NaN models
    (a model of -inf is inf deep, not the largest float) in half its time (the fit asks
    three times per exposure)."""
    return np.maximum(1.0 - np.where(np.isnan(model_nobs), 1.0, model_nobs), 0.0)


def implied_throughput(obs, model, vectors, config):
    """Each star's end-to-end peak throughput implied by its counts and its scaled model:
    counts per pixel / (photons per pixel above the atmosphere), 90th percentile over its
    reliable pixels (gain taken as 1 e-/count). Photometry of another star shows here: 1 mag
    too faint implies 2.5 times the instrument's throughput."""
    width = central_steps(obs.star_wave)
    photons = (model.model_flux * FLUX_UNIT_SCALE * obs.exptime
               * config.instrument.collecting_area * width * obs.star_wave / HC_ERG_AA)
    peak = np.full(obs.nstar, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(vectors.cal_mask & (photons > 0), obs.flux / photons, np.nan)
        for s, row in enumerate(ratio):  # a few stars
            if np.isfinite(row).any():
                peak[s] = _percentile(row[~np.isnan(row)], 90.0)
    return peak


def _percentile(values, q):
    """``np.percentile(values, q)`` (its default, linear method) of 1-D ``values`` without
    NaN, the same number (the same order statistics and interpolation), by one partition
    about the two values it needs (np.nanpercentile's loop over rows and generic steps:
    :func:`implied_throughput` of three stars took 0.66 ms with it, 0.38 ms with this).
    ``values`` are reordered."""
    n = values.size
    virtual = (n - 1) * (q / 100)
    below = min(math.floor(virtual), n - 1)
    above = min(below + 1, n - 1)
    values.partition((below, above))
    a, b = values[below], values[above]
    # numpy's _lerp: from the nearer end (the fraction past the lower value measured as it
    # measures it, from its whole index, -1 beyond the end, where a and b are one value)
    t = virtual - (below if virtual < n - 1 else -1)
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def _throughput_verdict(value, config):
    """'ok', 'flag' (outside the plausible range, within the margin) or 'refuse'."""
    inst = config.instrument
    lo, hi, margin = inst.throughput_min, inst.throughput_max, inst.throughput_margin
    if not np.isfinite(value) or lo <= value <= hi:
        return "ok"
    return "flag" if lo / margin <= value <= hi * margin else "refuse"


def acceptance(obs, prior, scan, model, params, matched, library, config):
    """Why each star cannot calibrate, or 'ok' (step 9): a list of S strings.

    Rejected for: no catalog entry or too few bands; too few good pixels or too low S/N; no
    template; photometry that disagrees with the spectrum's model (another star, a blend or
    a variable: residual rms beyond ``max_rms``, for the chosen model or for the template
    the spectrum alone prefers, which photometry given weight could otherwise pull away); an
    unphysical velocity or reddening (pinned at the search limits); a model error beyond
    ``max_model_error`` (not a star like the templates); a fit pinned at the grid's Teff
    edge while the colours put the star beyond it (the vector's slope would be wrong by the
    missing temperature). Template mismatch below ``max_model_error`` is a quality figure
    (``model_error``), carried into the star's weight.
    """
    fit, phot = config.fit, config.photometry
    pf = model.phot
    teff = params["teff"]
    lo, hi = library_arrays(library)["teff"][[0, -1]]
    edge_window = fit.teff_window / 3
    # Colours beyond the grid, and the fit at its edge or far from them (on a hole's flat
    # edge, where its Teff means nothing): the vector's slope lacks the missing temperature.
    astray = _far_from_colours(teff, prior, config)
    edge = (((prior.teff_colour < lo - edge_window) & ((teff <= lo + 1) | astray))
            | ((prior.teff_colour > hi + edge_window) & ((teff >= hi - 1) | astray)))
    match = matched.variables["match"].values
    out = []
    for s in range(obs.nstar):
        if match[s] == "none":
            out.append("no catalog match")
        elif pf["n_bands"][s] < phot.min_bands:
            out.append(f"fewer than {phot.min_bands} valid bands ({int(pf['n_bands'][s])})")
        elif not np.isfinite(obs.snr[s]):
            out.append("no valid pixel")
        elif obs.good_fraction[s] < fit.min_good_fraction:
            out.append(f"only {100 * obs.good_fraction[s]:.0f}% good pixels "
                       f"(< {100 * fit.min_good_fraction:g}%)")
        elif not obs.snr[s] >= fit.min_snr:
            out.append(f"S/N {obs.snr[s]:.1f} < {fit.min_snr:g}")
        elif not scan.usable[s]:
            out.append("no usable template")
        elif not pf["rms"][s] <= phot.max_rms:
            out.append(f"photometry disagrees with the spectrum: rms {pf['rms'][s]:.3f} mag > "
                       f"{phot.max_rms:g} over {int(pf['n_bands'][s])} bands (another star, a "
                       "blend or a variable?)")
        elif not model.phot_rms_spectral[s] <= phot.max_rms:
            # The photometry chose a template the spectrum does not want, to fit itself.
            out.append(f"photometry disagrees with the spectrum: rms "
                       f"{model.phot_rms_spectral[s]:.3f} mag > {phot.max_rms:g} for the "
                       "spectrum's best template (another star, a blend or a variable?)")
        elif abs(model.rv[s]) >= 0.98 * fit.rv_max:
            out.append(f"RV {model.rv[s]:+.0f} km/s at the search limit (+/-{fit.rv_max:g})")
        elif fit.reddening and model.ebv[s] >= fit.ebv_max - 1e-6:
            out.append(f"E(B-V) pinned at its limit {fit.ebv_max:g} mag")
        elif _throughput_verdict(model.throughput[s], config) == "refuse":
            inst = config.instrument
            out.append(f"implied throughput {model.throughput[s]:.3g} is impossible for the "
                       f"instrument ({inst.throughput_min:g}-{inst.throughput_max:g}, x/ "
                       f"{inst.throughput_margin:g}): photometry of another star?")
        elif edge[s]:  # before the model error: such a star is no last resort either
            out.append(f"outside the grid: colour Teff {prior.teff_colour[s]:.0f} K, fit "
                       + (f"pinned at the grid's edge ({teff[s]:.0f} K)" if teff[s] <= lo + 1
                          or teff[s] >= hi - 1 else f"astray at {teff[s]:.0f} K"))
        elif not model.model_error[s] <= fit.max_model_error:
            out.append(f"model error {100 * model.model_error[s]:.1f}% > "
                       f"{100 * fit.max_model_error:g}% (not a star like the templates?)")
        else:
            out.append("ok")
    return out


def _hole_share(library, params):
    """Per star, the share of the multilinear weight in (teff, logg, [M/H]) that fell on
    grid points the grid lacks (given to the corners that exist): along a missing corner's
    edge the model does not change, and the reported parameters say little there."""
    arrays = library_arrays(library)
    axes = {p: arrays[p] for p in PARAMS}
    index, raw = _cell(axes, params["teff"], params["logg"], params["feh"])
    present = arrays["template_index"][tuple(np.moveaxis(index, -1, 0))] >= 0
    return np.where(present, 0.0, raw).sum(axis=1)


def _far_from_colours(teff, prior, config):
    """Per star: the fitted Teff further than the Teff window from the colour Teff."""
    return np.abs(teff - prior.teff_colour) > config.fit.teff_window


def star_flags(params, library, model, config, prior):
    """Notes on accepted fits: parameters at a grid edge or interpolated across a grid hole,
    Teff far from the colours' (``prior``), no parallax, a throughput outside the
    instrument's plausible range (within the margin), an XP spectrum not used."""
    axes = library_arrays(library)
    holes = _hole_share(library, params)
    far = _far_from_colours(params["teff"], prior, config)
    out = []
    for s in range(len(params["teff"])):
        notes = []
        if holes[s] > 0.05:
            notes.append(f"interpolated across a grid hole ({100 * holes[s]:.0f}% of the "
                         "weight on missing grid points: parameters uncertain)")
        if far[s]:
            notes.append(f"teff {params['teff'][s]:.0f} K is more than the Teff window from "
                         f"the colour Teff {prior.teff_colour[s]:.0f} K")
        if _throughput_verdict(model.throughput[s], config) == "flag":
            notes.append(f"implied throughput {model.throughput[s]:.3g} outside "
                         f"{config.instrument.throughput_min:g}-"
                         f"{config.instrument.throughput_max:g}")
        for p in PARAMS:
            ax = axes[p]
            # [alpha/M] = 0, the lowest node, is where most stars belong: no note.
            low = p != "alpha" and params[p][s] <= ax[0] + 1e-6
            if ax.size > 1 and not ax[0] - 1e-6 <= params[p][s] <= ax[-1] + 1e-6:
                notes.append(f"{p} beyond the grid (extrapolated)")
            elif ax.size > 1 and (low or params[p][s] >= ax[-1] - 1e-6):
                notes.append(f"{p} at grid edge")
        if not model.has_parallax[s]:
            notes.append("no parallax prior")
        elif not np.isfinite(model.logg_parallax[s]):
            notes.append(f"parallax S/N < {MIN_PARALLAX_SNR:g}: weak log g prior")
        if model.xp["note"][s]:
            notes.append(model.xp["note"][s])
        out.append(", ".join(notes))
    return out
