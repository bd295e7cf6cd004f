"""Photometry: filter curves (from speclite), AB magnitude units, vectorised synthetic
photometry on xarray objects, colour-based Teff estimates and what a parallax says of a
model's radius (models fitted to photometry: :mod:`kspec_fluxcal.photometric_fit`)."""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import xarray as xr

from ._nan import nan_to_num
from .constants import (
    AB_REFERENCE_FNU,
    BANDS,
    COLOUR_EXCESS_PER_EBV,
    GAIA_DR2_PARALLAX_ZERO_POINT,
    GM_SUN,
    HC_ERG_AA,
    MIN_PARALLAX_SNR,
    PARSEC,
    SPEED_OF_LIGHT_AAS,
    STANDARD_MASS_PRIOR,
)
from .wavelength import air_to_vacuum

__all__ = [
    "Band",
    "load_band",
    "ab_to_fnu",
    "fnu_to_ab",
    "ab_to_flam",
    "flam_to_ab",
    "band_weights",
    "band_weight_values",
    "synthetic_mag",
    "synthetic_mag_values",
    "teff_from_color",
    "colour_teff_table",
    "catalog_parallax",
    "logg_from_parallax",
    "parallax_chi2",
    "band_wavelength",
]

_MAG_PER_LN = 2.5 / np.log(10.0)


#: Wavelength units of speclite's filter tables, in Angstrom.
_TABLE_UNITS = {"Angstrom": 1.0, "nm": 10.0, "micron": 1e4, "": 1.0}


class Band:
    """A filter response as speclite tabulates and uses it: the table's vacuum wavelengths
    (Angstrom) and response, trimmed to one zero on each side; linear in between, 0 beyond.

    Attributes ``name``, ``wavelength``, ``response``, ``effective_wavelength`` (Angstrom,
    photon-weighted mean) and ``ab_zeropoint`` (photons / s / cm^2 of an AB = 0 source), as
    speclite's ``FilterResponse`` computes them (trapezoid rule on the table).
    """

    def __init__(self, name, wavelength, response):
        nonzero = np.flatnonzero(response > 0)
        keep = slice(max(nonzero[0] - 1, 0), nonzero[-1] + 2)
        self.name = name
        self.wavelength = np.asarray(wavelength[keep], dtype=np.float64)
        self.response = np.asarray(response[keep], dtype=np.float64)
        photons = self.response * self.wavelength / HC_ERG_AA
        self.effective_wavelength = float(np.trapezoid(photons * self.wavelength,
                                                       self.wavelength)
                                          / np.trapezoid(photons, self.wavelength))
        ab_flam = AB_REFERENCE_FNU * SPEED_OF_LIGHT_AAS / self.wavelength**2
        self.ab_zeropoint = float(np.trapezoid(photons * ab_flam, self.wavelength))

    def __call__(self, wavelength):
        """The response at vacuum wavelengths (Angstrom)."""
        return np.interp(wavelength, self.wavelength, self.response, left=0.0, right=0.0)

    def __repr__(self):
        return f"Band({self.name!r}, {self.effective_wavelength:.1f} A)"


@functools.cache
def load_band(band):
    """The filter response of ``band`` (e.g. 'gaiadr2-G', 'panstarrs-r', 'twomass-Ks'), from
    speclite's tables (vacuum wavelengths, Angstrom).

    Read from the table itself rather than with ``speclite.filters.load_filter``, which
    imports astropy.table, YAML and scipy.interpolate (~0.15 s of a command's first
    exposure); the values are the same (tests compare them).

    Returns
    -------
    Band
    """
    path = _speclite_table(band)
    if path is None:
        raise ValueError(f"unknown band {band!r}; supported: {', '.join(BANDS)}")
    lines = path.read_text().splitlines()
    declared = {}  # column -> (unit, datatype) from the ECSV header
    for line in lines:
        if line.startswith("# - {name:"):
            fields = dict(f.strip().split(": ", 1) for f in line[5:].rstrip("}").split(", ")
                          if ": " in f)
            declared[fields["name"]] = (fields.get("unit", ""), fields.get("datatype"))
    rows = [line for line in lines if line.strip() and not line.startswith("#")]
    table = np.loadtxt(rows[1:], ndmin=2)
    column = {name: table[:, k] for k, name in enumerate(rows[0].split())}
    unit, _ = declared.get("wavelength", ("Angstrom", None))
    # float32 tables are read as float32 by speclite: the same rounding here.
    dtype = declared.get("response", ("", "float64"))[1] or "float64"
    response = column["response"].astype(dtype).astype(np.float64)
    return Band(band, column["wavelength"] * _TABLE_UNITS[unit], response)


def _speclite_table(band):
    """Path of speclite's table of ``band`` (found without importing speclite), or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("speclite")
    if spec is None or not spec.submodule_search_locations or not str(band).replace(
            "-", "").replace("_", "").isalnum():
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "filters" / f"{band}.ecsv"
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- units


def ab_to_fnu(mag, mag_err=None):
    """AB magnitude to f_nu (erg/s/cm^2/Hz), with the error propagated if given.

    Returns ``fnu`` or ``(fnu, fnu_err)``.
    """
    fnu = AB_REFERENCE_FNU * 10.0 ** (-0.4 * mag)
    if mag_err is None:
        return fnu
    return fnu, fnu * mag_err / _MAG_PER_LN


def fnu_to_ab(fnu, fnu_err=None):
    """f_nu (erg/s/cm^2/Hz) to AB magnitude; returns ``mag`` or ``(mag, mag_err)``."""
    mag = -2.5 * np.log10(fnu / AB_REFERENCE_FNU)
    if fnu_err is None:
        return mag
    return mag, _MAG_PER_LN * fnu_err / fnu


def ab_to_flam(mag, wavelength, mag_err=None):
    """AB magnitude to f_lambda (erg/s/cm^2/A) at ``wavelength`` (A): f_nu c / lambda^2."""
    out = ab_to_fnu(mag, mag_err)
    factor = SPEED_OF_LIGHT_AAS / np.asarray(wavelength, dtype=np.float64) ** 2
    if mag_err is None:
        return out * factor
    return out[0] * factor, out[1] * factor


def flam_to_ab(flam, wavelength, flam_err=None):
    """f_lambda (erg/s/cm^2/A) at ``wavelength`` (A) to AB magnitude (and error)."""
    factor = np.asarray(wavelength, dtype=np.float64) ** 2 / SPEED_OF_LIGHT_AAS
    if flam_err is None:
        return fnu_to_ab(flam * factor)
    return fnu_to_ab(flam * factor, flam_err * factor)


# ----------------------------------------------------------------------------- synthetic photometry


def _speclite_weights(filt, wave):
    """Weights w with sum(w * f_lambda) = speclite's photon-weighted convolution of f_lambda.

    Mirrors ``speclite.filters.FilterConvolution`` (trapezoid rule on the spectrum's own
    wavelengths inside the response, plus the response's own points where the spectrum
    undersamples it, linearly interpolated), so results agree with speclite to rounding.
    Returns None when ``wave`` does not cover the response.
    """
    rw = filt.wavelength
    if wave[0] > rw[0] or wave[-1] < rw[-1]:
        return None
    start = np.flatnonzero(wave <= rw[0])[-1] if wave[0] < rw[0] else 0
    stop = 1 + np.flatnonzero(wave >= rw[-1])[0] if wave[-1] > rw[-1] else wave.size
    w = wave[start:stop]
    resp = np.asarray(filt(w), dtype=np.float64)
    # Quadrature points: each is (position, response, index of left pixel, interpolation t).
    pos, rsp, left, frac = w, resp, None, None
    insert = np.searchsorted(w, rw[1:])
    under = np.flatnonzero(np.diff(insert) == 0) + 1
    if under.size or np.any(w[1:] < w[:-1]):
        x = rw[under]
        k = np.clip(np.searchsorted(w, x) - 1, 0, w.size - 2)
        pos, rsp, left, frac = (np.concatenate(a) for a in (
            (w, x), (resp, np.asarray(filt.response[under], dtype=np.float64)),
            (np.arange(w.size), k), (np.zeros(w.size), (x - w[k]) / (w[k + 1] - w[k]))))
        order = np.argsort(pos, kind="stable")
        pos, rsp, left, frac = pos[order], rsp[order], left[order], frac[order]
    quad = pos.copy()
    quad[0] = max(quad[0], rw[0])
    quad[-1] = min(quad[-1], rw[-1])
    dx = np.diff(quad)
    tau = np.zeros(quad.size)
    tau[:-1] += 0.5 * dx
    tau[1:] += 0.5 * dx
    coef = tau * (quad / HC_ERG_AA) * rsp
    weights = np.zeros(w.size)
    if left is None:  # the spectrum's own points only, in order (K-SPEC's ~1.2 A pixels, the
        weights += coef  # curves' 10 A): what np.add.at adds, without its ~40 % of this
    else:
        np.add.at(weights, left, coef * (1.0 - frac))
        np.add.at(weights, np.minimum(left + 1, w.size - 1), coef * frac)
    full = np.zeros(wave.size)
    full[start:stop] = weights / filt.ab_zeropoint
    return full


@functools.lru_cache(maxsize=8)
def _vacuum_grid(wave_bytes, medium):
    """A grid's vacuum wavelengths and the Jacobian d(air)/d(vac), once for its bands."""
    wave = np.frombuffer(wave_bytes, dtype=np.float64)
    if medium == "air":
        vac = air_to_vacuum(wave)
        # f_lambda per air Angstrom -> per vacuum Angstrom: the Jacobian d(air)/d(vac).
        return vac, np.gradient(wave) / np.gradient(vac)
    return wave, 1.0


@functools.lru_cache(maxsize=64)
def _weights_cached(band, wave_bytes, medium):
    vac, jac = _vacuum_grid(wave_bytes, medium)
    weights = _speclite_weights(load_band(band), vac)
    return None if weights is None else weights * jac


def band_weights(band, wavelength, medium="air"):
    """Linear weights turning f_lambda on ``wavelength`` into AB maggies in ``band``.

    Parameters
    ----------
    band : str or sequence of str
        Speclite filter name(s).
    wavelength : array_like or xarray.DataArray
        Increasing wavelengths, Angstrom.
    medium : {'air', 'vacuum'}
        Medium of ``wavelength``; air wavelengths are converted to vacuum (the filter curves'
        medium) and the flux density per Angstrom with them.

    Returns
    -------
    xarray.DataArray
        Dims (band, wavelength), float64; a band the wavelengths do not cover is all NaN.
    """
    bands = [band] if isinstance(band, str) else list(band)
    wave = np.ascontiguousarray(np.asarray(wavelength, dtype=np.float64))
    return xr.DataArray(band_weight_values(bands, wave, medium), dims=("band", "wavelength"),
                        coords={"band": bands, "wavelength": wave})


def band_weight_values(band, wavelength, medium="air"):
    """:func:`band_weights`' values, (band, wavelength) as a NumPy array (the DataArray's
    band and wavelength indexes cost what the weights of a new grid do)."""
    if medium not in ("air", "vacuum"):
        raise ValueError(f"medium must be 'air' or 'vacuum', not {medium!r}")
    bands = [band] if isinstance(band, str) else list(band)
    wave = np.ascontiguousarray(np.asarray(wavelength, dtype=np.float64))
    rows, key = [], wave.tobytes()  # one copy and hash of the grid for every band
    for b in bands:
        weights = _weights_cached(b, key, medium)
        rows.append(np.full(wave.size, np.nan) if weights is None else weights)
    return np.stack(rows)


def synthetic_mag(flux, band=BANDS, *, dim="wavelength", medium="air"):
    """Synthetic AB magnitudes of spectra with any leading dims, in one vectorised pass.

    Parameters
    ----------
    flux : xarray.DataArray
        f_lambda in erg/s/cm^2/A (any constant factor shifts every magnitude equally), with
        a ``dim`` coordinate in Angstrom. May be Dask-backed: the result stays lazy.
    band : str or sequence of str
        Speclite filter name(s); default: every supported band.
    dim : str
        Wavelength dimension.
    medium : {'air', 'vacuum'}
        Medium of the wavelength coordinate.

    Returns
    -------
    xarray.DataArray
        AB magnitudes with the leading dims of ``flux`` and ``band`` (the band dim is dropped
        when ``band`` is a single string). NaN where the band is not covered, where the
        spectrum has NaN inside the band, or where the integrated flux is not positive.
    """
    bands = [band] if isinstance(band, str) else list(band)
    weights = band_weight_values(bands, flux[dim].values, medium)
    mag = xr.apply_ufunc(synthetic_mag_values, flux, kwargs={"weights": weights},
                         input_core_dims=[[dim]], output_core_dims=[["band"]], dask="allowed")
    mag = mag.assign_coords(band=bands)
    mag.attrs = {"units": "mag", "system": "AB"}
    mag.name = "synth_mag"
    return mag.squeeze("band", drop=True) if isinstance(band, str) else mag


def synthetic_mag_values(flux, weights):
    """:func:`synthetic_mag` on arrays: AB magnitudes (..., band) of f_lambda (..., P) with
    the band weights (band, P) of :func:`band_weights` (values); NaN where a band is not
    covered (its row NaN), where the spectrum has NaN inside a band or where the integrated
    flux is not positive. numpy or Dask arrays (any chunks along P)."""
    weights = nan_to_num(weights)
    if type(flux) is np.ndarray and flux.flags.c_contiguous and np.isfinite(flux).all():
        # Spectra without NaN (the check's, gaps bridged): no band has NaN inside and
        # nan_to_num would change nothing (its copy and the NaN product were ~0.06 of 0.18
        # ms); contiguous, the product's layout is the copy's: the same sums
        maggies = flux.astype(np.float64, copy=False) @ weights.T
        ok = maggies > 0
    else:
        support = (weights != 0).astype(np.float64)
        flux = flux.astype(np.float64)
        maggies = nan_to_num(flux) @ weights.T
        nan_inside = np.isnan(flux).astype(np.float64) @ support.T
        ok = (nan_inside == 0) & (maggies > 0)
    # The logarithm of good values only: a lazy array computes outside any errstate.
    return np.where(ok, -2.5 * np.log10(np.where(ok, maggies, 1.0)), np.nan)


# ----------------------------------------------------------------------------- colour -> Teff

#: Colours used for Teff estimates, in order of preference: (name, blue band, red band).
TEFF_COLOURS = (("bp_rp", "gaiadr2-BP", "gaiadr2-RP"), ("g_r", "panstarrs-g", "panstarrs-r"))


@functools.cache
def colour_teff_table():
    """Dwarf colour-Teff relation shipped with the package.

    AB colours BP-RP (Gaia DR2) and g-r (Pan-STARRS1) of Castelli & Kurucz (2004) ATLAS9
    models with log g = 4.5, [M/H] = 0, computed with :func:`synthetic_mag` by
    ``kspec_fluxcal/data/make_colour_teff.py``.

    Returns
    -------
    xarray.Dataset
        Dim ``teff`` (K) with data variables ``bp_rp`` and ``g_r`` (mag, AB).
    """
    text = resources.files("kspec_fluxcal").joinpath("data/colour_teff_ck04.csv").read_text()
    rows = [line.split(",") for line in text.splitlines() if line and not line.startswith("#")]
    head, body = rows[0], np.array(rows[1:], dtype=np.float64)
    return xr.Dataset({name: ("teff", body[:, i]) for i, name in enumerate(head) if name != "teff"},
                      coords={"teff": body[:, head.index("teff")]})


def teff_from_color(mag, *, ebv=0.0, table=None, window=750.0, extinction=None):
    """Estimate Teff from a colour: Gaia BP-RP, else PS1 g-r; NaN when neither is measured.

    Parameters
    ----------
    mag : xarray.DataArray
        AB magnitudes with a ``band`` dim (e.g. the catalog's ``mag``), any other dims.
    ebv : float or xarray.DataArray
        Reddening E(B-V) to remove from the colours first (e.g. the catalog prior).
    table : xarray.Dataset, optional
        Colour-Teff relation with dim ``teff`` and variables ``bp_rp``, ``g_r`` (default:
        :func:`colour_teff_table`). A template grid's own synthetic colours make the estimate
        consistent with the templates.
    window : float
        Half width of the returned search window, K.
    extinction : dict, optional
        E(colour)/E(B-V) per colour name; default
        :data:`kspec_fluxcal.constants.COLOUR_EXCESS_PER_EBV`.

    Returns
    -------
    xarray.Dataset
        ``teff`` (K), ``teff_min``, ``teff_max`` and ``teff_method`` ('bp_rp', 'g_r' or
        'none'), with the non-band dims of ``mag``.
    """
    table = colour_teff_table() if table is None else table
    extinction = COLOUR_EXCESS_PER_EBV if extinction is None else extinction
    relations = _colour_relations(table, extinction)
    bands = [str(b) for b in mag["band"].values]
    teff, method = xr.apply_ufunc(
        _teff_kernel, mag, xr.DataArray(ebv) if np.ndim(ebv) else ebv,
        kwargs={"bands": bands, "relations": relations}, input_core_dims=[["band"], []],
        output_core_dims=[[], []], dask="parallelized", output_dtypes=[np.float64, np.int8])
    names = np.array(["none", *(c[0] for c in TEFF_COLOURS)])
    return xr.Dataset({
        "teff": teff.assign_attrs(units="K"),
        "teff_min": (teff - window).assign_attrs(units="K"),
        "teff_max": (teff + window).assign_attrs(units="K"),
        "teff_method": xr.apply_ufunc(lambda m: names[m], method, dask="parallelized",
                                      output_dtypes=[names.dtype]),
    })


def _colour_relations(table, extinction):
    """(code, blue, red, colour excess per E(B-V), colours increasing, their Teff) per colour
    of :data:`TEFF_COLOURS` that the table has, least preferred first."""
    out = []
    for code, (name, blue, red) in reversed(list(enumerate(TEFF_COLOURS, start=1))):
        if name not in table:
            continue
        rel = table[name].dropna("teff")
        order = np.argsort(rel.values)  # colour decreases with Teff
        out.append((code, blue, red, extinction[name], rel.values[order],
                    rel["teff"].values[order]))
    return out


def _teff_kernel(mag, ebv, *, bands, relations):
    """Teff from the preferred measured colour (numpy, vectorised over leading axes)."""
    teff = np.full(mag.shape[:-1], np.nan)
    method = np.zeros(mag.shape[:-1], np.int8)
    for code, blue, red, excess, colours, teffs in relations:  # a colour or two
        if blue not in bands or red not in bands:
            continue
        colour = mag[..., bands.index(blue)] - mag[..., bands.index(red)] - excess * ebv
        # Colours beyond the table get its end Teff, not NaN: the window still helps.
        est = np.interp(colour, colours, teffs)
        use = np.isfinite(colour)
        teff = np.where(use, est, teff)
        method = np.where(use, code, method).astype(np.int8)
    return teff, method


# ----------------------------------------------------------------------------- model fits


def catalog_parallax(parallax, parallax_err):
    """Catalog parallaxes with the Gaia DR2 zero point removed, their errors, and where both
    are usable (finite, error > 0), mas."""
    plx = np.asarray(parallax, dtype=np.float64) - GAIA_DR2_PARALLAX_ZERO_POINT
    err = np.asarray(parallax_err, dtype=np.float64)
    return plx, err, np.isfinite(plx) & np.isfinite(err) & (err > 0)


def logg_from_parallax(scale, parallax, parallax_err, mass=STANDARD_MASS_PRIOR):
    """Surface gravity implied by a model's flux scale and the star's parallax.

    A template's surface flux times ``scale`` = (R/D)^2 matches the star's photometry; the
    parallax gives D, hence the radius R, and a mass prior gives log g = log10(G M / R^2).
    Standards include metal-poor subdwarfs, so no dwarf sequence is assumed: only the mass.

    Parameters
    ----------
    scale : array_like
        Dilution factors (R/D)^2 of the models (surface flux to flux at Earth).
    parallax, parallax_err : array_like
        Catalog parallax and its error, mas (Gaia DR2: the global zero point
        :data:`~kspec_fluxcal.constants.GAIA_DR2_PARALLAX_ZERO_POINT` is removed).
    mass : (float, float)
        Mean and sigma of the mass prior, Msun.

    Returns
    -------
    logg, logg_err : numpy.ndarray
        cgs dex; NaN where the parallax is missing or below
        :data:`~kspec_fluxcal.constants.MIN_PARALLAX_SNR` sigma.
    """
    plx, err, good = catalog_parallax(parallax, parallax_err)
    good &= plx > MIN_PARALLAX_SNR * err
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = PARSEC * 1000.0 / np.where(good, plx, np.nan)
        radius2 = distance**2 * np.asarray(scale, dtype=np.float64)
        logg = np.log10(GM_SUN * mass[0] / radius2)
        logg_err = np.hypot(mass[1] / mass[0], 2.0 * err / plx) / np.log(10.0)
    return np.where(good, logg, np.nan), np.where(good, logg_err, np.nan)


def parallax_chi2(scale, logg, parallax, parallax_err, mass=STANDARD_MASS_PRIOR):
    """chi^2 of a catalog parallax against the parallax a model implies, at any parallax S/N.

    A model of surface gravity ``logg`` and dilution ``scale`` = (R/D)^2 has the radius
    R = sqrt(G M / g) for the mass prior, hence the distance D = R / sqrt(scale) and the
    parallax 1/D. Compared in parallax space (the catalog's error is Gaussian there), a
    noisy, even a negative, parallax still tells a dwarf from a giant: the inverse parallax
    need not be a good distance. The mass prior's spread is the predicted parallax's
    (parallax ~ M^-1/2).

    Parameters
    ----------
    scale, logg : array_like
        Models' dilution factors and surface gravities (cgs dex), broadcast together.
    parallax, parallax_err : float or array_like
        Catalog parallax and error, mas (the Gaia DR2 zero point is removed).
    mass : (float, float)
        Mean and sigma of the mass prior, Msun.

    Returns
    -------
    numpy.ndarray
        chi^2; 0 where the parallax or its error is missing.
    """
    plx, err, good = catalog_parallax(parallax, parallax_err)
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = np.sqrt(GM_SUN * mass[0] / 10.0 ** np.asarray(logg, dtype=np.float64))
        predicted = PARSEC * 1000.0 * np.sqrt(np.asarray(scale, dtype=np.float64)) / radius
        var = err**2 + (0.5 * mass[1] / mass[0] * predicted) ** 2
        chi2 = (plx - predicted) ** 2 / var
    return np.where(good & np.isfinite(chi2), chi2, 0.0)


# ----------------------------------------------------------------------------- warp


@functools.cache
def band_wavelength(band):
    """Effective wavelength of a band, Angstrom (speclite's, vacuum; air is shorter by
    1.4 A at PS1 g to 2.6 A at PS1 y and 5.9 A at 2MASS Ks)."""
    return load_band(band).effective_wavelength
