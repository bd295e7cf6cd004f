"""Survey simulator: RED files, a Refcat2 catalog and the truth behind them.

Everything is written in exactly the formats of the contract (``formats.md``): RED files
(section 1), the ATLAS Refcat2 CSV catalog (section 2), with a BOSZ-layout template grid
(section 3) as the default source of the stellar spectra. The truth of every exposure is saved
next to it, so that tests, the demo and the accuracy benchmark can compare a calibration with
what it should have returned. Every number is drawn from one seed: the same arguments give the
same bytes.

Model of one exposure
---------------------
Wavelengths are in Angstrom, in air; flux densities in units of 1e-17 erg/s/cm2/A
(:data:`~kspec_fluxcal.constants.FLUX_UNIT_SCALE`).

1. *Stars* come from a star source (:mod:`kspec_fluxcal.sources`): BOSZ-layout spectra
   interpolated multilinearly in (Teff, log g, [M/H]) at off-grid parameters
   (:class:`GridStars`; a synthetic grid, a converted CK04 grid or BOSZ), the synthetic model
   computed at the drawn parameters, of either model family (:class:`ModelStars`), or real
   CALSPEC stars (:class:`CalspecStars`). The field (science stars, galaxy continua, catalog
   decoys) uses ``stars``; the standards ``standard_source`` (default the same), so that
   standards can come from another model than the templates: cross-model tests. Spectra are
   Doppler shifted on the native grid with a cubic spline in ln(lambda),
   ``f(lambda) = f_rest(lambda / (1 + v/c))`` without the 1/(1+z) flux factor (it is absorbed
   in the photometric scale), reddened with Fitzpatrick (1999) ``R_V = 3.1`` and scaled by the
   dilution (R/D)^2 to their Gaia G magnitude. Their catalog photometry is the synthetic
   photometry of that spectrum over the source's full range.
2. *Science targets*: field stars, an old-population galaxy (a cool, metal-rich field star
   standing in for the continuum, velocity broadened and redshifted, plus [O II], H-beta,
   [O III], H-alpha, [N II], [S II] emission lines) and a quasar (a power law with broad lines
   and the mean Lyman-alpha forest). Sky fibers have no target; a dead fiber (TYPE 'D') is all
   NaN.
3. The *truth* ``true_flux`` is each target's spectrum convolved with the true line-spread
   function and sampled at the pixel centres with
   :func:`kspec_fluxcal.templates.convolution_matrix` (the operator the fitter uses), with the
   source's own resolution removed in quadrature (where the source is broader than the
   instrument, e.g. CK04's 20 A sampling or CALSPEC's 9.8 A FWHM, it is only sampled, and
   ``source_sharper`` records on which fraction of the pixels): the flux above the atmosphere
   that a perfect calibration returns for a fiber with no aperture loss.
4. The *response* (counts per pixel per flux unit) is exposure time x collecting area x
   transparency x instrument throughput x atmospheric transmission 10^(-0.4 k(lambda) X)
   x telluric transmission x pixel width x lambda / (h c). Fibers lose a grey fraction of a
   point source's light (``aperture``, 0.85-0.95, independent per fiber), so
   ``counts_noiseless = true_flux * response * aperture[:, None]`` exactly (on the common
   grid; with per-fiber wavelengths or line-spreads the counts follow each fiber's own).
5. *Noise*: Poisson counts of signal plus sky (gain 1 e-/count), minus the sky, plus 4 e-
   read noise. The VARIANCE extension is the model variance signal + sky + read noise^2.
   Sky-subtraction residuals at bright sky lines (a few % of the sky line, P-Cygni-like) are
   in the counts but not in the variance; one to four pixels per fiber are NaN (masked
   cosmic rays).

Standard stars get magnitudes such that their median S/N per pixel lands in ``snr_range``;
when the exposure cannot reach it within Gaia G 13.5-16.5, the exposure's transparency (an
overall efficiency scale, recorded in the truth) is changed instead. An exposure may have no
standard star (``n_standards=0``).

Line-spread function. The header's FWHMPCk is the nominal LSF (Gaussian). The light meets a
true one that can differ, as the fitter must cope with: FWHM x ``lsf_scale`` (per exposure,
unknown to the pipeline), x each fiber's own scale (``fiber_lsf_scatter``), and optionally
integrated over the pixel (``pixel_integration``: a one-pixel box on top of the Gaussian).
Stars, sky lines and tellurics all go through the true LSF; the default is the header's.

The tellurics are the package's telluric line list (:mod:`kspec_fluxcal.telluric`) at high
resolution, in the five regions of the ``telluric_default`` mask: Beer's law in the O2
(airmass) and H2O (airmass x ``pwv``) columns, line strengths that follow the night's
``temperature`` through each line's lower-state energy, water widths that change per exposure
(``water_width``), the transmission convolved with each fiber's true line spread. The
pipeline models them with two columns and fixed optical depths: a different form, as the real
atmosphere's would be. The water column (``pwv``) is drawn per exposure, so it changes within
a night; airmass 1-2.

Optional FIBRES column ``LSF_SCALE`` (float; written when ``fiber_lsf_scatter`` > 0): the
FWHM of this fiber's line-spread function over the header's FWHM (FWHMPCk), as arc lines
would measure it. The stars' true FWHM is that times the exposure's ``lsf_scale``.

The catalog holds every observed star (standards and science stars) and decoys that are not
observed: a neighbour 3-10 arcsec from each standard and a few field stars, so that matching
by OBJID or position matters. Its AGaia and Ag are biased high (1.3 x the truth + noise), as a
dust map integrated through the whole Galaxy would be. Parallaxes follow each star: a mass
drawn in 0.75-1.3 M_sun and its log g give the radius R = sqrt(G M / g), the dilution the
distance D = R / sqrt((R/D)^2), and the catalog has 1000 / D[pc] plus the Gaia DR2 zero point
(-0.029 mas) plus noise of the DR2 error at that G (:func:`gaia_parallax_error`).

Gaia XP spectra (``xp=True``; off by default)
---------------------------------------------
Each standard's spectrum at Earth (the one its fiber sees, the G scaling included), binned
to 4 A by its integral, seen through a Gaussian of FWHM lambda / 50
(:data:`~kspec_fluxcal.constants.XP_RESOLVING_POWER`) at GaiaXPy's default sampling
(336-1020 nm in vacuum, every 2 nm; samples the source does not cover are NaN), in
W m^-2 nm^-1 per vacuum nm; times a per-star smooth systematic unknown to the fitter (a grey
offset of 1 %, Legendre degrees 1-3 over 400-1020 nm of 1.0 % rms, a blue term of 2.5 % at
336 nm growing linearly below 400 nm: 2-3 % rms there); plus noise of relative size 0.5 % at
500-900 nm rising to 3 % at 336 nm and 2 % at 1020 nm at G = 15, scaled by
10^(0.2 (G - 15)), correlated over ~3 samples as DR3's are (343 samples of 110
coefficients). Every catalog row gets a Gaia-like ``source_id`` (a hash of its objid). The
XP draws come from a stream of their own: the RED file, the catalog's other columns and the
rest of the truth are those of ``xp=False``. :func:`xp_rows` and :func:`write_xp` write the
table in GaiaXPy's ``calibrate`` layout (``simulate_survey``: ``xp.csv``).

Truth file (``truth/<EXPID>.npz``)
----------------------------------
``wavelength`` (npix; air, Angstrom: the grid ``open_exposure`` returns), ``true_flux``,
``counts_noiseless``, ``sky_counts`` (fiber, wavelength), ``response``, ``throughput``,
``atmosphere``, ``telluric`` (wavelength), ``aperture``, ``fiber_kind``, ``redshift``
(fiber); per-fiber wavelength solutions: ``fiber_wavelength`` (fiber, pixel; air, each
fiber's own pixel centres) and ``true_flux_fiber`` (the truth on them; equal to the
common-grid ones for 1-D files); per standard star ``std_fiber, std_objid,
std_position_only`` (OBJID -1 in FIBRES), ``std_teff, std_logg, std_feh, std_alpha`` (NaN
where the source does not know them), ``std_rv`` (km/s; the star's total, NaN when its own is
unknown, as for CALSPEC) and ``std_rv_extra`` (the applied shift), ``std_ebv`` (reference +
extra), ``std_ebv_extra`` (applied by the simulator) and ``std_ebv_reference`` (already in the
source's spectrum, CALSPEC's), ``std_snr`` (median S/N per pixel of the written counts,
before any resampling by the reader), ``std_gmag`` (Gaia G, Vega, noiseless),
``std_dilution`` ((R/D)^2), ``std_mag`` (star, band; AB, noiseless, over ``bands``),
``std_source`` (the source's label, e.g. ``grid:synthetic``, ``model:B``, ``calspec``),
``std_name`` (CALSPEC name, else ''), ``std_mass`` (M_sun), ``std_radius`` (R_sun),
``std_plx`` (true parallax, mas); ``fiber_lsf_scale`` (fiber); scalars ``airmass, exptime,
mjd, transparency, photometric, pwv, aerosol, night, expid, setup, setup_key,
wavelength_format, wavelength_unit, medium, lsf_scale, pixel_integration, field_source,
source_sharper``. Dead fibers have NaN ``true_flux``, ``true_flux_fiber`` and
``counts_noiseless``. With ``xp``: ``xp_wavelength_nm`` (the sampling, vacuum) and per
standard ``std_xp_flux``, ``std_xp_flux_error`` (what the table holds), ``std_xp_systematic``
(the multiplicative systematic applied) and ``std_xp_true`` (noiseless, without the
systematic), W m^-2 nm^-1. ``aperture_expected`` (wavelength): the aperture a calibration from
many standards refers to (the mean grey loss; with chromatic losses, the point-source loss
averaged over positioning offsets at the exposure's seeing and airmass). With
``chromatic_losses``: ``aperture_chromatic`` (fiber, wavelength: each fiber's point-source
aperture, ``aperture`` then being its median), ``seeing`` (arcsec FWHM at 5000 A, also in
the header SEEING), ``fiber_offset`` (fiber, 2: positioning offsets, arcsec, x along the
parallactic direction) and ``dar_residual`` (the fraction of the differential refraction
left).

Chromatic losses (``chromatic_losses``): a point source's image (Gaussian, FWHM the seeing
x (lambda / 5000 A)^-1/5) sits at the fiber's positioning offset plus the differential
refraction from 6000 A (Filippenko 1982), a quarter of it left by a dispersion corrector;
the fiber (3 arcsec) collects the part inside it (:mod:`kspec_fluxcal.fiberloss`). The
standards' calibration then carries their own chromatic losses, which differ from each
science fiber's.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse
import xarray as xr
from astropy.io import fits
from scipy.interpolate import CubicSpline
from scipy.special import ndtri

from . import __version__
from ._atomic import atomic_directory, atomic_file
from .constants import (
    A_GAIA_G_PER_EBV,
    A_PS1_G_PER_EBV,
    BANDS,
    CATALOG_COLUMNS,
    FLUX_UNIT_SCALE,
    FWHM_PER_SIGMA,
    GAIA_DR2_PARALLAX_ERROR,
    GAIA_DR2_PARALLAX_ZERO_POINT,
    GM_SUN,
    HC_ERG_AA,
    KSPEC_COLLECTING_AREA_CM2,
    LSF_REFERENCE_WAVELENGTH,
    PARSEC,
    R_SUN,
    SPEED_OF_LIGHT_KMS,
    VEGA_TO_AB,
    XP_FLUX_TO_CGS,
    XP_RESOLVING_POWER,
)
from .errors import GridError, OutputExistsError
from .exposure import red_hdulist, setup_key
from .grid import PARAMS
from .lsf import LineSpread
from .photometry import ab_to_flam, synthetic_mag
from .reddening import extinction_per_ebv
from .sources import CalspecStars, GridStars, ModelStars
from .telluric import (
    high_resolution_grid,
    line_optical_depth,
    sample_transmission,
    telluric_lines,
)
from .templates import convolution_matrix
from .wavelength import air_to_vacuum, vacuum_to_air
from .xp import default_sampling, xp_resolution

__all__ = [
    "Setup",
    "DEFAULT_SETUP",
    "ISOPLANE_SETUP",
    "LARGE_SETUP",
    "GridStars",
    "ModelStars",
    "CalspecStars",
    "SimulatedExposure",
    "simulate_exposure",
    "simulate_survey",
    "doppler_shift",
    "atmospheric_extinction",
    "telluric_transmission",
    "parallax",
    "gaia_parallax_error",
    "CATALOG_HEADER",
    "write_catalog",
    "xp_rows",
    "write_xp",
]

#: Refcat2 columns in the order of the formats contract (section 2).
CATALOG_HEADER = (
    "dstDegrees", "objid", "RA", "Dec", "plx", "dplx", "pmra", "dpmra", "pmdec", "dpmdec",
    "Gaia", "dGaia", "BP", "dBP", "RP", "dRP", "Teff", "AGaia", "dupvar", "Ag", "rp1", "r1",
    "r10", "g", "dg", "gchi", "gcontrib", "r", "dr", "rchi", "rcontrib", "i", "di", "ichi",
    "icontrib", "z", "dz", "zchi", "zcontrib", "nstat", "J", "dJ", "H", "dH", "K", "dK",
)

# ----------------------------------------------------------------------------- instrument
# Nominal numbers for a demo, not K-SPEC's measured values.

#: Peak end-to-end throughput (atmosphere excluded): telescope, fiber, spectrograph, CCD.
_PEAK_THROUGHPUT = 0.22
#: CCD gain (e-/count) and read noise (e-), typical of a scientific CCD.
_GAIN = 1.0
_READ_NOISE = 4.0
#: Fiber grey aperture losses for point sources (seeing, positioning): uniform in this range,
#: independent per fiber. Extended sky fills the fiber and has none.
_APERTURE_RANGE = (0.85, 0.95)
#: Exposure time range, s, and airmass range.
_EXPTIME_RANGE = (600.0, 1800.0)
_AIRMASS_RANGE = (1.0, 2.0)
#: Night-to-night throughput drift: grey and tilt terms, 1-sigma.
_DRIFT_SIGMA = (0.02, 0.015)
#: Masked cosmic rays per fiber (NaN pixels), inclusive range.
_COSMICS_PER_FIBER = (1, 4)
#: Sub-pixel shifts of per-fiber wavelength solutions (2-D WAVELA), pixels.
_FIBER_SHIFT_PIXELS = 0.35
#: Sub-pixel samples of the box integral over a pixel (``pixel_integration``): the midpoint
#: rule on a box convolved with a Gaussian of FWHM >= 2 pixels is exact to ~1e-4.
_PIXEL_SUBSAMPLES = 5
#: Bounds of a fiber's FWHM scale (``fiber_lsf_scatter``): a few % scatter, never a fiber twice
#: as sharp or blurred.
_FIBER_LSF_CLIP = (0.8, 1.25)

# ----------------------------------------------------------------------------- atmosphere
#: Rayleigh scattering, mag/airmass: 0.0088 lambda_um^-4.05 (within 7% of Hansen & Travis
#: 1974's optical depth 0.00857 lambda^-4 (1 + 0.0113 lambda^-2), times 1.086 mag, at sea level).
_RAYLEIGH = (0.0088, 4.05)
#: Aerosol extinction, mag/airmass at 1 um and its power (a typical clear-site Angstrom
#: exponent); the nightly value is this times a factor drawn in _AEROSOL_NIGHT.
_AEROSOL = (0.05, 1.3)
_AEROSOL_NIGHT = (0.6, 1.6)
#: Ozone Chappuis band: peak cross-section ~4.7e-21 cm^2 near 6000 A (Burrows et al. 1999,
#: JQSRT 61, 509) times a 300 DU column (8.07e18 cm^-2) gives 0.038 optical depth, 0.04 mag;
#: modelled as a Gaussian of this sigma (A).
_OZONE = (0.04, 6000.0, 650.0)
#: Telluric truth: the package's line list (``kspec_fluxcal.telluric.telluric_lines``) at high
#: resolution, Beer's law in the column (airmass for O2, airmass x water factor for H2O), the
#: transmission convolved with each fiber's true line spread. Deliberately richer than the
#: pipeline's two-column model: every line's strength follows the night's temperature through
#: its lower-state energy E'' (drawn once per line, exponential, mean 300 cm^-1: the
#: rotational populations of O2 and H2O at ~270 K), S(T) = S(T0) (T0/T)^q exp(-c2 E''
#: (1/T - 1/T0)), q = 1 for O2 (linear molecule) and 1.5 for H2O, c2 = hc/k; and the water
#: lines' pressure widths change per exposure with the water's mean altitude.
_TELLURIC_T0 = 270.0
_TELLURIC_TEMPERATURE = (255.0, 285.0)
_TELLURIC_ELOWER = 300.0
_TELLURIC_SEED = 7594
#: Second radiation constant hc/k, cm K (CODATA 2018, exact).
_C2_CM_K = 1.438776877
#: Water-line width factor per exposure (pressure at the water's mean altitude).
_WATER_WIDTH = (0.85, 1.15)
#: Precipitable-water factor (1 = the column of the line list's equivalent widths), per exposure.
_PWV_RANGE = (0.4, 2.5)
#: Grey transparency (thin cloud) per exposure; on a photometric night (``photometric_nights``)
#: it varies by at most 2 % (the issue's definition of photometric).
_TRANSPARENCY_RANGE = (0.8, 1.0)
_PHOTOMETRIC_TRANSPARENCY = (0.98, 1.0)

# ----------------------------------------------------------------------------- fiber losses
#: Chromatic fiber losses (``chromatic_losses``; physics in :mod:`kspec_fluxcal.fiberloss`):
#: the night's median seeing (FWHM at 5000 A at the zenith, arcsec), an exposure's scatter
#: about it (factor) and its growth with airmass, X^0.6 (Roddier 1981); fiber positioning
#: offsets, arcsec per axis (1 sigma); the fraction of the differential refraction left by an
#: atmospheric dispersion corrector (nominal values, not K-SPEC's measured ones).
_SEEING_NIGHT = (0.9, 1.6)
_SEEING_EXPOSURE = (0.85, 1.15)
_SEEING_AIRMASS_POWER = 0.6
_FIBER_POSITION_SIGMA = 0.25
_DAR_RESIDUAL = 0.25

# ----------------------------------------------------------------------------- sky
#: Dark-sky continuum, V mag/arcsec^2 (a dark site, e.g. Benn & Ellison 1998, La Palma 21.9),
#: through a fiber of 3 arcsec diameter (7.07 arcsec^2); V (Vega) ~ AB to 0.02 mag.
_SKY_V_AB = 21.5 - 2.5 * np.log10(np.pi * 1.5**2)
#: Moonlight: sky continuum x (1 + moon (lambda / 5500 A)^-2), moon drawn per night.
_MOON_RANGE = (0.0, 2.0)
#: Bright night-sky lines, air wavelengths (Osterbrock et al. 1996, PASP 108, 277), and their
#: equivalent widths against the dark-sky continuum, A. The dark V = 21.5 mag/arcsec^2 sky is
#: ~1.3 R/A, so a 200 R [O I] 5577 line has ~150 A; OH lines of 50-150 R, 40-110 A (rough).
_SKY_LINES = (
    (5577.34, 150.0), (5889.95, 15.0), (5895.92, 12.0), (6300.30, 60.0), (6363.78, 20.0),
    (6863.96, 40.0), (7276.41, 40.0), (7316.28, 60.0), (7340.89, 60.0), (7750.64, 50.0),
    (7794.11, 50.0), (7821.50, 40.0), (7913.71, 60.0), (7993.33, 80.0), (8344.60, 110.0),
    (8399.17, 80.0), (8430.17, 80.0), (8827.10, 120.0), (8885.85, 100.0),
)
#: Sky-subtraction residuals: amplitudes (fraction of the sky line) of the scale error and of
#: the shift (derivative) term, each of random sign and size uniform in this range, per fiber
#: and line.
_SKY_RESIDUAL = (0.02, 0.06)

# ----------------------------------------------------------------------------- targets
#: Standard stars: F/G dwarfs (parameters clipped to the grid, with a margin).
_STANDARD_RANGES = {"teff": (5500.0, 7000.0), "logg": (3.8, 4.6), "feh": (-0.9, 0.2)}
_STANDARD_G = (13.5, 16.5)
#: The brightest standards used when the usual range cannot reach the S/N asked for (bright
#: standards of short exposures), before the transparency is changed (which makes the
#: implied throughput unphysical, as the pipeline then says).
_BRIGHT_STANDARD_G = 9.0
#: Stellar masses, M_sun, uniform: F/G dwarfs and subdwarfs, from halo subdwarfs (~0.75) to
#: F dwarfs (~1.3; masses against spectral type of detached eclipsing binaries, Torres,
#: Andersen & Gimenez 2010, A&ARv 18, 67). With log g they give radii, with the dilution
#: distances, and so parallaxes consistent with each star.
_STAR_MASS_MSUN = (0.75, 1.3)
_RV_RANGE = (-200.0, 200.0)
_EBV_RANGE = (0.01, 0.12)
#: Science targets: stars (Gaia G, Vega), galaxies and quasars (AB mag of the mean flux
#: density over the exposure's range, at its central wavelength).
_SCIENCE_STAR_G = (15.0, 18.0)
_GALAXY_MAG = (17.0, 19.5)
_GALAXY_Z = (0.02, 0.25)
_GALAXY_SIGMA_KMS = (120.0, 250.0)
_GAS_SIGMA_KMS = 60.0
_QSO_MAG = (17.5, 19.5)
_QSO_Z = (0.3, 2.2)
_QSO_FWHM_KMS = (3000.0, 6000.0)
#: Quasar continuum f_lambda ~ lambda^(-2 - alpha_nu) with alpha_nu = -0.44 and broad-line
#: fluxes relative to Lyman-alpha (= 100), roughly after the SDSS composite of Vanden Berk
#: et al. 2001, AJ 122, 549 (Lyman-alpha rest equivalent width ~90 A). Rest wavelengths:
#: vacuum in the UV, air in the optical.
_QSO_SLOPE = -1.56
_QSO_LYA_EW = 90.0
_QSO_LINES = ((1215.67, 100.0), (1549.06, 25.0), (1908.73, 16.0), (2798.75, 14.0),
              (4340.47, 3.0), (4861.33, 9.0), (6562.80, 30.0))
#: Mean Lyman-alpha forest transmission exp(-0.0018 (1 + z)^3.92) (Faucher-Giguere et al.
#: 2008, ApJ 681, 831).
_LYA_FOREST = (0.0018, 3.92)
#: Galaxy emission lines, air rest wavelengths, and ratios: H-beta = H-alpha / 2.86 (case B,
#: Osterbrock & Ferland 2006), [O III] 4959 = 5007 / 2.98 and [N II] 6548 = 6583 / 3.05
#: (Storey & Zeippen 2000, MNRAS 312, 813).
_HALPHA_EW = (5.0, 40.0)

# ----------------------------------------------------------------------------- catalog
#: Catalog magnitude errors (mag): (error at the bright end, at the faint end, bright mag,
#: faint mag), linear in between; the brief's typical values per survey.
_MAG_ERRORS = {
    "gaiadr2-G": (0.002, 0.004, 13.5, 17.0),
    "gaiadr2-BP": (0.003, 0.006, 13.5, 17.0),
    "gaiadr2-RP": (0.003, 0.006, 13.0, 16.5),
    "panstarrs-g": (0.008, 0.02, 14.0, 18.0),
    "panstarrs-r": (0.008, 0.02, 14.0, 18.0),
    "panstarrs-i": (0.008, 0.02, 14.0, 18.0),
    "panstarrs-z": (0.008, 0.02, 13.5, 17.5),
    "twomass-J": (0.02, 0.05, 12.0, 15.5),
    "twomass-H": (0.02, 0.05, 11.5, 15.0),
    "twomass-Ks": (0.02, 0.05, 11.5, 15.0),
}
#: Dust-map-like extinction columns are biased high: A = 1.3 A_true + N(0, 0.02 mag).
_EXTINCTION_BIAS = 1.3
_EXTINCTION_NOISE = 0.02
#: Catalog Teff: N(0, 150 K) errors; this fraction of stars has Teff = 0 (unknown).
_TEFF_SIGMA = 150.0
#: A catalog parallax error is the median Gaia DR2 one at the star's G
#: (:func:`gaia_parallax_error`) times a factor uniform in this range: at a given G the errors
#: vary with the scanning law's coverage of the sky (Lindegren et al. 2018, A&A 616, A2,
#: section 5); the catalog parallax is the true one + the DR2 zero point + N(0, dplx).
_PLX_ERROR_SPREAD = (0.8, 1.25)
_TEFF_UNKNOWN = 0.2
#: Fractions of catalog stars without 2MASS, with one PS1 band missing (99.999 / 9.999) and
#: with one empty error field.
_P_NO_2MASS = 0.08
_P_PS1_MISSING = 0.08
_P_EMPTY_FIELD = 0.05
#: Decoy (unobserved) catalog stars per exposure: one close neighbour per standard at this
#: separation (arcsec) and this many field stars.
_NEIGHBOUR_ARCSEC = (3.0, 10.0)
_FIELD_DECOYS = 4
#: Fiber-to-catalog offsets, arcsec: 1-sigma per coordinate, and the cap for standards matched
#: by position (the contract's 2 arcsec match radius; the brief asks for 0.5).
_FIBER_OFFSET_ARCSEC = 0.12
_POSITION_ONLY_MAX_ARCSEC = 0.45
#: Probability that a standard has OBJID -1 in the FIBRES table (matched by position).
_P_POSITION_ONLY = 0.3
#: Probability of a dead fiber in an exposure.
_P_DEAD = 0.3

# ----------------------------------------------------------------------------- Gaia XP
#: Simulated XP flux errors at G = 15, (nm, fractional error): ~0.5 % in the middle of BP
#: and RP, rising where their throughputs fall (the blue end of BP, the red end of RP), as
#: the DR3 sampled spectra of G ~ 15 stars show (De Angeli et al. 2023, A&A 674, A2, figs.
#: 14-15, roughly); scaled by 10^(0.2 (G - 15)) (photon noise: error / flux ~ flux^-1/2).
_XP_NOISE = ((336.0, 0.03), (400.0, 0.01), (450.0, 0.006), (500.0, 0.005), (900.0, 0.005),
             (1020.0, 0.02))
#: The noise is correlated over neighbouring samples: white noise smoothed by a Gaussian of
#: this many samples (sigma), so that ~2 sqrt(pi) 0.9 = 3.2 samples carry one independent
#: value: 343 samples of ~110 coefficients, as DR3's (and as the fitter assumes).
_XP_NOISE_CORRELATION = 0.9
#: Per-star smooth systematic, sigmas of: a grey offset; each Legendre coefficient of degree
#: 1-3 over 400-1020 nm (their sum: 1.0 % rms there, 2.1 % at 400 nm); the blue term at
#: 336 nm (growing linearly below 400 nm; 2.5 % rms in all at 336-400 nm). The issue asks for
#: rms ~1 % over 400-1000 nm and 2-3 % below 400 nm.
_XP_SYSTEMATIC = (0.01, 0.012, 0.025)
#: Bin of the truth before it is seen at XP's resolution, Angstrom (<< XP's FWHM, 67 A).
_XP_BIN = 4.0

# ----------------------------------------------------------------------------- survey
#: First night of the simulated survey and the local evening start (KST 20:00 = 11:00 UT).
_FIRST_NIGHT = _dt.date(2026, 11, 1)
_NIGHT_START_UT_HOURS = 11.0
_MJD_EPOCH = _dt.date(1858, 11, 17)
#: Exposure spacing: at least 20 minutes, or the exposure time plus 2 minutes of overhead.
_SPACING_MIN_S = 1200.0
_OVERHEAD_S = 120.0
#: The synthetic grid written when none is given: small enough to write in ~30 s on 2 cores.
_DEMO_GRID = {
    "resolution": 5000,
    "teffs": tuple(range(5250, 7251, 250)),
    "loggs": (3.5, 4.0, 4.5),
    "fehs": (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25),
    "wave_min": 2500.0,
    "wave_max": 26000.0,
}
#: Wavelength-solution varieties: (format, unit, medium). The first three together cover
#: 1-D and 2-D WAVELA, the WCS-only form, nm and vacuum; every survey of >= 3 exposures has them.
_VARIETIES = (
    ("wavela", "nm", "air"),
    ("wavela2d", "Angstrom", "vac"),
    ("wcs", "Angstroms", "air"),
    ("wavela", "Angstrom", "vac"),
    ("wavela2d", "nm", "air"),
    ("wavela", "Angstrom", "air"),
)


# ============================================================================= setups


@dataclasses.dataclass(frozen=True)
class Setup:
    """An instrument setup: pixel grid, fibers and line-spread function.

    Parameters
    ----------
    name : str
        Label (recorded in the truth and the manifest).
    pixels : int
        Pixels per spectrum, linear in wavelength from ``wave_min`` to ``wave_max``.
    fibers : int
        Fibers per exposure (at least 6: up to 3 standards, sky, one science target).
    wave_min, wave_max : float
        Wavelength range, Angstrom, air.
    fwhm_pixels : tuple of 3 float
        LSF FWHM in pixels at the blue end, the centre and the red end; the quadratic through
        them is written as FWHMPC0..2 (FWHM in Angstrom, x = lambda / 10000 A).
    formats : tuple of (str, str, str), optional
        The wavelength solutions its files are written with in a survey, as
        (format, unit, medium) of :func:`simulate_exposure` (e.g. a WCS only); default: the
        survey's mix of every kind.
    """

    name: str = "default"
    pixels: int = 4096
    fibers: int = 14
    wave_min: float = 3500.0
    wave_max: float = 8500.0
    fwhm_pixels: tuple[float, float, float] = (2.4, 2.05, 2.35)
    formats: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "fwhm_pixels", tuple(float(f) for f in self.fwhm_pixels))
        if self.formats is not None:
            object.__setattr__(self, "formats", tuple(tuple(str(v) for v in f)
                                                      for f in self.formats))
        if int(self.pixels) != self.pixels or self.pixels < 64:
            raise ValueError(f"pixels={self.pixels!r}: need an integer >= 64")
        if int(self.fibers) != self.fibers or self.fibers < 6:
            raise ValueError(f"fibers={self.fibers!r}: need an integer >= 6 (up to 3 "
                             "standards, sky fibers and at least one science target)")
        if not 1000.0 < self.wave_min < self.wave_max < 30000.0:
            raise ValueError(f"wave_min={self.wave_min!r}, wave_max={self.wave_max!r}: need "
                             "1000 < wave_min < wave_max < 30000 Angstrom")
        if len(self.fwhm_pixels) != 3 or min(self.fwhm_pixels) <= 0:
            raise ValueError(f"fwhm_pixels={self.fwhm_pixels!r}: need 3 positive values")
        for name in ("pixels", "fibers"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("wave_min", "wave_max"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def dispersion(self):
        """Angstrom per pixel."""
        return (self.wave_max - self.wave_min) / (self.pixels - 1)

    @property
    def wavelength(self):
        """Pixel centres, Angstrom, air (linear)."""
        return np.linspace(self.wave_min, self.wave_max, self.pixels)

    @property
    def lsf(self):
        """The line-spread function, exactly as written in FWHMPC0..2."""
        x = np.array([self.wave_min, 0.5 * (self.wave_min + self.wave_max), self.wave_max])
        x = x / LSF_REFERENCE_WAVELENGTH
        fwhm = np.asarray(self.fwhm_pixels) * self.dispersion
        coeffs = np.linalg.solve(np.polynomial.polynomial.polyvander(x, 2), fwhm)
        return LineSpread(tuple(float(c) for c in coeffs), "FWHMPC")


#: The issue's default: 4096 pixels over 3500-8500 A (1.22 A/pixel), 14 fibers.
DEFAULT_SETUP = Setup()
#: The IsoPlane-320 commissioning setup: 14 fibers, 1340 pixels over 3500-8500 A
#: (3.73 A/pixel), LSF FWHM 2.7 pixels (~10 A); its files carry a linear WCS only (no
#: WAVELA), in air.
ISOPLANE_SETUP = Setup("isoplane", pixels=1340, fwhm_pixels=(2.7, 2.7, 2.7),
                       formats=(("wcs", "Angstroms", "air"),))
#: A later, larger K-SPEC configuration (a stand-in, not a design value): 30 fibers, 2048
#: pixels over 3500-8500 A (2.44 A/pixel).
LARGE_SETUP = Setup("large", pixels=2048, fibers=30, fwhm_pixels=(2.4, 2.2, 2.4))


def _as_setup(value):
    if isinstance(value, Setup):
        return value
    if isinstance(value, Mapping):
        return Setup(**value)
    raise TypeError(f"a setup must be a Setup or a dict of its fields, not {type(value).__name__}")


# ============================================================================= spectra


def doppler_shift(wavelength, flux, velocity):
    """Doppler shift spectra: ``f(lambda) = f_rest(lambda / (1 + v/c))``.

    A cubic spline in ln(lambda) on the native grid; outside the grid the edge values are
    used. The 1/(1+z) flux factor is not applied (a photometric scale absorbs it).

    Parameters
    ----------
    wavelength : numpy.ndarray
        Increasing wavelengths, Angstrom.
    flux : numpy.ndarray
        Spectra on ``wavelength``, shape (nwave,) or (nspec, nwave).
    velocity : float or array_like
        Radial velocities, km/s (one per spectrum).

    Returns
    -------
    numpy.ndarray
        Shifted spectra, shaped like ``flux``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    rows = np.atleast_2d(flux)
    v = np.broadcast_to(np.asarray(velocity, dtype=np.float64), (rows.shape[0],))
    ln_w = np.log(np.asarray(wavelength, dtype=np.float64))
    out = np.empty_like(rows)
    for k in range(rows.shape[0]):  # one spline per spectrum; a handful per exposure
        x = np.clip(ln_w - np.log1p(v[k] / SPEED_OF_LIGHT_KMS), ln_w[0], ln_w[-1])
        out[k] = CubicSpline(ln_w, rows[k])(x)
    return out.reshape(flux.shape)


def _gaussian(x, centre, sigma):
    return np.exp(-0.5 * ((x - centre) / sigma) ** 2) / (np.sqrt(2.0 * np.pi) * sigma)


def _reddening(wavelength, ebv):
    curve = extinction_per_ebv(wavelength, "F99")
    return 10.0 ** (-0.4 * np.asarray(ebv, dtype=np.float64)[..., None] * curve)


def _magnitudes(wavelength, flux):
    """AB magnitudes (nspec, nband) in :data:`BANDS` of f_lambda spectra (any constant unit)."""
    da = xr.DataArray(np.atleast_2d(flux), dims=("spec", "wavelength"),
                      coords={"wavelength": wavelength})
    return synthetic_mag(da, list(BANDS)).transpose("spec", "band").values


def _galaxy(rng, stars, wave, window, centre_flux, resolving_power):
    """An old-population galaxy on wave[window], mean flux density ``centre_flux``."""
    (t0, t1), (f0, f1) = (stars.parameter_range(p, 0.0) for p in ("teff", "feh"))
    ranges = {"teff": (t0, t0 + 0.35 * (t1 - t0)), "feh": (f1 - 0.5 * (f1 - f0), f1)}
    p = stars.sample(rng, 1, ranges)
    rest = stars.spectrum(p["teff"], p["logg"], p["feh"], p["alpha"])[0]
    w = wave[window]
    z_max = max(min(_GALAXY_Z[1], w[0] / wave[0] - 1.01), 0.0)  # rest frame inside the grid
    z = rng.uniform(min(_GALAXY_Z[0], z_max), z_max)
    continuum = doppler_shift(wave, rest, SPEED_OF_LIGHT_KMS * z)[window]
    sigma = rng.uniform(*_GALAXY_SIGMA_KMS)
    broaden = LineSpread((0.0, FWHM_PER_SIGMA * sigma / SPEED_OF_LIGHT_KMS
                          * LSF_REFERENCE_WAVELENGTH), "velocity dispersion")
    continuum = convolution_matrix(w, w, broaden)[0] @ continuum
    continuum *= centre_flux / continuum.mean()
    halpha_ew = rng.uniform(*_HALPHA_EW) * (1.0 + z)
    halpha = halpha_ew * np.interp(6562.80 * (1.0 + z), w, continuum)
    hbeta = halpha / 2.86
    oiii = hbeta * rng.uniform(0.3, 3.0)
    nii = halpha * rng.uniform(0.2, 0.5)
    lines = ((3726.03, hbeta * 0.8), (3728.82, hbeta * 1.0), (4861.33, hbeta),
             (4958.91, oiii / 2.98), (5006.84, oiii), (6548.05, nii / 3.05),
             (6562.80, halpha), (6583.45, nii), (6716.44, halpha * 0.15),
             (6730.82, halpha * 0.11))
    # Lines carry the grid's resolution too, as the continuum does, so the LSF convolution
    # (which removes it in quadrature) leaves their intrinsic width.
    sigma_v = np.hypot(_GAS_SIGMA_KMS, SPEED_OF_LIGHT_KMS / (resolving_power * FWHM_PER_SIGMA))
    spec = continuum.copy()
    for rest_wave, flux in lines:
        centre = rest_wave * (1.0 + z)
        spec += flux * _gaussian(w, centre, centre * sigma_v / SPEED_OF_LIGHT_KMS)
    return spec, z


def _quasar(rng, wave, window, centre_flux, resolving_power):
    """A quasar on wave[window], mean flux density ``centre_flux``."""
    w = wave[window]
    z = rng.uniform(*_QSO_Z)
    rest = w / (1.0 + z)
    continuum = (rest / 1450.0) ** _QSO_SLOPE
    fwhm = rng.uniform(*_QSO_FWHM_KMS)
    sigma_v = np.hypot(fwhm / FWHM_PER_SIGMA,
                       SPEED_OF_LIGHT_KMS / (resolving_power * FWHM_PER_SIGMA))
    lya_flux = _QSO_LYA_EW * (1215.67 / 1450.0) ** _QSO_SLOPE
    spec = continuum.copy()
    for line, relative in _QSO_LINES:
        spec += (lya_flux * relative / 100.0
                 * _gaussian(rest, line, line * sigma_v / SPEED_OF_LIGHT_KMS))
    z_abs = w / 1215.67 - 1.0
    forest = np.where(z_abs < z, np.exp(-_LYA_FOREST[0] * (1.0 + z_abs) ** _LYA_FOREST[1]), 1.0)
    spec *= forest
    return spec * centre_flux / spec.mean(), z


# ============================================================================= atmosphere


def atmospheric_extinction(wavelength, aerosol=_AEROSOL[0]):
    """Extinction coefficient k(lambda), mag per airmass: Rayleigh + aerosol + ozone.

    Parameters
    ----------
    wavelength : array_like
        Angstrom.
    aerosol : float
        Aerosol extinction at 1 micron, mag/airmass.
    """
    um = np.asarray(wavelength, dtype=np.float64) / 1e4
    rayleigh = _RAYLEIGH[0] * um ** -_RAYLEIGH[1]
    dust = aerosol * um ** -_AEROSOL[1]
    ozone = _OZONE[0] * np.exp(-0.5 * ((um * 1e4 - _OZONE[1]) / _OZONE[2]) ** 2)
    return rayleigh + dust + ozone


@functools.cache
def _lower_state_energies():
    """E'' of every line of the telluric line list, cm^-1 (drawn once, seeded)."""
    lines = telluric_lines()
    return np.random.default_rng(_TELLURIC_SEED).exponential(_TELLURIC_ELOWER,
                                                             lines["wavelength"].size)


@functools.lru_cache(maxsize=16)
def _telluric_hr(airmass, pwv, temperature, water_width):
    """The high-resolution truth transmission (grid, transmission) for the conditions."""
    lines = telluric_lines()
    power = np.where(lines["water"], 1.5, 1.0)
    factor = ((_TELLURIC_T0 / temperature) ** power
              * np.exp(-_C2_CM_K * _lower_state_energies() * (1.0 / temperature
                                                              - 1.0 / _TELLURIC_T0)))
    hwhm = lines["hwhm"] * np.where(lines["water"], water_width, 1.0)
    wave = high_resolution_grid()
    tau = line_optical_depth(wave, lines["wavelength"], lines["strength"] * factor, hwhm,
                             lines["water"])
    return wave, np.exp(-airmass * tau[0] - airmass * pwv * tau[1])


def telluric_transmission(wavelength, lsf, airmass=1.0, pwv=1.0, temperature=_TELLURIC_T0,
                          water_width=1.0):
    """Telluric transmission seen through a line-spread function (the simulator's truth).

    The line list at high resolution with temperature-dependent strengths and
    altitude-dependent water widths (see the constants above), Beer's law in the columns,
    convolved with the line spread and sampled at the pixels.

    Parameters
    ----------
    wavelength : array_like
        Pixel centres, Angstrom (air), any shape.
    lsf : LineSpread or line spread with a ``sigma(wavelength)`` method
        The true line-spread function.
    airmass, pwv : float
        Airmass and precipitable-water factor.
    temperature : float
        The atmosphere's temperature, K.
    water_width : float
        Water lines' pressure-width factor.

    Returns
    -------
    numpy.ndarray
        Transmission, shaped like ``wavelength``; 1 away from the bands.
    """
    wave_hr, hr = _telluric_hr(float(airmass), float(pwv), float(temperature),
                               float(water_width))
    wave = np.asarray(wavelength, dtype=np.float64)
    return sample_transmission(wave_hr, hr, wave, lsf.sigma(wave))


def _throughput(wavelength, drift=(0.0, 0.0)):
    """End-to-end instrument throughput (atmosphere excluded), with a night's drift."""
    lam = np.asarray(wavelength, dtype=np.float64)
    bell = np.exp(-0.5 * (np.log(lam / 6000.0) / 0.36) ** 2)
    slope = 1.0 + 0.08 * (lam - 6000.0) / 2500.0
    ripple = 1.0 + 0.03 * np.sin(2.0 * np.pi * (lam - 3500.0) / 1400.0)  # coatings, 1400 A
    dip = 1.0 - 0.05 * np.exp(-0.5 * ((lam - 5600.0) / 150.0) ** 2)  # a dichroic-like dip
    night = 1.0 + drift[0] + drift[1] * (lam - 6000.0) / 2500.0
    return _PEAK_THROUGHPUT * bell * slope * ripple * dip * night


def _instrument_counts(wavelength, pixel_width, exptime, drift):
    """Counts per pixel per flux unit above the instrument (no atmosphere, no cloud)."""
    return (exptime * KSPEC_COLLECTING_AREA_CM2 * _throughput(wavelength, drift) * pixel_width
            * wavelength / HC_ERG_AA * FLUX_UNIT_SCALE / _GAIN)


def _sky(wavelength, lsf, moon):
    """Sky flux density (flux units) in one fiber: continuum and one profile per line."""
    dark = ab_to_flam(_SKY_V_AB, 5500.0) / FLUX_UNIT_SCALE
    shape = (wavelength / 5500.0) ** 0.3
    continuum = dark * shape * (1.0 + moon * (wavelength / 5500.0) ** -2)
    centres = np.array([c for c, _ in _SKY_LINES])
    ew = np.array([e for _, e in _SKY_LINES]) * dark * (centres / 5500.0) ** 0.3
    sigma = lsf.sigma(centres)
    profiles = ew[:, None] * _gaussian(wavelength[None, :], centres[:, None], sigma[:, None])
    offsets = (wavelength[None, :] - centres[:, None]) / sigma[:, None]
    return continuum, profiles, offsets


# ============================================================================= one exposure


class SimulatedExposure(NamedTuple):
    """What :func:`simulate_exposure` returns."""

    #: The RED file as an HDU list (formats contract section 1).
    hdulist: fits.HDUList
    #: The truth, as written to ``truth/<EXPID>.npz`` (see the module docstring).
    truth: dict
    #: Catalog rows: dicts of Refcat2 column to text (:data:`CATALOG_HEADER`), plus '_role'
    #: ('standard', 'star' or 'decoy') and '_fiber' (-1 for decoys), which are not written.
    catalog: list


def _draw(rng, value, bounds):
    return float(rng.uniform(*bounds)) if value is None else float(value)


def _objid(ra, dec):
    """A position-encoded 64-bit object id, in the spirit of PS1's (not its exact formula)."""
    return (np.round((np.asarray(dec) + 90.0) * 1e5).astype(np.int64) * 10**9
            + np.round(np.asarray(ra) * 1e6).astype(np.int64) % 10**9)


def _offset(ra, dec, dra_arcsec, ddec_arcsec):
    dec2 = dec + ddec_arcsec / 3600.0
    ra2 = (ra + dra_arcsec / 3600.0 / np.cos(np.radians(dec))) % 360.0
    return ra2, dec2


def _separation_deg(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = (np.radians(v) for v in (ra1, dec1, ra2, dec2))
    cos = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _mag_error(band, mag):
    lo, hi, bright, faint = _MAG_ERRORS[band]
    return lo + (hi - lo) * np.clip((mag - bright) / (faint - bright), 0.0, 1.0)


def _catalog_row(rng, objid, ra, dec, centre, mag_ab, teff, ebv, plx_true, role, fiber):
    """One Refcat2 row (text) from true AB magnitudes (dict band -> mag, NaN = not covered)
    and the true parallax (mas)."""
    row = dict.fromkeys(CATALOG_HEADER, "0")
    # One uniform draw each for the parallax noise (by the inverse normal CDF) and the error
    # spread: the draws the catalog made before parallaxes followed the stars.
    noise = float(ndtri(np.clip(rng.uniform(), 1e-12, 1.0 - 1e-12)))
    dplx = float(gaia_parallax_error(mag_ab["gaiadr2-G"] - VEGA_TO_AB["gaiadr2-G"])
                 * rng.uniform(*_PLX_ERROR_SPREAD))
    plx = plx_true + GAIA_DR2_PARALLAX_ZERO_POINT + dplx * noise
    row.update({
        "dstDegrees": f"{float(_separation_deg(ra, dec, *centre)):.6f}",
        "objid": str(int(objid)), "RA": f"{ra:.7f}", "Dec": f"{dec:.7f}",
        "plx": f"{plx:.3f}", "dplx": f"{dplx:.3f}",
        "pmra": f"{rng.normal(0.0, 8.0):.3f}", "dpmra": f"{rng.uniform(0.03, 0.1):.3f}",
        "pmdec": f"{rng.normal(0.0, 8.0):.3f}", "dpmdec": f"{rng.uniform(0.03, 0.1):.3f}",
        "dupvar": "0", "nstat": "0",
    })
    rp1 = rng.uniform(3.0, 36.0)
    r1 = rng.uniform(rp1, 36.0)
    row.update({"rp1": f"{rp1:.1f}", "r1": f"{r1:.1f}", "r10": f"{rng.uniform(r1, 36.0):.1f}"})
    for band, (mcol, ecol) in CATALOG_COLUMNS.items():
        mag = mag_ab.get(band, np.nan) - VEGA_TO_AB.get(band, 0.0)
        if not np.isfinite(mag):
            row[mcol], row[ecol] = "99.999", "9.999"
            continue
        err = float(_mag_error(band, mag))
        row[mcol], row[ecol] = f"{mag + rng.normal(0.0, err):.3f}", f"{err:.3f}"
    for band in ("g", "r", "i", "z"):
        row[f"{band}chi"] = f"{rng.uniform(0.2, 2.0):.2f}"
        row[f"{band}contrib"] = str(int(rng.integers(1, 32)))
    unknown = rng.random() < _TEFF_UNKNOWN
    row["Teff"] = "0" if unknown else f"{teff + rng.normal(0.0, _TEFF_SIGMA):.0f}"
    for col, per_ebv in (("AGaia", A_GAIA_G_PER_EBV), ("Ag", A_PS1_G_PER_EBV)):
        value = _EXTINCTION_BIAS * per_ebv * ebv + rng.normal(0.0, _EXTINCTION_NOISE)
        row[col] = f"{max(value, 0.0):.3f}"
    # Missing values, as Refcat2 has them.
    if rng.random() < _P_NO_2MASS:
        _drop_2mass(row)
    if rng.random() < _P_PS1_MISSING:
        _drop_band(row, ("g", "r", "i", "z")[int(rng.integers(4))])
    if rng.random() < _P_EMPTY_FIELD:
        row[("dBP", "dRP", "dz", "dJ")[int(rng.integers(4))]] = ""
    row["_role"], row["_fiber"] = role, int(fiber)
    return row


def _drop_2mass(row):
    for col in ("J", "H", "K"):
        _drop_band(row, col)


def _drop_band(row, col):
    row[col], row[f"d{col}"] = "99.999", "9.999"


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


def _snr_curves(unit_counts, noise_var):
    """Median S/N per pixel (G, star) for a G (Vega) grid; counts are given at G = 15."""
    mags = np.linspace(8.0, 24.0, 321)
    scale = 10.0 ** (-0.4 * (mags - 15.0))
    signal = scale[:, None, None] * unit_counts[None]
    snr = np.nanmedian(signal / np.sqrt(signal + noise_var[None]), axis=2)
    return mags, snr


def _solve_magnitudes(rng, unit_counts, noise_var, snr_range, transparency):
    """Gaia G of each standard for a target S/N in ``snr_range``: in 13.5-16.5, else down to
    G = 9 (bright standards); the transparency changes only when neither reaches the range."""
    lo, hi = snr_range
    mags, snr = _snr_curves(unit_counts, noise_var)  # S/N decreases with G
    g_lo, g_hi = _STANDARD_G

    def snr_at(g, k, q):  # S/N of star k at magnitude g when the counts are scaled by q
        return np.interp(g - 2.5 * np.log10(q), mags, snr[:, k])

    def mag_at(target, k):  # magnitude of star k giving S/N ``target`` at q = 1
        return np.interp(target, snr[::-1, k], mags[::-1])

    def interval(k, q):  # reachable S/N inside the range, kept 2% away from its ends
        return max(lo, snr_at(g_hi, k, q)) * 1.02, min(hi, snr_at(g_lo, k, q)) / 1.02

    nstar = snr.shape[1]
    q = 1.0
    if any(a >= b for a, b in (interval(k, q) for k in range(nstar))):
        g_lo = _BRIGHT_STANDARD_G
    if any(a >= b for a, b in (interval(k, q) for k in range(nstar))):
        # Put the middle of the range (in log) at the middle magnitude for the median star.
        g_mid = float(np.median([mag_at(np.sqrt(lo * hi), k) for k in range(nstar)]))
        q = 10.0 ** (0.4 * (0.5 * (g_lo + g_hi) - g_mid))
    gmag = np.empty(nstar)
    for k in range(nstar):
        a, b = interval(k, q)
        if a < b:
            target = np.exp(rng.uniform(np.log(a), np.log(b)))
            gmag[k] = mag_at(target, k) + 2.5 * np.log10(q)
        else:  # out of reach for this star: the nearest magnitude
            gmag[k] = g_lo if snr_at(g_lo, k, q) < lo else g_hi
    return gmag, transparency * q


def simulate_exposure(rng, stars, *, setup=None, n_standards=2, wavelength_format="wavela",
                      wavelength_unit="Angstrom", medium="air", position_only=None,
                      dead_fiber=False, snr_range=(30.0, 150.0), airmass=None, exptime=None,
                      mjd=61345.4583, night="20261101", expid="KS20261101_0001",
                      conditions=None, field=None, standard_source=None, lsf_scale=1.0,
                      pixel_integration=False, fiber_lsf_scatter=0.0, xp=False,
                      chromatic_losses=False):
    """Simulate one exposure: its RED file, its truth and its catalog rows.

    Parameters
    ----------
    rng : numpy.random.Generator or int or numpy.random.SeedSequence
        Source of every random number (an int is a seed).
    stars : GridStars, ModelStars or path-like
        The source of the field: science stars, galaxy continua, catalog decoys, and the
        standard stars unless ``standard_source`` is given (a directory is loaded as
        :class:`GridStars`; pass a source object to reuse one).
    setup : Setup or dict, optional
        Pixels, fibers, range and LSF (default :data:`DEFAULT_SETUP`).
    n_standards : int
        Standard stars (TYPE 'C'), 1-3 in a real K-SPEC exposure; 0 for an exposure without
        any (to be calibrated from a survey-wide model).
    wavelength_format : {'wavela', 'wavela2d', 'wcs'}
        1-D WAVELA; per-fiber 2-D WAVELA with sub-pixel shifts (the reader resamples); or
        only the primary header's linear WCS.
    wavelength_unit : str
        BUNIT of WAVELA ('Angstrom' or 'nm'), or CUNIT1 of the WCS ('Angstroms', 'nm').
    medium : {'air', 'vac'}
        Medium of the written wavelengths (WAVELA only): the pixels are the same, their
        vacuum wavelengths are written with AIRORVAC = 'vac'.
    position_only : sequence of bool, optional
        Per standard: write OBJID -1 (matched by position). Default: random, 30%.
    dead_fiber : bool
        Include one dead fiber (TYPE 'D', all NaN).
    snr_range : (float, float)
        Median S/N per pixel of the standards.
    airmass, exptime : float, optional
        Default: uniform in 1.0-2.0 and 600-1800 s.
    mjd : float
        MJD at the start of the exposure.
    night, expid : str
        Night (YYYYMMDD) and exposure id (EXPID).
    conditions : dict, optional
        Night-level conditions, drawn when absent: ``aerosol`` (mag/airmass at 1 um),
        ``drift`` (grey, tilt throughput drift), ``moon`` (sky brightening factor),
        ``transparency_range`` (of the exposures' transparency; default 0.8-1.0),
        ``seeing`` (the night's median, with ``chromatic_losses``); exposure-level: ``pwv``
        (water factor), ``transparency``.
    field : (float, float), optional
        Field centre RA, Dec in degrees (default random).
    standard_source : star source or path-like, optional
        Where the standard stars come from (:mod:`kspec_fluxcal.sources`: a grid, the model
        of another family, CALSPEC stars; a directory is loaded as :class:`GridStars`);
        default ``stars``.
    lsf_scale : float or (float, float)
        True LSF FWHM over the header's FWHMPCk (the header is unchanged); a range is drawn
        from uniformly. 1: the header is right.
    pixel_integration : bool
        Integrate the light over each pixel (a one-pixel box on top of the Gaussian LSF).
    fiber_lsf_scatter : float
        Fractional rms scatter of the fibers' FWHM about the header's; written as the FIBRES
        column ``LSF_SCALE`` when > 0.
    xp : bool
        Also simulate Gaia XP spectra of the standards (module docstring; truth entries
        ``xp_wavelength_nm``, ``std_xp_*``; :func:`xp_rows` makes the table's rows) and give
        every catalog row a ``source_id``. Drawn from their own random stream: everything
        else is the same with or without.
    chromatic_losses : bool
        Point sources lose light outside their fiber by seeing and differential refraction
        (:mod:`kspec_fluxcal.fiberloss`): per fiber and wavelength, from the exposure's
        seeing (header SEEING), airmass and each fiber's positioning offset; the grey draw
        stays as the fiber's other losses. False: grey losses only.

    Returns
    -------
    SimulatedExposure
        ``hdulist``, ``truth`` (dict of arrays) and ``catalog`` (list of row dicts).
    """
    rng = np.random.default_rng(rng)
    # New kinds of draws come from a child generator, so that the main stream (and every
    # exposure simulated before these options existed) stays as it was.
    aux = rng.spawn(1)[0]
    setup = DEFAULT_SETUP if setup is None else _as_setup(setup)
    stars = _as_source(stars)
    std_source = stars if standard_source is None else \
        GridStars(standard_source) if isinstance(standard_source, (str, Path)) \
        else standard_source
    unit_factor = _check_options(setup, n_standards, wavelength_format, wavelength_unit, medium,
                                 snr_range)
    if position_only is None:
        position_only = rng.random(n_standards) < _P_POSITION_ONLY
    position_only = np.broadcast_to(np.asarray(position_only, bool), (n_standards,))
    cond = _conditions(rng, conditions, airmass, exptime, field)
    sky_rng = rng.spawn(1)[0]  # the atmosphere's own draws (the other streams unchanged)
    cond["temperature"] = _draw(sky_rng, (conditions or {}).get("temperature"),
                                _TELLURIC_TEMPERATURE)
    cond["water_width"] = _draw(sky_rng, (conditions or {}).get("water_width"), _WATER_WIDTH)
    losses = _losses(rng.spawn(1)[0], cond, conditions, setup.fibers) if chromatic_losses \
        else None
    pixels = _pixels(rng, setup, wavelength_format)
    optics = _true_lsfs(aux, setup, lsf_scale, pixel_integration, fiber_lsf_scatter)
    kinds = _plan_fibers(rng, setup.fibers, n_standards, dead_fiber)
    targets = _targets(rng, aux, stars, std_source, kinds, pixels, optics)
    light = _light(rng, cond, pixels, optics, losses)
    counts = _expose(rng, targets, light, kinds, snr_range, cond["transparency"])
    catalog, fibres = _catalog(rng, aux, stars, targets, kinds, position_only, cond["field"])
    if fiber_lsf_scatter > 0:
        fibres["LSF_SCALE"] = optics.fiber_scale
    if losses is not None:
        cond["seeing"] = losses.seeing
    hdulist = _red_file(counts, fibres, pixels, cond, wavelength_format, unit_factor,
                        wavelength_unit, medium, mjd, night, expid)
    truth = {
        "wavelength": pixels.base, "true_flux": targets.true_flux,
        "response": counts.response, "telluric": light.telluric,
        "atmosphere": light.atmosphere, "throughput": _throughput(pixels.base, cond["drift"]),
        "aperture": light.aperture, "aperture_expected": light.expected,
        **({} if losses is None else {"aperture_chromatic": light.apertures[1],
                                      "seeing": np.float64(losses.seeing),
                                      "fiber_offset": losses.offsets,
                                      "dar_residual": np.float64(_DAR_RESIDUAL)}),
        "counts_noiseless": counts.noiseless,
        "sky_counts": light.sky_counts, "fiber_kind": kinds.astype("<U8"),
        "redshift": targets.redshift, "fiber_wavelength": pixels.rows,
        "true_flux_fiber": targets.true_rows, "response_fiber": counts.response_fiber,
        **_standard_truth(targets, counts, catalog, position_only),
        "bands": np.array(BANDS),
        **{k: np.float64(cond[k]) for k in ("airmass", "exptime", "pwv", "aerosol",
                                            "temperature", "water_width")},
        "transparency": np.float64(counts.transparency),
        "photometric": np.bool_((conditions or {}).get("photometric", False)),
        "mjd": np.float64(mjd), "night": np.str_(night), "expid": np.str_(expid),
        "setup": np.str_(setup.name), "setup_key": np.str_(setup_key(pixels.base, setup.lsf)),
        "wavelength_format": np.str_(wavelength_format),
        "wavelength_unit": np.str_(wavelength_unit), "medium": np.str_(medium),
        "lsf_scale": np.float64(optics.scale), "fiber_lsf_scale": optics.fiber_scale,
        "pixel_integration": np.bool_(pixel_integration),
        "field_source": np.str_(stars.label), "source_sharper": np.float64(targets.sharper),
    }
    if xp:
        # A stream of its own, spawned last: every other draw stays as without XP.
        truth.update(_standard_xp(rng.spawn(1)[0], std_source, targets))
        _add_source_ids(catalog.rows)
    return SimulatedExposure(hdulist, truth, catalog.rows)


def _as_source(stars):
    if isinstance(stars, (str, Path)):
        return GridStars(stars)
    if not hasattr(stars, "spectrum"):
        raise TypeError(f"{type(stars).__name__} cannot be the field's source (science stars, "
                        "galaxies, decoys need parameters on demand): use a GridStars or a "
                        "ModelStars, and pass other sources as standard_source")
    return stars


def _check_options(setup, n_standards, wavelength_format, wavelength_unit, medium, snr_range):
    """Validate the options of :func:`simulate_exposure`; return the wavelength unit factor."""
    if wavelength_format not in ("wavela", "wavela2d", "wcs"):
        raise ValueError(f"wavelength_format={wavelength_format!r}: use 'wavela', 'wavela2d' "
                         "or 'wcs'")
    if medium not in ("air", "vac"):
        raise ValueError(f"medium={medium!r}: use 'air' or 'vac'")
    if medium == "vac" and wavelength_format == "wcs":
        raise ValueError("a vacuum solution needs WAVELA: a linear WCS in vacuum would put the "
                         "pixels on another air grid than the setup's")
    unit_factor = {"angstrom": 1.0, "angstroms": 1.0, "nm": 10.0}.get(wavelength_unit.lower())
    if unit_factor is None:
        raise ValueError(f"wavelength_unit={wavelength_unit!r}: use 'Angstrom(s)' or 'nm'")
    if not 0 <= n_standards <= setup.fibers - 3:
        raise ValueError(f"n_standards={n_standards!r}: need 0 to {setup.fibers - 3}")
    lo_snr, hi_snr = (float(v) for v in snr_range)
    if not 0 < lo_snr < hi_snr:
        raise ValueError(f"snr_range={snr_range!r}: need 0 < low < high")
    return unit_factor


def _conditions(rng, conditions, airmass, exptime, field):
    """Night and exposure conditions: given ones kept, the others drawn (in a fixed order)."""
    cond = dict(conditions or {})
    if "aerosol" in cond:
        aerosol = float(cond["aerosol"])
    else:
        aerosol = _AEROSOL[0] * float(rng.uniform(*_AEROSOL_NIGHT))
    drift = tuple(cond["drift"]) if "drift" in cond else tuple(rng.normal(0.0, _DRIFT_SIGMA))
    out = {"aerosol": aerosol, "drift": drift,
           "moon": _draw(rng, cond.get("moon"), _MOON_RANGE),
           "pwv": _draw(rng, cond.get("pwv"), _PWV_RANGE),
           "transparency": _draw(rng, cond.get("transparency"),
                                 cond.get("transparency_range", _TRANSPARENCY_RANGE))}
    out["airmass"] = round(_draw(rng, airmass, _AIRMASS_RANGE), 4)  # as written in the header
    out["exptime"] = float(np.round(_draw(rng, exptime, _EXPTIME_RANGE)))
    if field is None:
        field = (float(rng.uniform(0.0, 360.0)), float(np.degrees(np.arcsin(
            rng.uniform(np.sin(np.radians(-30.0)), np.sin(np.radians(60.0)))))))
    out["field"] = field
    return out


class _Pixels(NamedTuple):
    setup: Setup
    base: np.ndarray  # the common grid (npix,), air
    rows: np.ndarray  # every fiber's air wavelengths (nfib, npix)
    per_fiber: bool  # rows differ from base (2-D WAVELA)


def _pixels(rng, setup, wavelength_format):
    """Every fiber's air wavelengths; their median is the common grid."""
    base = setup.wavelength
    shifts = np.zeros(setup.fibers)
    if wavelength_format == "wavela2d":
        shifts = rng.uniform(-_FIBER_SHIFT_PIXELS, _FIBER_SHIFT_PIXELS, setup.fibers)
        shifts -= np.median(shifts)
    rows = base[None, :] + shifts[:, None] * setup.dispersion
    return _Pixels(setup, base, rows, wavelength_format == "wavela2d")


# ----------------------------------------------------------------------------- line spread


class _TrueLSF(NamedTuple):
    """The line-spread function the light meets: a Gaussian ``core`` (the header's, scaled)
    and, when ``pixel`` > 0, a box of that width (Angstrom) for the integration over a pixel."""

    core: LineSpread
    pixel: float = 0.0

    def sigma(self, wavelength):
        """Gaussian-equivalent sigma, Angstrom (for unresolved sky and telluric lines)."""
        core = self.core.sigma(wavelength)
        return np.sqrt(core**2 + self.pixel**2 / 12.0) if self.pixel else core


class _Optics(NamedTuple):
    scale: float  # exposure's true FWHM / header FWHM
    fiber_scale: np.ndarray  # per fiber FWHM / header FWHM (FIBRES LSF_SCALE)
    exposure: _TrueLSF  # the exposure's true LSF (every fiber's, without per-fiber scatter)
    fibers: list | None  # per-fiber true LSFs, or None when they all equal ``exposure``

    def all(self):
        return [self.exposure] if self.fibers is None else [self.exposure, *self.fibers]

    def fiber(self, f):
        return self.exposure if self.fibers is None else self.fibers[f]


def _true_lsfs(aux, setup, lsf_scale, pixel_integration, fiber_lsf_scatter):
    """The true line-spread functions of an exposure (its own and per fiber)."""
    if np.ndim(lsf_scale) == 0:
        scale = float(lsf_scale)
    else:
        scale = float(aux.uniform(*lsf_scale))
    if not scale > 0 or fiber_lsf_scatter < 0:
        raise ValueError(f"lsf_scale={lsf_scale!r}, fiber_lsf_scatter={fiber_lsf_scatter!r}: "
                         "need a positive scale and a scatter >= 0")
    nominal = setup.lsf
    pixel = setup.dispersion if pixel_integration else 0.0

    def true(s):  # the header's own object when unchanged: the default stays bit-identical
        core = nominal if s == 1.0 else LineSpread(tuple(c * s for c in nominal.coeffs), "true")
        return _TrueLSF(core, pixel)

    fiber_scale = np.ones(setup.fibers)
    fibers = None
    if fiber_lsf_scatter > 0:
        # Rounded as written in FIBRES LSF_SCALE, so the file states the truth exactly.
        fiber_scale = np.round(np.clip(aux.normal(1.0, fiber_lsf_scatter, setup.fibers),
                                       _FIBER_LSF_CLIP[0], _FIBER_LSF_CLIP[1]), 4)
        fibers = [true(scale * s) for s in fiber_scale]
    return _Optics(scale, fiber_scale, true(scale), fibers)


class _ExcessLSF(NamedTuple):
    """The instrument's FWHM with a source's own resolution removed in quadrature (zero where
    the source is the broader: the spectrum is then only sampled)."""

    core: LineSpread
    source_fwhm: object

    def fwhm(self, wavelength):
        excess = self.core.fwhm(wavelength) ** 2 - self.source_fwhm(wavelength) ** 2
        return np.sqrt(np.maximum(excess, 0.0))


def _source_matrix(source, wave_in, wave_out, lsf):
    """Operator from a source's native spectra on ``wave_in`` to the light seen through the
    true ``lsf`` at the pixel centres ``wave_out``; and the fraction of pixels where the
    instrument is sharper than the source (those are sampled, not convolved)."""
    n = wave_out.size
    if lsf.pixel:
        offsets = (np.arange(_PIXEL_SUBSAMPLES) + 0.5) / _PIXEL_SUBSAMPLES - 0.5
        wave_out = (wave_out[:, None] + offsets[None, :] * np.gradient(wave_out)[:, None]).ravel()
    if source.resolving_power is not None:
        matrix, sharper = convolution_matrix(wave_in, wave_out, lsf.core, source.resolving_power)
    else:
        matrix, sharper = convolution_matrix(wave_in, wave_out,
                                             _ExcessLSF(lsf.core, source.native_fwhm))
    if lsf.pixel:
        # Mean over the sub-pixel samples: the box integral (midpoint rule).
        box = np.full((1, _PIXEL_SUBSAMPLES), 1.0 / _PIXEL_SUBSAMPLES)
        matrix = scipy.sparse.kron(scipy.sparse.eye(n), box, format="csr") @ matrix
    return matrix, sharper


def _convolve(source, wave_in, native, fibers, pixels, optics):
    """The native spectra of ``fibers`` (rows of ``native``) seen through each fiber's true LSF:
    on the common grid, on each fiber's own pixels, and the source's sharper fraction."""
    if optics.fibers is None:
        matrix, sharper = _source_matrix(source, wave_in, pixels.base, optics.exposure)
        true = (matrix @ native.T).T
        if not pixels.per_fiber:
            return true, true.copy(), sharper
        rows = np.stack([_source_matrix(source, wave_in, pixels.rows[f], optics.exposure)[0]
                         @ native[k] for k, f in enumerate(fibers)])
        return true, rows, sharper
    true = np.empty((len(fibers), pixels.base.size))
    rows = np.empty_like(true)
    sharper = 0.0
    for k, f in enumerate(fibers):  # one operator per fiber: a few dozen fibers
        matrix, frac = _source_matrix(source, wave_in, pixels.base, optics.fibers[f])
        true[k] = matrix @ native[k]
        rows[k] = (_source_matrix(source, wave_in, pixels.rows[f], optics.fibers[f])[0]
                   @ native[k]) if pixels.per_fiber else true[k]
        sharper = max(sharper, frac)
    return true, rows, sharper


def _window(source, pixels, optics):
    """The part of a source's native grid under the pixels plus the LSF wings."""
    wave = source.wavelength
    sigma_max = max(float(np.max(lsf.sigma(pixels.base))) for lsf in optics.all())
    need = (pixels.rows.min() - 6.0 * sigma_max - 10.0, pixels.rows.max() + 6.0 * sigma_max + 10.0)
    if wave[0] > need[0] or wave[-1] < need[1]:
        raise GridError(getattr(source, "path", source.label), "wavelength",
                        f"the source covers {wave[0]:.0f}-{wave[-1]:.0f} A; the setup needs "
                        f"{need[0]:.0f}-{need[1]:.0f} A")
    first = max(int(np.searchsorted(wave, need[0])) - 1, 0)
    return slice(first, int(np.searchsorted(wave, need[1])) + 1)


# ----------------------------------------------------------------------------- targets


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


def _observed(source, params, rv, ebv):
    """Spectra of drawn stars at the dilution 1 (Doppler shifted, reddened) and their AB
    magnitudes."""
    observed = doppler_shift(source.wavelength, source.spectra(params), rv) \
        * _reddening(source.wavelength, ebv)
    return observed, _magnitudes(source.wavelength, observed)


def _targets(rng, aux, stars, std_source, kinds, pixels, optics):
    """Draw the stars, galaxies and quasars and convolve them to each fiber's true LSF."""
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
    true_flux, true_rows, sharper = _convolve(stars, stars.wavelength[window], native,
                                              np.arange(kinds.size), pixels, optics)
    if not same and nstd:
        win = _window(std_source, pixels, optics)
        native_std = observed[0][:, win] * (dilution[:nstd] / FLUX_UNIT_SCALE)[:, None]
        true_flux[std_fibers], true_rows[std_fibers], sharper = _convolve(
            std_source, std_source.wavelength[win], native_std, std_fibers, pixels, optics)
    labels = np.array([std_source.label] * nstd + [stars.label] * nsci, dtype="<U32")
    mass = aux.uniform(*_STAR_MASS_MSUN, nstar)
    return _Targets(std_fibers, star_fibers, std, params, labels, rv, ebv, mass, mags0, gmag,
                    dilution, true_flux, true_rows, redshift, float(sharper))


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


# ----------------------------------------------------------------------------- light, counts


class _Light(NamedTuple):
    instrument: np.ndarray  # (pixel,) common grid, at transparency 1
    atmosphere: np.ndarray
    telluric: np.ndarray
    rows: tuple  # (instrument, atmosphere, telluric) on each fiber's pixels (fiber, pixel)
    aperture: np.ndarray  # (fiber,) the grey draw (chromatic: its median over the pixels)
    sky_counts: np.ndarray
    residual: np.ndarray
    noise_var: np.ndarray
    # Point-source apertures on each fiber's pixels and on the common grid: (fiber, 1) grey,
    # or (fiber, pixel) with chromatic losses; and the expected one of a point source.
    apertures: tuple
    expected: np.ndarray


class _Losses(NamedTuple):
    seeing: float  # FWHM at 5000 A at the exposure's airmass, arcsec
    offsets: np.ndarray  # (fiber, 2) positioning offsets, arcsec (x: parallactic)


def _losses(rng, cond, conditions, nfib):
    """The exposure's seeing and the fibers' positioning offsets (their own stream)."""
    night = (conditions or {}).get("seeing")
    median = float(rng.uniform(*_SEEING_NIGHT)) if night is None else float(night)
    seeing = median * rng.uniform(*_SEEING_EXPOSURE) * cond["airmass"] ** _SEEING_AIRMASS_POWER
    return _Losses(round(float(seeing), 3), rng.normal(0.0, _FIBER_POSITION_SIGMA, (nfib, 2)))


def _apertures(grey, pixels, cond, losses):
    """Point-source apertures (rows, common grid) and the expected one (module constants)."""
    if losses is None:
        return (grey[:, None], grey[:, None]), np.full(pixels.base.size, np.mean(
            _APERTURE_RANGE))
    from .fiberloss import expected_aperture, fiber_apertures

    other = grey / _APERTURE_RANGE[1]  # the fiber's own losses; seeing is modelled now
    rows, common = (other[:, None] * fiber_apertures(w, losses.seeing, cond["airmass"],
                                                     losses.offsets, _DAR_RESIDUAL)
                    for w in (pixels.rows, pixels.base))
    expected = np.mean(other) * expected_aperture(pixels.base, losses.seeing, cond["airmass"],
                                                  _FIBER_POSITION_SIGMA, _DAR_RESIDUAL)
    return (rows, common), expected


def _telluric_conditions(cond):
    return cond["airmass"], cond["pwv"], cond["temperature"], cond["water_width"]


def _light(rng, cond, pixels, optics, losses=None):
    """Response terms, apertures, sky and sky-subtraction residuals of every fiber."""
    nfib, npix = pixels.rows.shape

    def response_of(w, lsf):
        instrument = _instrument_counts(w, np.gradient(w, axis=-1), cond["exptime"],
                                        cond["drift"])
        atmosphere = 10.0 ** (-0.4 * atmospheric_extinction(w, cond["aerosol"]) * cond["airmass"])
        return instrument, atmosphere, telluric_transmission(w, lsf, *_telluric_conditions(cond))

    common = response_of(pixels.base, optics.exposure)
    if pixels.per_fiber:
        rows = response_of(pixels.rows, optics.exposure)
    else:
        rows = tuple(np.broadcast_to(a, (nfib, npix)) for a in common)
    if optics.fibers is not None:
        rows = (*rows[:2], np.stack([telluric_transmission(pixels.rows[f], optics.fibers[f],
                                                           *_telluric_conditions(cond))
                                     for f in range(nfib)]))
    aperture = rng.uniform(*_APERTURE_RANGE, nfib)
    sky_counts = np.empty((nfib, npix))
    residual = np.zeros((nfib, npix))
    nlines = len(_SKY_LINES)
    coef_scale, coef_shift = (rng.choice([-1.0, 1.0], (nfib, nlines))
                              * rng.uniform(*_SKY_RESIDUAL, (nfib, nlines)) for _ in range(2))
    shared = not pixels.per_fiber and optics.fibers is None
    sky_shared = _sky(pixels.base, optics.exposure, cond["moon"]) if shared else None
    for f in range(nfib):  # per fiber: its own wavelengths, LSF and residual coefficients
        cont, profiles, offsets = sky_shared or _sky(pixels.rows[f], optics.fiber(f), cond["moon"])
        lines = profiles * rows[0][f]
        sky_counts[f] = cont * rows[0][f] + lines.sum(axis=0)
        residual[f] = coef_scale[f] @ lines + coef_shift[f] @ (lines * offsets)
    apertures, expected = _apertures(aperture, pixels, cond, losses)
    if losses is not None:
        aperture = np.median(apertures[1], axis=1)
    return _Light(*common, rows, aperture, sky_counts, residual, sky_counts + _READ_NOISE**2,
                  apertures, expected)


class _Counts(NamedTuple):
    counts: np.ndarray
    variance: np.ndarray
    noiseless: np.ndarray
    response: np.ndarray
    transparency: float
    std_snr: np.ndarray
    response_fiber: np.ndarray  # (fiber, pixel): the response on each fiber's own pixels


def _expose(rng, targets, light, kinds, snr_range, transparency):
    """Standards' magnitudes for their S/N (the transparency changes only if needed), then the
    noisy counts: Poisson (signal + sky) - sky + read noise + residuals, cosmic rays."""
    std = targets.std_fibers
    inst_rows, atm_rows, tell_rows = light.rows

    def response_rows(q):
        return inst_rows * q * atm_rows * tell_rows

    unit = targets.true_rows[std] * response_rows(transparency)[std] * light.apertures[0][std]
    lo, hi = (float(v) for v in snr_range)
    g_std, transparency = _solve_magnitudes(rng, unit, light.noise_var[std], (lo, hi),
                                            transparency)
    scale = 10.0 ** (-0.4 * (g_std - 15.0))
    targets.gmag[: std.size] = g_std
    targets.dilution[: std.size] *= scale
    targets.true_flux[std] *= scale[:, None]
    targets.true_rows[std] *= scale[:, None]
    response = light.instrument * transparency * light.atmosphere * light.telluric
    signal = targets.true_rows * response_rows(transparency) * light.apertures[0]
    nfib, npix = signal.shape
    counts = (rng.poisson(signal + light.sky_counts) - light.sky_counts
              + rng.normal(0.0, _READ_NOISE, (nfib, npix)) + light.residual)
    variance = signal + light.noise_var
    ncosmic = rng.integers(_COSMICS_PER_FIBER[0], _COSMICS_PER_FIBER[1] + 1, nfib)
    for f in range(nfib):
        hit = rng.choice(npix, ncosmic[f], replace=False)
        counts[f, hit] = np.nan
        variance[f, hit] = np.nan
    dead = kinds == "dead"
    for array in (counts, variance, targets.true_flux, targets.true_rows):
        array[dead] = np.nan
    noiseless = targets.true_flux * response[None, :] * light.apertures[1]
    with np.errstate(invalid="ignore"):
        std_snr = np.nanmedian(signal[std] / np.sqrt(variance[std]), axis=1)
    return _Counts(counts, variance, noiseless, response, transparency, std_snr,
                   np.ascontiguousarray(response_rows(transparency)))


# ----------------------------------------------------------------------------- catalog


class _Catalog(NamedTuple):
    rows: list  # catalog rows (standards, science stars, decoys)
    std_objid: np.ndarray
    mag_true: np.ndarray  # (star, band) AB, noiseless
    plx: np.ndarray  # true parallax, mas
    radius: np.ndarray  # R_sun


def parallax(mass, logg, dilution):
    """True parallax and radius of stars of given mass, gravity and dilution.

    The radius is R = sqrt(G M / g); the dilution (R/D)^2 (flux at Earth over surface flux)
    gives the distance D = R / sqrt(dilution).

    Parameters
    ----------
    mass : array_like
        Solar masses.
    logg : array_like
        log10 surface gravity, cgs.
    dilution : array_like
        (R/D)^2.

    Returns
    -------
    plx : numpy.ndarray
        Parallax, mas (1000 / D in pc).
    radius : numpy.ndarray
        Radius, solar radii.
    """
    radius = np.sqrt(GM_SUN * np.asarray(mass, dtype=np.float64)
                     / 10.0 ** np.asarray(logg, dtype=np.float64))
    distance = radius / np.sqrt(np.asarray(dilution, dtype=np.float64))
    return 1000.0 * PARSEC / distance, radius / R_SUN


def gaia_parallax_error(gmag):
    """Median Gaia DR2 parallax uncertainty at a Gaia G magnitude.

    Parameters
    ----------
    gmag : float or array_like
        Gaia G, Vega.

    Returns
    -------
    float or numpy.ndarray
        mas: log-linear between the anchors of
        :data:`~kspec_fluxcal.constants.GAIA_DR2_PARALLAX_ERROR`, flat beyond them.
    """
    g, err = (np.array(v) for v in zip(*GAIA_DR2_PARALLAX_ERROR, strict=True))
    return 10.0 ** np.interp(gmag, g, np.log10(err))


def _catalog(rng, aux, stars, targets, kinds, position_only, field):
    """Fiber positions and ids, catalog rows of the observed stars and of decoys."""
    nfib = kinds.size
    std_fibers, star_fibers = targets.std_fibers, targets.star_fibers
    dead = kinds == "dead"
    ra = np.full(nfib, np.nan)
    dec = np.full(nfib, np.nan)
    radius = np.degrees(np.arccos(1.0 - rng.random(nfib) * (1.0 - np.cos(np.radians(0.5)))))
    angle = rng.uniform(0.0, 2.0 * np.pi, nfib)
    cat_ra, cat_dec = _offset(field[0], field[1], 3600.0 * radius * np.sin(angle),
                              3600.0 * radius * np.cos(angle))
    live = ~dead
    ra[live], dec[live] = cat_ra[live], cat_dec[live]
    # Fibers sit a fraction of an arcsec from their catalog star.
    off = rng.normal(0.0, _FIBER_OFFSET_ARCSEC, (2, nfib))
    std_pos = std_fibers[position_only]
    cap = np.hypot(*off[:, std_pos]) / _POSITION_ONLY_MAX_ARCSEC
    off[:, std_pos] /= np.maximum(cap, 1.0)
    ra[live], dec[live] = _offset(ra[live], dec[live], off[0, live], off[1, live])
    objid = np.full(nfib, -1, dtype=np.int64)
    star_objid = _objid(cat_ra[star_fibers], cat_dec[star_fibers])
    objid[star_fibers] = star_objid
    objid[std_pos] = -1

    g_index = BANDS.index("gaiadr2-G")
    mag_true = targets.mags0 + (targets.gmag + VEGA_TO_AB["gaiadr2-G"]
                                - targets.mags0[:, g_index])[:, None]
    plx, star_radius = parallax(targets.mass, targets.params["logg"], targets.dilution)
    ebv_catalog = targets.ebv + np.nan_to_num(_std_column(targets, "ebv_reference", 0.0))
    rows = []
    for k, f in enumerate(star_fibers):
        role = "standard" if kinds[f] == "standard" else "star"
        rows.append(_catalog_row(rng, star_objid[k], cat_ra[f], cat_dec[f], field,
                                 dict(zip(BANDS, mag_true[k], strict=True)),
                                 targets.params["teff"][k], ebv_catalog[k], plx[k], role, f))
    rows += _decoys(rng, aux, stars, cat_ra[std_fibers], cat_dec[std_fibers], field)
    names = np.array([f"{kind}{f:02d}" if kind not in ("dead",) else "" for f, kind
                      in enumerate(kinds)])
    types = np.array([{"standard": "C", "sky": "S", "dead": "D"}.get(k, "P") for k in kinds])
    fibres = {"NAME": names, "TYPE": types, "RA": ra, "DEC": dec, "OBJID": objid}
    return _Catalog(rows, star_objid[: std_fibers.size], mag_true, plx, star_radius), fibres


def _std_column(targets, key, default):
    """A per-star value that only some sources give (e.g. CALSPEC's reference reddening):
    the standards' own, ``default`` for science stars and sources without it."""
    nstar = targets.star_fibers.size
    out = np.full(nstar, default, dtype=object if isinstance(default, str) else np.float64)
    if key in targets.std:
        out[: targets.std_fibers.size] = targets.std[key]
    return out


def _standard_truth(targets, counts, catalog, position_only):
    """The truth's per-standard entries (module docstring)."""
    n = targets.std_fibers.size
    ebv_ref = _std_column(targets, "ebv_reference", 0.0)[:n]
    rv_ref = _std_column(targets, "rv_reference", 0.0)[:n]
    return {
        "std_fiber": targets.std_fibers, "std_objid": catalog.std_objid,
        "std_position_only": position_only.copy(),
        **{f"std_{p}": targets.params[p][:n] for p in PARAMS},
        "std_rv": rv_ref + targets.rv[:n], "std_rv_extra": targets.rv[:n],
        "std_ebv": ebv_ref + targets.ebv[:n], "std_ebv_extra": targets.ebv[:n],
        "std_ebv_reference": ebv_ref,
        "std_snr": counts.std_snr, "std_gmag": targets.gmag[:n],
        "std_dilution": targets.dilution[:n], "std_mag": catalog.mag_true[:n],
        "std_source": targets.source[:n],
        "std_name": np.asarray(_std_column(targets, "name", "")[:n], dtype="<U32"),
        "std_mass": targets.mass[:n], "std_radius": catalog.radius[:n],
        "std_plx": catalog.plx[:n],
    }


def _red_file(counts, fibres, pixels, cond, wavelength_format, unit_factor, wavelength_unit,
              medium, mjd, night, expid):
    """The RED file: counts, variance, FIBRES, the header (nominal LSF) and WAVELA or WCS."""
    setup = pixels.setup
    header = fits.Header()
    header["EXPTIME"] = (cond["exptime"], "exposure time, s")
    header["MJD-OBS"] = (float(mjd), "MJD at exposure start")
    header["EXPID"] = (expid, "exposure id")
    header["AIRMASS"] = (cond["airmass"], "airmass at mid-exposure")
    if "seeing" in cond:
        header["SEEING"] = (cond["seeing"], "seeing FWHM at 5000 A, arcsec")
    for k, c in enumerate(setup.lsf.coeffs):
        header[f"FWHMPC{k}"] = (c, "LSF FWHM polynomial, A")
    header["BUNIT"] = "counts"
    header["NIGHT"] = (night, "observing night (local date of the evening)")
    header["RACEN"] = (round(cond["field"][0], 6), "field centre RA, deg")
    header["DECCEN"] = (round(cond["field"][1], 6), "field centre Dec, deg")
    header["SETUP"] = (setup.name, "instrument setup (simulation)")
    header["SIMULATE"] = (True, "simulated by kspec_fluxcal.simulate")
    wave_out, wave_header = None, None
    written = air_to_vacuum(pixels.rows) if medium == "vac" else pixels.rows
    if wavelength_format == "wcs":
        header["CRVAL1"] = pixels.base[0] / unit_factor
        header["CDELT1"] = setup.dispersion / unit_factor
        header["CRPIX1"] = 1.0
        header["CUNIT1"] = wavelength_unit
        header["CTYPE1"] = "Wavelength"
    else:
        wave_out = (written if pixels.per_fiber else written[0]) / unit_factor
        wave_header = {"BUNIT": wavelength_unit}
        if medium == "vac":
            # 1-D: the WAVELA header says it; 2-D: the primary header (both are contract).
            if pixels.per_fiber:
                header["AIRORVAC"] = ("vac", "wavelength solution in vacuum")
            else:
                wave_header["AIRORVAC"] = "vac"
    return red_hdulist(counts.counts, counts.variance, fibres, header, wavelength=wave_out,
                       wavelength_header=wave_header)


def _decoys(rng, aux, stars, std_ra, std_dec, field):
    """Catalog stars that are not observed: a close neighbour of each standard (beyond the
    2 arcsec match radius) and a few field stars."""
    n_near, n_field = std_ra.size, _FIELD_DECOYS
    n = n_near + n_field
    p = stars.sample(rng, n)
    ebv = rng.uniform(*_EBV_RANGE, n)
    observed = stars.spectrum(p["teff"], p["logg"], p["feh"], p["alpha"]) \
        * _reddening(stars.wavelength, ebv)
    mags0 = _magnitudes(stars.wavelength, observed)
    g = rng.uniform(12.0, 19.0, n)
    shift = g + VEGA_TO_AB["gaiadr2-G"] - mags0[:, BANDS.index("gaiadr2-G")]
    mags = mags0 + shift[:, None]
    plx = parallax(aux.uniform(*_STAR_MASS_MSUN, n), p["logg"], 10.0 ** (-0.4 * shift))[0]
    sep = rng.uniform(*_NEIGHBOUR_ARCSEC, n_near)
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    ra_near, dec_near = _offset(std_ra, std_dec, sep * np.sin(angle[:n_near]),
                                sep * np.cos(angle[:n_near]))
    radius = 3600.0 * 0.5 * np.sqrt(rng.random(n_field))
    ra_f, dec_f = _offset(np.full(n_field, field[0]), np.full(n_field, field[1]),
                          radius * np.sin(angle[n_near:]), radius * np.cos(angle[n_near:]))
    ra, dec = np.concatenate([ra_near, ra_f]), np.concatenate([dec_near, dec_f])
    ids = _objid(ra, dec)
    return [_catalog_row(rng, ids[k], ra[k], dec[k], field, dict(zip(BANDS, mags[k], strict=True)),
                         p["teff"][k], ebv[k], plx[k], "decoy", -1) for k in range(n)]


# ----------------------------------------------------------------------------- Gaia XP


def _source_id(objid):
    """A Gaia-DR3-like source id (positive int64) for a catalog objid: a hash, distinct from
    the objid so that matching by source id is really exercised."""
    digest = hashlib.sha1(f"gaia-dr3:{int(objid)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**62 - 1) + 1


def _xp_bins(wave, flux, edges):
    """Mean flux density of ``flux`` (nstar, nwave) in the bins ``edges``: the integral of
    the linear interpolant, so that no sharp line is lost by sampling."""
    steps = 0.5 * (flux[:, 1:] + flux[:, :-1]) * np.diff(wave)
    cum = np.concatenate([np.zeros((flux.shape[0], 1)), np.cumsum(steps, axis=1)], axis=1)
    return np.stack([np.diff(np.interp(edges, wave, c)) for c in cum]) / np.diff(edges)


def _xp_noise(rng, n, nxp):
    """Unit-variance noise correlated over neighbouring samples, as XP's is (its samples
    come from 55 coefficients per instrument): white noise smoothed by a Gaussian of
    :data:`_XP_NOISE_CORRELATION` samples, renormalised."""
    k = np.arange(-5, 6)
    kernel = np.exp(-0.5 * (k / _XP_NOISE_CORRELATION) ** 2)
    kernel /= np.sqrt(np.sum(kernel**2))
    white = rng.standard_normal((n, nxp + k.size - 1))
    return np.stack([np.convolve(w, kernel, mode="valid") for w in white])


def _xp_systematic(rng, n, nm):
    """Per star a smooth multiplicative error unknown to the fitter (:data:`_XP_SYSTEMATIC`):
    a grey offset and Legendre degrees 1-3 over 400-1020 nm (held at their 400 nm value
    below), times a blue term growing linearly from 400 nm to the first sample."""
    x = np.clip(2.0 * (nm - 400.0) / (1020.0 - 400.0) - 1.0, -1.0, 1.0)
    legendre = np.stack([np.polynomial.legendre.Legendre.basis(k)(x) for k in range(4)])
    grey, shape, blue = _XP_SYSTEMATIC
    coef = rng.normal(0.0, 1.0, (n, 4)) * np.array([grey, shape, shape, shape])
    ramp = np.clip((400.0 - nm) / (400.0 - nm[0]), 0.0, 1.0)
    return (1.0 + coef @ legendre) * (1.0 + rng.normal(0.0, blue, (n, 1)) * ramp)


def _standard_xp(rng, std_source, targets):
    """XP-like spectra of the standards: the truth at Earth (``_targets``' spectra, with the
    G scaling of ``_expose``) at XP's resolution on GaiaXPy's default sampling, times a smooth
    systematic, plus noise for the star's G; W m^-2 nm^-1 per vacuum nm, NaN where the
    source does not cover a sample's line spread."""
    n = targets.std_fibers.size
    nm = default_sampling()
    air = vacuum_to_air(10.0 * nm)
    true = np.full((n, nm.size), np.nan)
    if n:
        observed, _ = _observed(std_source, targets.std, targets.rv[:n], targets.ebv[:n])
        at_earth = observed * targets.dilution[:n, None]  # erg/s/cm^2/A per air A
        wave = std_source.wavelength
        fwhm = air[-1] / XP_RESOLVING_POWER
        keep = (wave > air[0] - 6 * fwhm) & (wave < air[-1] + 6 * fwhm)
        edges = np.arange(max(wave[keep][0], air[0] - 6 * fwhm),
                          min(wave[keep][-1], air[-1] + 6 * fwhm), _XP_BIN)
        binned = _xp_bins(wave[keep], at_earth[:, keep], edges)
        centres = np.broadcast_to(0.5 * (edges[1:] + edges[:-1]), binned.shape)
        # Per air Angstrom -> per vacuum nm, in W m^-2 nm^-1.
        true = (xp_resolution(centres, binned, air) * np.gradient(air) / np.gradient(10.0 * nm)
                / XP_FLUX_TO_CGS)
    systematic = _xp_systematic(rng, n, nm)
    gmag = targets.gmag[:n]
    relative = (np.interp(nm, *zip(*_XP_NOISE, strict=True))[None, :]
                * 10.0 ** (0.2 * (gmag[:, None] - 15.0)))
    error = relative * true * systematic
    flux = true * systematic + error * _xp_noise(rng, n, nm.size)
    return {"xp_wavelength_nm": nm, "std_xp_flux": flux, "std_xp_flux_error": error,
            "std_xp_systematic": systematic, "std_xp_true": true}


def _add_source_ids(rows):
    """A ``source_id`` for every catalog row (standards, field stars, decoys), in place."""
    for row in rows:
        row["source_id"] = str(_source_id(row["objid"]))


def xp_rows(truth, catalog):
    """The XP table rows of one simulated exposure (``simulate_exposure(..., xp=True)``).

    Parameters
    ----------
    truth : dict
        Its truth (``std_xp_flux``, ``std_xp_flux_error``, ``std_fiber``).
    catalog : list of dict
        Its catalog rows (with their ``source_id``).

    Returns
    -------
    list of dict
        ``source_id``, ``ra``, ``dec``, ``flux``, ``flux_error`` per standard (for
        :func:`write_xp`).
    """
    by_fiber = {r["_fiber"]: r for r in catalog if r["_role"] == "standard"}
    rows = []
    for k, fiber in enumerate(truth["std_fiber"]):
        row = by_fiber[int(fiber)]
        rows.append({"source_id": row["source_id"], "ra": row["RA"], "dec": row["Dec"],
                     "flux": truth["std_xp_flux"][k],
                     "flux_error": truth["std_xp_flux_error"][k]})
    return rows


def write_xp(path, rows):
    """Write XP spectra in GaiaXPy's ``calibrate`` CSV layout (source_id, flux, flux_error
    as quoted "[v1, v2, ...]" cells, W m^-2 nm^-1, default sampling), plus ``ra``, ``dec``;
    atomically. Missing samples are written ``nan``."""
    def cell(values):
        return '"[' + ", ".join("nan" if not np.isfinite(v) else f"{v:.6e}" for v in values) \
            + ']"'

    lines = ["source_id,ra,dec,flux,flux_error"]
    lines += [f"{r['source_id']},{r['ra']},{r['dec']},{cell(r['flux'])},{cell(r['flux_error'])}"
              for r in rows]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


# ============================================================================= survey


def _mjd(date):
    return float((date - _MJD_EPOCH).days)


def _plan(rng, exposures, nights, setups, n_standards=(1, 3), no_standards=0.0):
    """Per-exposure plan: night, setup, variety, standards, OBJID -1 flags, dead fiber; a
    fraction ``no_standards`` of the exposures (drawn from a child stream: the others' draws
    stay as they were) has none."""
    nights = max(1, min(nights, exposures))
    per_night = np.array_split(np.arange(exposures), nights)
    varieties = [_VARIETIES[k] for k in rng.permutation(3)]
    varieties += [_VARIETIES[k] for k in rng.integers(0, len(_VARIETIES), max(0, exposures - 3))]
    lo, hi = n_standards
    n_std = list(rng.permutation(np.arange(lo, hi + 1)))
    n_std += list(rng.integers(lo, hi + 1, max(0, exposures - (hi - lo + 1))))
    n_std = n_std[:exposures]
    position_only = [rng.random(n) < _P_POSITION_ONLY for n in n_std]
    if no_standards > 0:
        none = rng.spawn(1)[0].random(exposures) < no_standards
        n_std = [0 if z else n for n, z in zip(n_std, none, strict=True)]
        position_only = [p[:n] for p, n in zip(position_only, n_std, strict=True)]
    with_std = [k for k, n in enumerate(n_std) if n > 0]
    if with_std and not any(p.any() for p in position_only):
        position_only[with_std[int(rng.integers(len(with_std)))]][0] = True
    dead = rng.random(exposures) < _P_DEAD
    if exposures >= 3 and not dead.any():
        dead[int(rng.integers(exposures))] = True
    exptime = np.round(rng.uniform(*_EXPTIME_RANGE, exposures))
    plan = []
    for night_index, members in enumerate(per_night):
        date = _FIRST_NIGHT + _dt.timedelta(days=night_index)
        start = _mjd(date) + _NIGHT_START_UT_HOURS / 24.0 + rng.uniform(0.0, 0.02)
        for seq, i in enumerate(members, start=1):
            night = date.strftime("%Y%m%d")
            setup = setups[i % len(setups)]
            fmt, unit, medium = varieties[i] if setup.formats is None \
                else setup.formats[i % len(setup.formats)]
            plan.append({
                "index": int(i), "night": night, "night_index": night_index,
                "expid": f"KS{night}_{seq:04d}", "setup": setup,
                "wavelength_format": fmt, "wavelength_unit": unit, "medium": medium,
                "n_standards": int(n_std[i]), "position_only": position_only[i],
                "dead_fiber": bool(dead[i]), "exptime": float(exptime[i]),
                "mjd": round(start, 6),
            })
            start += (max(_SPACING_MIN_S, exptime[i] + _OVERHEAD_S)
                      + rng.uniform(0.0, 180.0)) / 86400.0
    return plan


def _ensure_catalog_variety(rng, rows):
    """Make sure the catalog has a star without 2MASS, a PS1 sentinel and an empty field
    (among the observed standards, so the fitter meets them)."""
    std = [r for r in rows if r["_role"] == "standard"]
    if not std:
        return
    if not any(r["J"] == "99.999" for r in std):
        _drop_2mass(std[int(rng.integers(len(std)))])
    if not any(r[b] == "99.999" for r in std for b in ("g", "r", "i", "z")):
        _drop_band(std[int(rng.integers(len(std)))], "z")
    if not any(r[c] == "" for r in rows for c in CATALOG_HEADER):
        std[int(rng.integers(len(std)))]["dBP"] = ""


def write_catalog(path, rows):
    """Write catalog rows (dicts of Refcat2 column -> value) as a Refcat2 CSV, atomically;
    with a last column ``source_id`` (Gaia) when the rows have one (simulated with XP)."""
    header = CATALOG_HEADER + (("source_id",) if any("source_id" in r for r in rows) else ())
    lines = [",".join(header)]
    lines += [",".join(str(r.get(c, "")) for c in header) for r in rows]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _write_truth(path, truth):
    # numpy.savez gives its members the fixed zip date 1980-01-01: the bytes depend on the
    # arrays only (checked by the determinism test).
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **truth)


def _demo_grid(directory, previous, workers):
    """Write the demo's synthetic grid (reusing complete files of a previous run)."""
    from .synthgrid import write_synthetic_grid

    if previous is not None and previous.is_dir():
        shutil.copytree(previous, directory)
    try:
        write_synthetic_grid(directory, workers=workers, **_DEMO_GRID)
    except GridError:
        shutil.rmtree(directory, ignore_errors=True)
        write_synthetic_grid(directory, workers=workers, **_DEMO_GRID)


def simulate_survey(outdir, *, exposures=20, nights=4, seed=0, fibers=14, pixels=4096,
                    grid=None, snr_range=(30, 150), setups=None, progress=False,
                    overwrite=False, workers=2, standard_source=None, n_standards=(1, 3),
                    lsf_scale=1.0, pixel_integration=False, fiber_lsf_scatter=0.0, xp=False,
                    no_standards=0.0, snr_range_single=None, photometric_nights=0.0,
                    chromatic_losses=False):
    """Write a small simulated survey with known truth, in the formats of the contract.

    Layout of ``outdir``::

        lake/<YYYYMMDD>/<EXPID>.fits   RED files (formats contract section 1)
        catalog.csv                    Refcat2 catalog (section 2): standards, other stars
                                       of the fields and decoys (with ``source_id`` if xp)
        xp.csv                         with ``xp``: the standards' Gaia XP spectra in
                                       GaiaXPy's layout (:func:`write_xp`)
        truth/<EXPID>.npz              the truth of each exposure (module docstring)
        survey.json                    manifest: seed, options, exposures
        grid/                          the synthetic BOSZ-layout grid, when ``grid`` is None

    The exposures vary deterministically with the seed: 1-D WAVELA, per-fiber 2-D WAVELA
    (resampled by the reader), WCS-only; nm and vacuum solutions; standards matched by
    position (OBJID -1); dead fibers; 1, 2 and 3 standards (a survey of at least 3 exposures
    has each of these). A setup with ``formats`` (e.g. :data:`ISOPLANE_SETUP`: a WCS only)
    is always written that way.

    Parameters
    ----------
    outdir : path-like
        Output directory; must not exist or be empty, unless ``overwrite``.
    exposures, nights : int
        Number of exposures, spread over consecutive nights from 2026-11-01.
    seed : int
        Seed of everything.
    fibers, pixels : int
        Fibers per exposure and pixels per spectrum (3500-8500 A) of the default setup.
    grid : path-like, optional
        BOSZ-layout directory, the source of the field (and of the standards unless
        ``standard_source``); default: write a synthetic one to ``outdir/grid``
        (R = 5000, 2500-26000 A, Teff 5250-7250 K, log g 3.5-4.5, [M/H] -1.0 to +0.25).
    snr_range : (float, float)
        Median S/N per pixel of the standard stars.
    setups : sequence of Setup or dict, optional
        Setups used in turn by successive exposures (default: one, from ``fibers`` and
        ``pixels``).
    progress : bool
        Report progress and timings on stderr.
    overwrite : bool
        Replace an existing non-empty ``outdir`` (atomically).
    workers : int
        Threads writing the synthetic grid.
    standard_source : star source, optional
        Source of the standard stars (:mod:`kspec_fluxcal.sources`), e.g. ``ModelStars("B")``
        or ``CalspecStars(...)`` for cross-model surveys; default the grid.
    n_standards : (int, int)
        Inclusive range of standards per exposure (each value appears once in the first
        exposures, then they are drawn); (0, 3) allows exposures without any.
    lsf_scale, pixel_integration, fiber_lsf_scatter
        Instrument realism, passed to every :func:`simulate_exposure` (a range of
        ``lsf_scale`` is drawn from per exposure).
    xp : bool
        Simulate Gaia XP spectra of the standards (``xp.csv``; their systematics are in the
        truth files); the exposures are the same as without.
    no_standards : float
        Fraction of the exposures without any standard star (drawn; to be calibrated from
        the survey model).
    snr_range_single : (float, float), optional
        S/N range of the standard of exposures with a single one (default ``snr_range``):
        weak single standards, which the survey model should help.
    photometric_nights : float
        Fraction of the nights that are photometric: their exposures' transparency varies
        within 0.98-1.0 (otherwise 0.8-1.0); the manifest and truth say which.
    chromatic_losses : bool
        Seeing- and refraction-dependent fiber losses (see :func:`simulate_exposure`), with
        a median seeing per night.

    Returns
    -------
    pathlib.Path
        ``outdir``.

    Raises
    ------
    OutputExistsError
        When ``outdir`` is not empty and ``overwrite`` is false.
    """
    outdir = Path(outdir)
    if exposures < 1 or nights < 1:
        raise ValueError(f"exposures={exposures!r}, nights={nights!r}: need at least 1 each")
    if not 0 <= n_standards[0] <= n_standards[1]:
        raise ValueError(f"n_standards={n_standards!r}: need 0 <= low <= high")
    if outdir.exists() and any(outdir.iterdir()) and not overwrite:
        raise OutputExistsError(outdir)
    setups = [Setup(pixels=pixels, fibers=fibers)] if setups is None \
        else [_as_setup(s) for s in setups]
    if not setups:
        raise ValueError("setups is empty")
    if len({s.name for s in setups}) != len(setups):
        raise ValueError("setups must have distinct names")
    if not 0.0 <= no_standards <= 1.0 or not 0.0 <= photometric_nights <= 1.0:
        raise ValueError(f"no_standards={no_standards!r}, photometric_nights="
                         f"{photometric_nights!r}: need fractions in [0, 1]")
    options = {"snr_range": snr_range, "standard_source": standard_source,
               "lsf_scale": lsf_scale, "pixel_integration": pixel_integration,
               "fiber_lsf_scatter": fiber_lsf_scatter, "xp": xp,
               "chromatic_losses": chromatic_losses}
    plan_options = {"no_standards": float(no_standards), "snr_range_single": snr_range_single,
                    "photometric_nights": float(photometric_nights)}

    def say(text):
        if progress:
            print(text, file=sys.stderr, flush=True)

    plan_seed, night_seed, catalog_seed, *exposure_seeds = \
        np.random.SeedSequence(seed).spawn(3 + exposures)
    night_rng = np.random.default_rng(night_seed)
    t_start = time.perf_counter()
    # An empty existing directory is replaced like a stale one: the new survey appears whole.
    with atomic_directory(outdir, overwrite=True) as tmp:
        if grid is None:
            t0 = time.perf_counter()
            previous = outdir / "grid" if outdir.exists() else None
            _demo_grid(tmp / "grid", previous, workers)
            say(f"synthetic grid: {time.perf_counter() - t0:.1f} s")
            grid_dir, grid_label = tmp / "grid", "grid"
        else:
            grid_dir, grid_label = Path(grid), str(Path(grid).resolve())
        stars = GridStars(grid_dir)
        plan = _plan(np.random.default_rng(plan_seed), exposures, nights, setups,
                     tuple(n_standards), no_standards)
        night_conditions = [{
            "aerosol": _AEROSOL[0] * night_rng.uniform(*_AEROSOL_NIGHT),
            "drift": tuple(float(d) for d in night_rng.normal(0.0, _DRIFT_SIGMA)),
            "moon": float(night_rng.uniform(*_MOON_RANGE)),
        } for _ in range(max(p["night_index"] for p in plan) + 1)]
        # The atmosphere's temperature per night, from its own stream.
        sky_rng = night_rng.spawn(1)[0]
        for night in night_conditions:
            night["temperature"] = float(sky_rng.uniform(*_TELLURIC_TEMPERATURE))
        _night_options(night_rng.spawn(1)[0], night_conditions, plan_options, chromatic_losses)
        rows, manifest, spectra = [], [], []
        for p, exp_seed in zip(plan, exposure_seeds, strict=True):
            t0 = time.perf_counter()
            single = snr_range_single if p["n_standards"] == 1 and snr_range_single else None
            entry, catalog = _survey_exposure(tmp, p, np.random.default_rng(exp_seed), stars,
                                              night_conditions[p["night_index"]],
                                              {**options, "snr_range": single or snr_range})
            rows += catalog
            spectra += entry.pop("xp_rows", [])
            manifest.append(entry)
            say(f"[{len(manifest)}/{exposures}] {entry['path']}: {p['n_standards']} "
                f"standard(s), {p['wavelength_format']} {p['wavelength_unit']} {p['medium']}, "
                f"{time.perf_counter() - t0:.2f} s")
        _ensure_catalog_variety(np.random.default_rng(catalog_seed), rows)
        ids = [r["objid"] for r in rows]
        if len(set(ids)) != len(ids):  # position-encoded ids collide only for coincident stars
            raise RuntimeError("duplicate catalog objids; try another seed")
        write_catalog(tmp / "catalog.csv", rows)
        if xp:
            write_xp(tmp / "xp.csv", spectra)
        recorded = {**options, **plan_options, "exposures": exposures, "nights": nights,
                    "fibers": fibers, "pixels": pixels, "grid": grid_label, "setups": setups,
                    "n_standards": n_standards}
        info = _survey_info(seed, recorded, stars, len(rows), manifest)
        with atomic_file(tmp / "survey.json") as path:
            path.write_text(json.dumps(info, indent=1) + "\n")
    say(f"survey: {exposures} exposures in {time.perf_counter() - t_start:.1f} s -> {outdir}")
    return outdir


def _survey_info(seed, options, stars, n_rows, manifest):
    """The survey manifest (survey.json)."""
    source = options["standard_source"] or stars
    return {
        "title": "kspec-fluxcal simulated survey (SYNTHETIC data)",
        "generator": f"kspec_fluxcal.simulate {__version__}",
        "seed": int(seed),
        "options": {
            **{k: options[k] for k in ("exposures", "nights", "fibers", "pixels")},
            "snr_range": [float(v) for v in options["snr_range"]], "grid": options["grid"],
            "setups": [dataclasses.asdict(s) for s in options["setups"]],
            "n_standards": [int(v) for v in options["n_standards"]],
            "standard_source": source.describe(),
            "lsf_scale": np.asarray(options["lsf_scale"], dtype=float).tolist(),
            "pixel_integration": bool(options["pixel_integration"]),
            "fiber_lsf_scatter": float(options["fiber_lsf_scatter"]),
            "xp": bool(options["xp"]),
            "no_standards": options["no_standards"],
            "snr_range_single": None if options["snr_range_single"] is None else
            [float(v) for v in options["snr_range_single"]],
            "photometric_nights": options["photometric_nights"],
            "chromatic_losses": bool(options["chromatic_losses"]),
        },
        "grid": {"path": options["grid"], "resolution": stars.resolution,
                 "synthetic": bool(stars.synthetic), "files_read": stars.files_read},
        "catalog": "catalog.csv",
        **({"xp": "xp.csv"} if options["xp"] else {}),
        "n_catalog_rows": n_rows,
        "exposures": manifest,
    }


def _survey_exposure(tmp, p, rng, stars, conditions, options):
    """Simulate and write one planned exposure of a survey; its manifest entry and catalog
    rows."""
    sim = simulate_exposure(
        rng, stars, setup=p["setup"], n_standards=p["n_standards"],
        wavelength_format=p["wavelength_format"], wavelength_unit=p["wavelength_unit"],
        medium=p["medium"], position_only=p["position_only"], dead_fiber=p["dead_fiber"],
        exptime=p["exptime"], mjd=p["mjd"], night=p["night"], expid=p["expid"],
        conditions=conditions, **options)
    rel = Path("lake") / p["night"] / f"{p['expid']}.fits"
    with atomic_file(tmp / rel) as path:
        sim.hdulist.writeto(path, overwrite=True, output_verify="exception")
    truth_rel = Path("truth") / f"{p['expid']}.npz"
    _write_truth(tmp / truth_rel, sim.truth)
    t = sim.truth
    entry = {
        "path": rel.as_posix(), "truth": truth_rel.as_posix(), "night": p["night"],
        "expid": p["expid"], "setup": p["setup"].name, "setup_key": str(t["setup_key"]),
        "n_standards": p["n_standards"], "wavelength_format": p["wavelength_format"],
        "wavelength_unit": p["wavelength_unit"], "medium": p["medium"],
        "position_only": int(np.sum(p["position_only"])), "dead_fiber": p["dead_fiber"],
        "mjd": p["mjd"], "exptime": p["exptime"], "airmass": float(t["airmass"]),
        "pwv": float(t["pwv"]), "lsf_scale": float(t["lsf_scale"]),
        "std_source": [str(v) for v in t["std_source"]],
        "photometric": bool(conditions.get("photometric", False)),
        "transparency": float(t["transparency"]),
        **({"seeing": float(t["seeing"])} if "seeing" in t else {}),
    }
    if options["xp"]:
        entry["xp_rows"] = xp_rows(t, sim.catalog)
    return entry, sim.catalog


def _night_options(rng, nights, options, chromatic):
    """Photometric nights and the nights' median seeing, in place (their own stream)."""
    for night in nights:
        photometric = bool(rng.random() < options["photometric_nights"])
        seeing = float(rng.uniform(*_SEEING_NIGHT))
        if photometric:
            night.update(photometric=True, transparency_range=_PHOTOMETRIC_TRANSPARENCY)
        if chromatic:
            night["seeing"] = seeing
