"""Physical constants and instrument/catalog facts, each with its source.

Numbers that are facts of physics, of a photometric system or of the formats contract live
here and nowhere else.
"""

from __future__ import annotations

import math

#: Speed of light, km/s (exact, SI definition of the metre).
SPEED_OF_LIGHT_KMS = 299792.458
#: Speed of light, Angstrom/s.
SPEED_OF_LIGHT_AAS = SPEED_OF_LIGHT_KMS * 1e13

#: AB magnitude reference flux density, erg/s/cm^2/Hz: 3631 Jy (Oke & Gunn 1983, ApJ 266, 713;
#: the value speclite uses).
AB_REFERENCE_FNU = 3631.0e-23

#: FWHM of a Gaussian in units of its sigma, 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Wavelength unit of the FWHMPCk polynomial: FWHM(lambda) = sum_k FWHMPCk (lambda / 10000 A)^k
#: (formats contract, section 1).
LSF_REFERENCE_WAVELENGTH = 10000.0

#: Step (Angstrom) to which an instrument configuration's wavelength range is rounded in its
#: key (:func:`kspec_fluxcal.exposure.configuration_key`): wide enough that the drift of one
#: spectrograph's arc solution (~1-5 A between exposures) keeps its key, narrow enough that
#: another grating angle gets its own. A range whose end lies within the drift of a multiple
#: of 50 A may split one configuration in two.
CONFIGURATION_STEP = 100.0

#: Flux-density unit of calibrated products (formats contract, section 4).
FLUX_UNIT = "1e-17 erg/(s cm2 Angstrom)"
#: erg/s/cm^2/A per unit of FLUX_UNIT.
FLUX_UNIT_SCALE = 1e-17
#: Unit of a calibration factor: flux unit per count.
CAL_UNIT = "1e-17 erg/(s cm2 Angstrom) / count"

#: Fiber TYPE letters of the FIBRES table (formats contract, section 1).
FIBER_TYPES = {
    "P": "program target",
    "S": "sky",
    "C": "spectrophotometric standard star",
    "U": "unallocated",
    "N": "not in use",
    "F": "fiducial",
    "D": "dead",
}
#: TYPE letter of standard-star fibers.
STANDARD_TYPE = "C"

#: Radius for matching standard-star fibers to the catalog by position, arcsec (contract §1).
POSITION_MATCH_ARCSEC = 2.0

#: Catalog sentinels: a magnitude >= 99 or an error >= 9.9 means "not measured" (contract §2).
MAG_SENTINEL = 99.0
MAG_ERR_SENTINEL = 9.9

#: Photometric bands we use, by speclite filter name, in order of effective wavelength.
BANDS = (
    "panstarrs-g",
    "gaiadr2-BP",
    "panstarrs-r",
    "gaiadr2-G",
    "panstarrs-i",
    "gaiadr2-RP",
    "panstarrs-z",
    "panstarrs-y",
    "twomass-J",
    "twomass-H",
    "twomass-Ks",
)

#: Refcat2 catalog columns (magnitude, error) of each band (contract §2). PS1 y is not in
#: Refcat2 but is a supported band of the template grid.
CATALOG_COLUMNS = {
    "gaiadr2-G": ("Gaia", "dGaia"),
    "gaiadr2-BP": ("BP", "dBP"),
    "gaiadr2-RP": ("RP", "dRP"),
    "panstarrs-g": ("g", "dg"),
    "panstarrs-r": ("r", "dr"),
    "panstarrs-i": ("i", "di"),
    "panstarrs-z": ("z", "dz"),
    "twomass-J": ("J", "dJ"),
    "twomass-H": ("H", "dH"),
    "twomass-Ks": ("K", "dK"),
}

#: Vega-to-AB offsets, m_AB = m_Vega + offset (formats contract, section 2): Gaia DR2 from the
#: differences of the DR2 AB and Vega zero points (Evans et al. 2018, as revised on the Gaia DR2
#: documentation pages); 2MASS from Blanton & Roweis 2007, AJ 133, 734. Pan-STARRS1 is AB.
VEGA_TO_AB = {
    "gaiadr2-G": 0.1020,
    "gaiadr2-BP": 0.0292,
    "gaiadr2-RP": 0.3542,
    "twomass-J": 0.91,
    "twomass-H": 1.39,
    "twomass-Ks": 1.85,
}

#: Extinction-to-reddening ratios used to turn the catalog's extinction estimates into an
#: E(B-V) prior: A_G/E(B-V) = 2.740 for Gaia DR2 G (Casagrande & VandenBerg 2018, MNRAS 479,
#: L102) and A_g/E(B-V) = 3.172 for PS1 g (Schlafly & Finkbeiner 2011, ApJ 737, 103, Table 6,
#: R_V = 3.1).
A_GAIA_G_PER_EBV = 2.740
A_PS1_G_PER_EBV = 3.172

#: Ratio of total to selective extinction of the diffuse Milky Way ISM (Cardelli et al. 1989;
#: Fitzpatrick 1999).
DEFAULT_RV = 3.1

#: E(B-V) at which a template's band extinction coefficients A_b / E(B-V) are measured, and
#: a second one for their slope with E(B-V). A_b / E(B-V) falls as E(B-V) grows (reddening
#: shifts a band's photon-weighted mean wavelength to the red, where the law is lower: by
#: 0.023 mag in Gaia G at E(B-V) = 0.3 against the value at 0.05, 0.04 mag at 0.4);
#: A_b(E) = E (c + s (E - E0)), c measured at E0 and the slope s from E1, is within 2 mmag of
#: the exact band extinction up to E(B-V) = 0.6 (8 mmag at 0.8, 0.02 mag at 1; F99 and CCM89,
#: 4500-5800 K, the package's bands).
EBV_REFERENCE = 0.05
EBV_SLOPE_REFERENCE = 0.5

#: BOSZ 2024 wavelengths are in air above this wavelength and in vacuum below (contract §3;
#: Meszaros et al. 2024, A&A 688, A197).
BOSZ_AIR_ABOVE = 2000.0

#: Marker file written into a CK04 grid converted to the BOSZ layout
#: (:func:`kspec_fluxcal.sim.ck04.convert_ck04`; the spectra files have no header).
CK04_MARKER = "CK04_GRID.txt"

#: Resolution tags of BOSZ 2024 and their resolving power; 'rorig' is the native sampling,
#: taken as R = 300000 (Meszaros et al. 2024, section 2).
BOSZ_RESOLUTIONS = {
    "r500": 500.0,
    "r1000": 1000.0,
    "r2000": 2000.0,
    "r5000": 5000.0,
    "r10000": 10000.0,
    "r20000": 20000.0,
    "r50000": 50000.0,
    "rorig": 300000.0,
}

#: Colour excess per unit E(B-V): E(BP-RP) = (3.374 - 2.035) E(B-V) for Gaia DR2 (Casagrande
#: & VandenBerg 2018, MNRAS 479, L102) and E(g-r) = (3.172 - 2.271) E(B-V) for PS1
#: (Schlafly & Finkbeiner 2011, ApJ 737, 103, Table 6, R_V = 3.1).
COLOUR_EXCESS_PER_EBV = {"bp_rp": 1.339, "g_r": 0.901}

# ----------------------------------------------------------------------------- stars, Gaia
#: Nominal solar mass parameter G M_sun, cm^3 s^-2 (IAU 2015 Resolution B3:
#: 1.3271244e20 m^3 s^-2).
GM_SUN = 1.3271244e26
#: Nominal solar radius, cm (IAU 2015 Resolution B3: 6.957e8 m).
R_SUN = 6.957e10
#: Astronomical unit, cm (IAU 2012 Resolution B2, exact), and the parsec, 648000/pi au
#: (IAU 2015 Resolution B2), cm.
AU = 1.495978707e13
PARSEC = 648000.0 / math.pi * AU
#: Stefan-Boltzmann constant, erg/s/cm^2/K^4 (CODATA 2018, exact from h, k and c).
STEFAN_BOLTZMANN = 5.670374419e-5
#: Global zero point of Gaia DR2 parallaxes, mas: catalogue parallax minus true parallax,
#: from quasars (Lindegren et al. 2018, A&A 616, A2, section 5.2).
GAIA_DR2_PARALLAX_ZERO_POINT = -0.029
#: Median Gaia DR2 parallax uncertainty against G, (G, mas): 0.04 mas for G < 14, 0.1 mas at
#: G = 17 and 0.7 mas at G = 20 (Lindegren et al. 2018, A&A 616, A2, abstract); interpolate
#: log-linearly in between.
GAIA_DR2_PARALLAX_ERROR = ((14.0, 0.04), (17.0, 0.1), (20.0, 0.7))
#: Mass of spectrophotometric standards, Msun (mean, sigma), for log g from a parallax: F/G
#: dwarfs, turnoff stars and metal-poor subdwarfs span ~0.7-1.4 Msun (e.g. Casagrande et al.
#: 2011, A&A 530, A138, Geneva-Copenhagen survey masses).
STANDARD_MASS_PRIOR = (1.0, 0.3)
#: Smallest parallax signal-to-noise for which a log g from the parallax is reported
#: (FCALSTAR LOGG_PARALLAX; below it the inverse parallax is a biased distance). The fit
#: uses every parallax, compared in parallax space.
MIN_PARALLAX_SNR = 5.0

#: Wavelength the fibers are positioned (guided) at, Angstrom: a guider's r band (nominal; not
#: K-SPEC's measured value). The shape of the survey model's refraction term.
GUIDE_WAVELENGTH = 6000.0

#: A standard's pixel whose residual about its final model exceeds this many sigmas (noise,
#: model error and line mismatch in quadrature) is masked and the star fitted again: a cosmic
#: ray or hot pixel the reduction left (one pixel at 1.5 times its neighbours moved a
#: one-standard calibration by 1 % over 250 A; at 1000 times it lost the star). Gaussian noise
#: exceeds 8 sigma once in ~10^15 pixels; template mismatch is in the model and line errors.
PIXEL_OUTLIER_SIGMA = 8.0
#: Fraction of the header's line-spread width below which no star's line spread is taken to
#: be, for the spike test before the fit (:func:`kspec_fluxcal.fit.inputs.spike_pixels`): a
#: pixel brighter than any spectrum seen through a line spread this narrow can make it is
#: not light from the star (the fitted widths stay within a few per cent of the header's).
SPIKE_LSF_MARGIN = 0.7
#: A standard's pixel whose variance is below this fraction of its fiber's median variance
#: is masked before the fit: a noise 100 times below the fiber's typical one is no
#: measurement (photon, sky and read noise do not vanish in one pixel), and its weight would
#: rule the fit (one pixel of variance 1e-20 raised a star's model error from 0.6 to 3.4 %
#: and moved the calibration by 2.6 %).
MIN_VARIANCE_FRACTION = 1e-4
#: Fits of an exposure's standards at most, masking such pixels between them (one pass more
#: only where a pixel was masked).
PIXEL_OUTLIER_PASSES = 3

#: Planck constant times the speed of light, erg Angstrom (h exact since the 2019 SI).
HC_ERG_AA = 6.62607015e-27 * SPEED_OF_LIGHT_AAS
#: Nominal collecting area of the K-SPEC telescope, cm^2: a 1.6 m primary with a quarter of
#: its area lost to the central obstruction. A nominal number (the simulator's), not a
#: measured one: set the real value in the configuration ([instrument] collecting_area).
KSPEC_COLLECTING_AREA_CM2 = math.pi * 80.0**2 * 0.75

# ----------------------------------------------------------------------------- Gaia XP
#: Resolving power lambda / FWHM adopted for Gaia DR3 BP/RP (XP) spectra. Their line spread
#: varies along each spectrum and between the two instruments: R ~ 30-100 over 330-1050 nm
#: (Carrasco et al. 2021, A&A 652, A86, section 2; De Angeli et al. 2023, A&A 674, A2,
#: section 2). One mid value is adopted: at the scales XP constrains (hundreds of Angstrom)
#: the exact width matters only near strong lines (Balmer), which the comparison sees smoothed
#: either way.
XP_RESOLVING_POWER = 50.0
#: GaiaXPy's default sampling of calibrated (absolute) XP spectra, nm in vacuum:
#: ``numpy.arange(336, 1021, 2)``, 343 points (GaiaXPy documentation, ``calibrate``).
XP_DEFAULT_SAMPLING_NM = (336.0, 1020.0, 2.0)
#: W m^-2 nm^-1 (GaiaXPy's flux unit) in erg s^-1 cm^-2 Angstrom^-1: 1e7 erg/s per W,
#: 1e-4 m^2 per cm^2, 10 Angstrom per nm.
XP_FLUX_TO_CGS = 100.0
#: Samples per independent number in a sampled XP spectrum: DR3 XP spectra are 55 BP + 55 RP
#: coefficients (De Angeli et al. 2023, section 3), sampled by GaiaXPy on 343 points, so
#: neighbouring samples are strongly correlated; treating the samples as independent would
#: overcount the information ~343 / 110 = 3.1 times. XP errors are inflated by the square root.
XP_SAMPLES_PER_COEFFICIENT = 343.0 / 110.0
#: Published accuracy of XP spectra against ground-based spectrophotometric libraries after
#: the known systematics are corrected: ~1 % redward of 400 nm, < 2 % at 336-400 nm (Huang et
#: al. 2024, ApJS 271, 13). The corrections themselves are not available here (offline):
#: kspec-fluxcal applies none, and takes these as the XP systematic floor's defaults.
XP_SYSTEMATIC_RED = 0.01
XP_SYSTEMATIC_BLUE = 0.02
#: Boundary between the two floors, nm (vacuum; Huang et al. 2024).
XP_BLUE_EDGE_NM = 400.0


#: Primary-header keywords of calibrated products, by the attribute that carries them:
#: (keyword, type, comment). FCALNSTR and FCALRMS are the contract's (with FLUXCAL and
#: FCALVER); the others are ours, documented in the README. A float that is not available
#: (NaN) is written as -1; an attr that is None (a check that measured nothing: FCALSP*) is
#: not written.
CALIBRATION_KEYWORDS = {
    "fcalnstr": ("FCALNSTR", int, "standard stars used"),
    "fcalrms": ("FCALRMS", float, "fractional rms between standards (-1: n/a)"),
    "fcalsrc": ("FCALSRC", str, "origin of the calibration"),
    "fcalqual": ("FCALQUAL", str, "quality grade A (best) to D (see README)"),
    "fcalmerr": ("FCALMERR", float, "median model error of standards used (-1: n/a)"),
    "fcallerr": ("FCALLERR", float, "fractional error of the level (all pixels)"),
    "fcallsf": ("FCALLSF", float, "stars' LSF width / header FWHM (fitted)"),
    "fcalunsl": ("FCALUNSL", int, "pixels without a wavelength solution (NaN)"),
    "fcalo2": ("FCALO2", float, "telluric O2 column, airmasses (fitted; -1: n/a)"),
    "fcalh2o": ("FCALH2O", float, "telluric H2O column, ref. columns (-1: n/a)"),
    "fcal2nd": ("FCAL2ND", float, "second-order ratio removed (README)"),
    "fcal2blz": ("FCAL2BLZ", float, "its grating blaze, A (0: constant ratio)"),
    "model_id": ("FCALMOD", str, "survey model used (FCALSRC with 'model')"),
    "sphot_g": ("FCALSPG", float, "median synthetic - catalog g, program stars"),
    "sphot_r": ("FCALSPR", float, "median synthetic - catalog r, program stars"),
    "sphot_i": ("FCALSPI", float, "median synthetic - catalog i, program stars"),
    "sphot_scatter": ("FCALSPS", float, "rms scatter of synthetic - catalog, mag"),
    "sphot_n": ("FCALSPN", int, "program stars in the spectrophotometric check"),
}

