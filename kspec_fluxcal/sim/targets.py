"""The targets of an exposure's fibers: which fiber holds what, the stars' parameters, and
every target's spectrum seen through the fiber's true line spread (the truth ``true_flux``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..constants import BANDS, FLUX_UNIT_SCALE, SPEED_OF_LIGHT_KMS, VEGA_TO_AB
from ..errors import GridError
from ..grid import PARAMS
from ..photometry import ab_to_flam, load_band
from ..wavelength import vacuum_to_air
from .optics import _convolve, _window
from .spectra import _GALAXY_MAG, _QSO_MAG, _galaxy, _magnitudes, _quasar, _reddening, doppler_shift

#: Standard stars: F/G dwarfs (parameters clipped to the grid, with a margin).
_STANDARD_RANGES = {"teff": (5500.0, 7000.0), "logg": (3.8, 4.6), "feh": (-0.9, 0.2)}

#: Stellar masses, M_sun, uniform: F/G dwarfs and subdwarfs, from halo subdwarfs (~0.75) to
#: F dwarfs (~1.3; masses against spectral type of detached eclipsing binaries, Torres,
#: Andersen & Gimenez 2010, A&ARv 18, 67). With log g they give radii, with the dilution
#: distances, and so parallaxes consistent with each star.
_STAR_MASS_MSUN = (0.75, 1.3)
_RV_RANGE = (-200.0, 200.0)
_EBV_RANGE = (0.01, 0.12)

#: Science stars: Gaia G (Vega).
_SCIENCE_STAR_G = (15.0, 18.0)


def _plan_fibers(rng, nfib, n_standards, dead):
    n_sky = 2 if nfib >= 8 else 1
    n_sci = nfib - n_standards - n_sky - int(dead)
    if n_sci < 1:
        raise ValueError(f"{nfib} fibers cannot hold {n_standards} standards, {n_sky} sky "
                         f"{'and a dead fiber ' if dead else ''}and one science target")
    order = list(rng.permutation(["star", "galaxy", "qso"]))
    science = [order[k % 3] for k in range(n_sci)]
    kinds = ["standard"] * n_standards + ["sky"] * n_sky + ["dead"] * int(dead) + science
    return np.array(kinds)[rng.permutation(nfib)]


class _Targets(NamedTuple):
    std_fibers: np.ndarray
    star_fibers: np.ndarray  # standards first, then science stars
    std: dict  # the standards' drawn parameters (the source's sample)
    params: dict  # teff, logg, feh, alpha of every star (standards first)
    source: np.ndarray  # label of each star's source
    rv: np.ndarray  # applied Doppler shift, km/s
    ebv: np.ndarray  # applied (extra) reddening
    mass: np.ndarray  # M_sun
    mags0: np.ndarray  # (star, band) AB at dilution 1
    gmag: np.ndarray  # Gaia G (Vega); the standards' is final after _expose
    dilution: np.ndarray
    true_flux: np.ndarray  # (fiber, pixel) on the common grid
    true_rows: np.ndarray  # (fiber, pixel) on each fiber's pixels
    redshift: np.ndarray
    sharper: float
    # (fiber, pixel) the spectra at half each fiber's wavelengths through the second order's
    # line spread (``second_order``), or None
    second_rows: np.ndarray | None = None


def _observed(source, params, rv, ebv):
    """Spectra of drawn stars at the dilution 1 (Doppler shifted, reddened) and their AB
    magnitudes; a GridError when the source cannot give them a Gaia G magnitude."""
    observed = doppler_shift(source.wavelength, source.spectra(params), rv) \
        * _reddening(source.wavelength, ebv)
    mags = _magnitudes(source.wavelength, observed)
    if not np.all(np.isfinite(mags[:, BANDS.index("gaiadr2-G")])):
        # Every star is scaled by its G: without it its spectrum would be NaN, and the noise
        # draw fail far from the cause ("lam value too large").
        wave, band = source.wavelength, load_band("gaiadr2-G").wavelength
        covered = wave[0] <= vacuum_to_air(band[0]) and wave[-1] >= vacuum_to_air(band[-1])
        problem = ("a star's spectrum is not positive over the Gaia G passband" if covered else
                   f"the source covers {wave[0]:.0f}-{wave[-1]:.0f} A (air), not the whole "
                   f"Gaia G passband ({band[0]:.0f}-{band[-1]:.0f} A, vacuum)")
        raise GridError(getattr(source, "path", source.label), "wavelength",
                        f"{problem}: its stars' magnitudes are scaled by their G")
    return observed, mags


def _targets(rng, aux, stars, std_source, kinds, pixels, optics, second=None):
    """Draw the stars, galaxies and quasars and convolve them to each fiber's true LSF
    (and, with ``second`` (:class:`~kspec_fluxcal.sim.optics._SecondOrder`), to the second
    order's at half the wavelengths: no random draw)."""
    std_fibers = np.flatnonzero(kinds == "standard")
    sci_fibers = np.flatnonzero(kinds == "star")
    nstd, nsci = std_fibers.size, sci_fibers.size
    std = std_source.sample(rng, nstd, _STANDARD_RANGES)
    sci = stars.sample(rng, nsci) if nsci else {p: np.zeros(0) for p in PARAMS}
    params = {p: np.concatenate([std[p], sci[p]]) for p in PARAMS}
    nstar = nstd + nsci
    rv = rng.uniform(*_RV_RANGE, nstar)
    ebv = rng.uniform(*_EBV_RANGE, nstar)
    same = std_source is stars
    groups = [(stars, slice(0, nstar), params)] if same else \
        [(std_source, slice(0, nstd), std)] * bool(nstd) + [(stars, slice(nstd, nstar), sci)]
    observed, mags0 = [], np.zeros((nstar, len(BANDS)))
    for source, part, p in groups:
        obs, mags0[part] = _observed(source, p, rv[part], ebv[part])
        observed.append(obs)
    # Standards at G = 15 for now (their magnitude follows from the S/N); others final.
    gmag = np.concatenate([np.full(nstd, 15.0), rng.uniform(*_SCIENCE_STAR_G, nsci)])
    dilution = 10.0 ** (-0.4 * (gmag + VEGA_TO_AB["gaiadr2-G"]
                                - mags0[:, BANDS.index("gaiadr2-G")]))
    window = _window(stars, pixels, optics)
    native = np.zeros((kinds.size, stars.wavelength[window].size))
    star_fibers = np.concatenate([std_fibers, sci_fibers])
    for (source, part, _), obs in zip(groups, observed, strict=True):
        if source is stars:
            native[star_fibers[part]] = obs[:, window] * (dilution[part] / FLUX_UNIT_SCALE)[:, None]
    redshift = np.full(kinds.size, np.nan)
    redshift[star_fibers] = rv / SPEED_OF_LIGHT_KMS
    _add_extragalactic(rng, stars, window, kinds, native, redshift, pixels.base)
    if not same and nstd:
        win = _window(std_source, pixels, optics)
        native_std = observed[0][:, win] * (dilution[:nstd] / FLUX_UNIT_SCALE)[:, None]

    def seen(pix, opt):  # every fiber's light at the pixels ``pix`` through ``opt``
        flux, rows, frac = _convolve(stars, stars.wavelength[window], native,
                                     np.arange(kinds.size), pix, opt)
        if not same and nstd:
            flux[std_fibers], rows[std_fibers], frac = _convolve(
                std_source, std_source.wavelength[win], native_std, std_fibers, pix, opt)
        return flux, rows, frac

    true_flux, true_rows, sharper = seen(pixels, optics)
    second_rows = None
    if second is not None:  # half the wavelengths: inside the first order's window
        _, second_rows, second_sharper = seen(second.pixels, second.optics)
        # its line spread is half as wide in Angstrom: a coarse source is sampled sooner
        sharper = max(sharper, second_sharper)
    labels = np.array([std_source.label] * nstd + [stars.label] * nsci, dtype="<U32")
    mass = aux.uniform(*_STAR_MASS_MSUN, nstar)
    return _Targets(std_fibers, star_fibers, std, params, labels, rv, ebv, mass, mags0, gmag,
                    dilution, true_flux, true_rows, redshift, float(sharper), second_rows)


def _add_extragalactic(rng, stars, window, kinds, native, redshift, base):
    """Galaxies and quasars on the field source's native grid (in place)."""
    centre = 0.5 * (base[0] + base[-1])
    wave, resolving_power = stars.wavelength, stars.resolving_power
    for f in np.flatnonzero(kinds == "galaxy"):
        level = ab_to_flam(rng.uniform(*_GALAXY_MAG), centre) / FLUX_UNIT_SCALE
        native[f], redshift[f] = _galaxy(rng, stars, wave, window, level, resolving_power)
    for f in np.flatnonzero(kinds == "qso"):
        level = ab_to_flam(rng.uniform(*_QSO_MAG), centre) / FLUX_UNIT_SCALE
        native[f], redshift[f] = _quasar(rng, wave, window, level, resolving_power)


def _std_column(targets, key, default):
    """A per-star value that only some sources give (e.g. CALSPEC's reference reddening):
    the standards' own, ``default`` for science stars and sources without it."""
    nstar = targets.star_fibers.size
    out = np.full(nstar, default, dtype=object if isinstance(default, str) else np.float64)
    if key in targets.std:
        out[: targets.std_fibers.size] = targets.std[key]
    return out
