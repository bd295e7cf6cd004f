"""What the standard-star fit starts from (steps 1-2 of :mod:`kspec_fluxcal.fit.standards`): the
standards' spectra on their own pixels, continuum-normalised and masked, and what the catalog
says before the spectra (reddening, a Teff window from the colours, the parallax)."""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import numpy as np
import xarray as xr

from .._nan import nan_to_num
from .._recent import Recent, per_library
from ..config import continuum_options
from ..constants import (
    A_GAIA_G_PER_EBV,
    A_PS1_G_PER_EBV,
    COLOUR_EXCESS_PER_EBV,
    FWHM_PER_SIGMA,
    MIN_VARIANCE_FRACTION,
    SPIKE_LSF_MARGIN,
)
from ..continuum import fit_continuum, nanmedian
from ..masks import region_mask
from ..photometry import _colour_relations, _teff_kernel, colour_teff_table
from ..templates import library_arrays
from ..wavelength import central_steps

__all__ = ["observed_standards", "catalog_priors", "spike_pixels", "implausible_variance"]


def observed_standards(std, config):
    """The standards as the fit needs them (step 1).

    Takes ``std`` (the standards' fibers of the exposure: flux, variance, good on
    (fiber, wavelength), in memory) and the config (masks, continuum). Returns a namespace of
    arrays: ``wave`` (P,) reference pixels, ``star_wave`` (S, P) each star's own, ``flux``,
    ``var``, ``good``, ``extra_good`` (outside the configured extra masks), ``norm`` and
    ``ivar`` (continuum-normalised spectrum and its inverse variance, 0 where masked for
    matching), ``snr``, ``good_fraction``, ``lsf_scale`` (fiber's line-spread width),
    ``nstar``, ``exptime``, ``expid``."""
    variables = std.variables  # arrays without a DataArray around each (~25 us apiece)
    wave = variables["wavelength"].values
    nstar = std.sizes["fiber"]
    star_wave = (variables["fiber_wavelength"].values if "fiber_wavelength" in std.coords
                 else np.broadcast_to(wave, (nstar, wave.size)))
    flux = variables["flux"].values.astype(np.float64)
    var = variables["variance"].values.astype(np.float64)
    good = variables["good"].values
    extra_good = np.ones(star_wave.shape, bool)
    for extra in config.masks.extra:
        extra_good &= region_mask(star_wave, extra)
    match_mask = good & region_mask(star_wave, config.masks.telluric) & extra_good & (flux > 0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # A dead fiber (no good pixel) has no S/N: NaN, its status says "no valid pixel".
        warnings.simplefilter("ignore", RuntimeWarning)
        snr_pix = np.where(good, flux / np.sqrt(var), np.nan)
        snr = nanmedian(snr_pix)[:, 0] if nstar else np.zeros(0)
    # The continuum's basis is on the reference pixels: per-fiber solutions differ by a
    # fraction of a pixel, nothing on its 400 A scale.
    cont = fit_continuum(flux, wave, match_mask, **continuum_options(config))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = flux / cont
        ivar = np.where(match_mask & np.isfinite(norm), cont**2 / var, 0.0)
    return SimpleNamespace(wave=wave, star_wave=np.ascontiguousarray(star_wave), flux=flux,
                           expid=str(std.attrs.get("expid", "")),
                           var=var, good=good, extra_good=extra_good, norm=norm, ivar=ivar,
                           snr=snr, good_fraction=good.mean(axis=1) if nstar else np.zeros(0),
                           nstar=nstar, exptime=float(std.attrs.get("exptime", np.nan)),
                           lsf_scale=(variables["fibres_lsf_scale"].values.astype(float)
                                      if "fibres_lsf_scale" in std.coords else np.ones(nstar)))


def spike_pixels(std, lsf, sigma):
    """Pixels of the standards brighter than light through the line spread can make them:
    a cosmic ray or hot pixel, masked before the fit (the fit's continuum and velocity are
    not robust to a pixel of 1000 times its neighbours; smaller outliers are found by the
    final models, :func:`~kspec_fluxcal.fit.final_model.outlier_pixels`).

    Any spectrum >= 0 seen through a Gaussian line spread of sigma s pixels gives
    f_i <= C (f_(i-1) + f_(i+1)) and f_i + f_(i+1) <= C^2 (f_(i-1) + f_(i+2)),
    C = exp(1 / (2 s^2)) (the kernel's ratio at one pixel from its peak; pixel integration
    only broadens it), with s from :data:`~kspec_fluxcal.constants.SPIKE_LSF_MARGIN` times
    the header's width. A pixel (or pair) beyond that by ``sigma`` times the noise is masked.
    Takes ``std`` (flux, variance, good on (fiber, wavelength)) and the exposure's
    :class:`~kspec_fluxcal.lsf.LineSpread`; returns (S, P) bool."""
    variables = std.variables
    wave = variables["wavelength"].values
    star_wave = (variables["fiber_wavelength"].values if "fiber_wavelength" in std.coords
                 else np.broadcast_to(wave, variables["flux"].shape))
    good = variables["good"].values
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = (SPIKE_LSF_MARGIN * lsf.fwhm(star_wave)
             / (FWHM_PER_SIGMA * np.abs(central_steps(star_wave))))
        c = np.exp(0.5 / np.maximum(s, 0.3) ** 2)  # s < 0.3 px: C > 250, no test in effect
    c2 = np.square(c)
    # Flux and variance between a NaN column before and two after (the neighbours beyond the
    # ends): at(a, k) is a[i + k] as a view, not a shifted copy of NaN and a (8 of them).
    npix = good.shape[1]
    padded = np.full((2,) + good.shape[:1] + (npix + 3,), np.nan)
    for values, name in zip(padded, ("flux", "variance"), strict=True):
        np.copyto(values[:, 1:-2], variables[name].values, where=good)

    def at(a, k):
        return a[:, 1 + k:1 + k + npix]

    flux, var = padded
    with np.errstate(invalid="ignore"):
        one = at(flux, 0) - c * (at(flux, -1) + at(flux, 1))
        one_var = at(var, 0) + c2 * (at(var, -1) + at(var, 1))
        spike = one > sigma * np.sqrt(one_var)
        # Pairs among the rest (a single spike would make both of its pairs bright).
        for values in padded:
            at(values, 0)[spike] = np.nan
        pair = at(flux, 0) + at(flux, 1) - c2 * (at(flux, -1) + at(flux, 2))
        # (c2 squared: c**4 is a power, ~30x slower; within 2e-16 of it)
        pair_var = at(var, 0) + at(var, 1) + np.square(c2) * (at(var, -1) + at(var, 2))
        pair = pair > sigma * np.sqrt(pair_var)
    spike |= pair
    spike[:, 1:] |= pair[:, :-1]  # the pair's second pixel
    return spike & good


def implausible_variance(std):
    """Pixels of the standards whose variance is below
    :data:`~kspec_fluxcal.constants.MIN_VARIANCE_FRACTION` of their fiber's median: no
    measurement has such a noise, and its weight would rule the fit. (S, P) bool."""
    good = std.variables["good"].values
    var = np.where(good, std.variables["variance"].values.astype(np.float64), np.nan)
    typical = nanmedian(var)  # NaN for a fiber without a good pixel: nothing to mask
    with np.errstate(invalid="ignore"):
        return good & (var < MIN_VARIANCE_FRACTION * typical)


#: Colour relations of the libraries met so far, by library key (a process meets a few).
_COLOUR_RELATIONS = Recent(8)


def _colour_relations_of(library):
    """The colour-Teff relations :func:`teff_from_color` applies with the library's colour
    table (below; the default one without it); prepared once per library (the same for all
    its exposures: 4-5 ms of xarray each)."""
    return per_library(_COLOUR_RELATIONS, _library_colour_relations, library)


def _library_colour_relations(library):
    table = _library_colour_table(library)
    return _colour_relations(colour_teff_table() if table is None else table,
                             COLOUR_EXCESS_PER_EBV)


def _library_colour_table(library):
    """Teff vs synthetic BP-RP and g-r of the templates' dwarfs (logg ~ 4.5, [M/H] ~ 0)."""
    t = library["template_teff"].values
    g = library["template_logg"].values
    m = library["template_feh"].values
    a = library["template_alpha"].values
    best_g = library["logg"].values[np.argmin(np.abs(library["logg"].values - 4.5))]
    best_m = library["feh"].values[np.argmin(np.abs(library["feh"].values))]
    best_a = library["alpha"].values[np.argmin(np.abs(library["alpha"].values))]
    sel = (g == best_g) & (m == best_m) & (a == best_a)
    if sel.sum() < 2:
        return None
    mag = library["synth_mag"].isel(template=np.flatnonzero(sel))
    order = np.argsort(t[sel])
    table = xr.Dataset(coords={"teff": t[sel][order]})
    for name, blue, red in (("bp_rp", "gaiadr2-BP", "gaiadr2-RP"), ("g_r", "panstarrs-g",
                                                                   "panstarrs-r")):
        colour = (mag.sel(band=blue) - mag.sel(band=red)).values[order]
        table[name] = ("teff", colour)
    return table


def _colour_teff(mag, bands, ebv, library):
    """Each star's colour Teff from the library's relation (``mag`` (S, B) in the ``bands``);
    beyond the relation's range (its templates' Teff), from the shipped, wider one: a
    relation clamps colours beyond its ends to its end Teff, and a star thousands of K
    beyond the grid would pass for one at its edge (and never be rejected as outside it)."""
    own = _colour_relations_of(library)
    teff, _ = _teff_kernel(mag, ebv, bands=bands, relations=own)
    ends = np.array([(t[0], t[-1]) for *_, t in own])  # colours increasing: Teff decreasing
    hot, cool = ends[:, 0].max(), ends[:, 1].min()
    if not np.any((teff >= hot) | (teff <= cool)):  # the usual case: no star at an end
        return teff
    wide, _ = _teff_kernel(mag, ebv, bands=bands, relations=_shipped_relations())
    beyond = ((teff >= hot) & (wide > teff)) | ((teff <= cool) & (wide < teff))
    return np.where(beyond, wide, teff)


@functools.cache
def _shipped_relations():
    """The relations of the shipped colour-Teff table (CK04 dwarfs, 4000-9500 K)."""
    return _colour_relations(colour_teff_table(), COLOUR_EXCESS_PER_EBV)


def catalog_priors(matched, library, config):
    """What the catalog says before the spectra (step 2).

    Takes the catalog rows matched to the standards (``matched``, dims star and band), the
    library (its templates' synthetic colours give the colour-Teff relation) and the config
    (Teff window). Returns a namespace: ``ebv_catalog`` (S,), ``teff_colour`` (S,; NaN
    without colours), ``window`` (S, T) the library templates each star may be,
    ``candidates`` (the templates of any window), ``parallax`` and ``parallax_err``."""
    variables = matched.variables  # arrays without a DataArray around each (~25 us apiece)
    a_gaia, a_g = variables["a_gaia"].values, variables["a_g"].values
    ebv_catalog = np.where(np.isfinite(a_gaia), a_gaia / A_GAIA_G_PER_EBV, a_g / A_PS1_G_PER_EBV)
    # teff_from_color's numpy core, given the library's relations (its xarray steps were
    # most of this function's time; a DataArray's transpose and band coordinate 0.4 ms)
    mag = variables["mag"]
    # (the band index's names: its coordinate's values are ~30 us of pandas conversion)
    bands = matched.indexes["band"] if "band" in matched.indexes else variables["band"].values
    teff_colour = _colour_teff(np.moveaxis(mag.values, mag.dims.index("band"), -1),
                               [str(b) for b in bands], nan_to_num(ebv_catalog), library)
    t_templates = library_arrays(library)["template_teff"]
    half = config.fit.teff_window
    lo = np.where(np.isfinite(teff_colour), teff_colour - half, -np.inf)
    hi = np.where(np.isfinite(teff_colour), teff_colour + half, np.inf)
    window = (t_templates[None, :] >= lo[:, None]) & (t_templates[None, :] <= hi[:, None])
    # A window between grid points still needs candidates: take the nearest Teff values.
    empty = ~window.any(axis=1)
    if empty.any():
        nearest = np.abs(t_templates[None, :] - teff_colour[:, None])
        window[empty] = nearest[empty] <= np.nanmin(nearest[empty], axis=1, keepdims=True) + 1
        window[empty & ~np.isfinite(teff_colour)] = True
    return SimpleNamespace(ebv_catalog=ebv_catalog, teff_colour=teff_colour, window=window,
                           candidates=np.flatnonzero(window.any(axis=0)),
                           parallax=variables["parallax"].values,
                           parallax_err=variables["parallax_err"].values)
