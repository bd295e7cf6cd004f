"""One simulated exposure: its RED file, its catalog rows and the truth behind them.

Everything is written in exactly the formats of the contract (``formats.md``): RED files
(section 1), the ATLAS Refcat2 CSV catalog (section 2), with a BOSZ-layout template grid
(section 3) as the default source of the stellar spectra. The truth of every exposure is saved
next to it, so that tests, the demo and the accuracy benchmark can compare a calibration with
what it should have returned. Every number is drawn from the exposure's seed.

Model of one exposure
---------------------
Wavelengths are in Angstrom, in air; flux densities in units of 1e-17 erg/s/cm2/A
(:data:`~kspec_fluxcal.constants.FLUX_UNIT_SCALE`).

1. *Stars* come from a star source (:mod:`kspec_fluxcal.sim.star_sources`): BOSZ-layout spectra
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
   ``source_sharper`` records on which fraction of the pixels, and a
   :class:`~kspec_fluxcal.errors.FluxCalWarning` says so): the flux above the atmosphere
   that a perfect calibration returns for a fiber with no aperture loss.
4. The *response* (counts per pixel per flux unit) is exposure time x collecting area x
   transparency x instrument throughput x atmospheric transmission 10^(-0.4 k(lambda) X)
   x telluric transmission x pixel width x lambda / (h c). Fibers lose a grey fraction of a
   point source's light (``aperture``, 0.85-0.95, independent per fiber), so
   ``counts_noiseless = true_flux * response * aperture[:, None]`` exactly (on the common
   grid; ``aperture_chromatic`` in place of ``aperture[:, None]`` with chromatic losses).
   The written counts follow each fiber's own pixels and line spread: their noiseless
   signal is ``true_flux_fiber * response_fiber * aperture[:, None]`` (with chromatic
   losses, ``aperture_chromatic``, on the common grid, to ~1e-4 on the fiber's pixels).
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
unknown to the pipeline), x each fiber's own scale (``fiber_lsf_scatter``), of the profile
``lsf_shape`` (a Gaussian, or a round fiber's image blurred by the camera, with the same
FWHM), and optionally integrated over the pixel (``pixel_integration``: a one-pixel box on
top). Stars, sky lines and tellurics all go through the true LSF; the default is the header's.
Each fiber's written wavelengths are where its light falls, unless ``arc_error`` gives every
fiber's solution an error of its own (a shift and a tilt, a few tenths of a pixel).

Second order (``second_order`` = r > 0; default 0, none). Without an order-sorting filter a
grating puts the light of lambda / 2 in second order on the pixel of lambda: from 2 x the
setup's blue end redward (7000 A on the IsoPlane setup). The pixel at lambda, of width
d lambda, then also receives r x the photons its fiber gets at lambda / 2 over d lambda / 2
(twice the dispersion in second order halves the contamination of a continuum; e.g. HST
FOS's L15 calibration notes it), through the same telescope, atmosphere, fiber aperture and
end-to-end throughput at lambda / 2, seen through the same line spread in pixels (a FWHM of
FWHM(lambda) / 2 Angstrom at lambda / 2); r is the second- to first-order efficiency ratio
at lambda / 2, a constant. Light bluer than the setup's blue end counts for nothing (the
simulator models sources, throughput and extinction over the setup's range; the atmosphere
cuts off near 3200 A, so a real spectrograph would see some light from 6400 A redward).
Stars, galaxies, quasars, sky: every fiber; the sky's second order adds only noise (sky
subtraction removes it, as sky fibers see it too). Its Poisson counts come from a stream of
their own and the standards' magnitudes follow their first-order S/N: every other random
draw is the same with or without (the variance includes the second order's counts). r is
one constant, a nominal value (it is measured per grating, e.g. 0.226 for HUT's far-UV
grating): a grating blazed in first order at lambda_b is blazed at lambda_b / 2 in second
order, so the real ratio climbs toward the octave's blue end, where a constant few per cent
is a lower bound. With ``second_order_blaze`` = lambda_b the ratio follows scalar theory
instead: r x E_2(lambda / 2) / E_1(lambda / 2), E_m(mu) = sinc^2(pi (m - lambda_b / mu))
(Littrow; Palmer & Loewen's scalar blaze function), which is r x ((lambda_b - mu) /
(2 mu - lambda_b))^2 at mu = lambda / 2; r is then a scale (1: scalar theory). At
lambda_b = 5000 A and r = 1: 0.56 at 7000 A, 0.25 at 7500 A, 0.11 at 8000 A, 0.05 at
8500 A. The simulator assumes no order-sorting filter. The ratio's law is shared with the
pipeline, which can remove the light again (``[instrument] second_order``,
:mod:`kspec_fluxcal.second_order`).

The tellurics are the package's telluric line list (:mod:`kspec_fluxcal.telluric`) at high
resolution, in the five regions of the ``telluric_default`` mask: Beer's law in the O2
(airmass) and H2O (airmass x ``pwv``) columns, line strengths that follow the night's
``temperature`` through each line's lower-state energy, water widths that change per exposure
(``water_width``), the transmission convolved with each fiber's true line spread. The
pipeline models them with two columns and fixed optical depths: a different form, as the real
atmosphere's would be. The water column (``pwv``) is drawn per exposure, so it changes within
a night; airmass 1-2 (other ranges: the conditions' ``airmass_range`` and ``pwv_range``).

Optional FIBRES column ``LSF_SCALE`` (float; written when ``fiber_lsf_scatter`` > 0): the
FWHM of this fiber's line-spread function over the header's FWHM (FWHMPCk), as arc lines
would measure it. The stars' true FWHM is that times the exposure's ``lsf_scale``.

Truth file (``truth/<EXPID>.npz``)
----------------------------------
``wavelength`` (npix; air, Angstrom: the grid ``open_exposure`` returns), ``true_flux``,
``counts_noiseless``, ``sky_counts`` (fiber, wavelength), ``response``, ``throughput``,
``atmosphere``, ``telluric`` (wavelength), ``aperture``, ``fiber_kind``, ``redshift`` (fiber);
per-fiber wavelength solutions: ``fiber_wavelength`` (fiber, pixel; air, each fiber's own
pixel centres), ``true_flux_fiber`` (the truth on them; equal to the common-grid ones for 1-D
files) and ``response_fiber`` (the response on them, with each fiber's own telluric
transmission and pixel widths); per standard star ``std_fiber, std_objid, std_position_only``
(OBJID -1 in FIBRES), ``std_teff, std_logg, std_feh, std_alpha`` (NaN where the source does
not know them), ``std_rv`` (km/s; the star's total, NaN when its own is unknown, as for
CALSPEC) and ``std_rv_extra`` (the applied shift), ``std_ebv`` (reference + extra),
``std_ebv_extra`` (applied by the simulator) and ``std_ebv_reference`` (already in the
source's spectrum, CALSPEC's), ``std_snr`` (median S/N per pixel of the written counts, before
any resampling by the reader), ``std_gmag`` (Gaia G, Vega, noiseless), ``std_dilution``
((R/D)^2), ``std_mag`` (star, band; AB, noiseless, over ``bands``), ``std_source`` (the
source's label, e.g. ``grid:synthetic``, ``model:B``, ``calspec``), ``std_name`` (CALSPEC
name, else ''), ``std_mass`` (M_sun), ``std_radius`` (R_sun), ``std_plx`` (true parallax,
mas); ``bands`` (the band names of ``std_mag``); ``fiber_lsf_scale`` (fiber); scalars
``airmass, exptime, mjd, transparency, photometric, pwv, aerosol, temperature`` (the
atmosphere's, K), ``water_width`` (the water lines' width factor), ``night, expid, setup,
setup_key, wavelength_format, wavelength_unit, medium, lsf_scale, pixel_integration,
field_source, source_sharper``; only when not the defaults, ``lsf_shape`` and
``arc_error`` (fiber, pixel: the written minus the true wavelength, Angstrom, air; the
truth's ``fiber_wavelength`` are the true ones), and with ``second_order``, ``second_order``
(r), ``second_order_blaze`` (when given) and ``second_order_counts`` (fiber, pixel: the
targets' noiseless second-order counts on each fiber's pixels, in the written counts but in
neither ``counts_noiseless`` nor ``true_flux``; the second order's sky is subtracted like
the first's). Dead fibers have NaN
``true_flux``, ``true_flux_fiber``, ``counts_noiseless`` (and ``second_order_counts``).
With ``xp``: ``xp_wavelength_nm`` (the sampling, vacuum) and per standard ``std_xp_flux``,
``std_xp_flux_error`` (what the table holds), ``std_xp_systematic`` (the multiplicative
systematic applied) and ``std_xp_true`` (noiseless, without the systematic), W m^-2 nm^-1.
``aperture_expected`` (wavelength): the aperture a calibration from many standards refers
to (the mean grey loss; with chromatic losses, the point-source loss averaged over
positioning offsets at the exposure's seeing and airmass). With ``chromatic_losses``:
``aperture_chromatic`` (fiber, wavelength: each fiber's point-source aperture,
``aperture`` then being its median), ``seeing`` (arcsec FWHM at 5000 A, also in the header
SEEING), ``fiber_offset`` (fiber, 2: positioning offsets, arcsec, x along the parallactic
direction) and ``dar_residual`` (the fraction of the differential refraction left).

Chromatic losses (``chromatic_losses``): a point source's image (Gaussian, FWHM the seeing
x (lambda / 5000 A)^-1/5) sits at the fiber's positioning offset plus the differential
refraction from 6000 A (Filippenko 1982), a quarter of it left by a dispersion corrector;
the fiber (3 arcsec) collects the part inside it (:mod:`kspec_fluxcal.sim.fiber_losses`). The
standards' calibration then carries their own chromatic losses, which differ from each
science fiber's.

The steps live in the modules of the kit: conditions (:mod:`~kspec_fluxcal.sim.conditions`),
pixels and line spread (:mod:`~kspec_fluxcal.sim.optics`), targets
(:mod:`~kspec_fluxcal.sim.targets`), counts (:mod:`~kspec_fluxcal.sim.counts`), the catalog
and FIBRES (:mod:`~kspec_fluxcal.sim.refcat`) and Gaia XP (:mod:`~kspec_fluxcal.sim.xp_spectra`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits

from ..constants import BANDS
from ..errors import FluxCalWarning
from ..exposure import red_hdulist, setup_key
from ..grid import PARAMS
from ..wavelength import air_to_vacuum
from .conditions import _DAR_RESIDUAL, _exposure_conditions
from .counts import _expose, _light, _throughput
from .optics import _pixels, _second_order, _true_lsfs
from .refcat import _P_POSITION_ONLY, _catalog
from .setups import DEFAULT_SETUP, Setup, _as_setup
from .star_sources import GridStars
from .targets import _plan_fibers, _std_column, _targets
from .xp_spectra import _add_source_ids, _standard_xp

__all__ = ["SimulatedExposure", "simulate_exposure"]

class SimulatedExposure(NamedTuple):
    """What :func:`simulate_exposure` returns."""

    #: The RED file as an HDU list (formats contract section 1).
    hdulist: fits.HDUList
    #: The truth, as written to ``truth/<EXPID>.npz`` (see the module docstring).
    truth: dict
    #: Catalog rows: dicts of Refcat2 column to text (:data:`CATALOG_HEADER`), plus '_role'
    #: ('standard', 'star' or 'decoy') and '_fiber' (-1 for decoys), which are not written.
    catalog: list


def simulate_exposure(rng, stars, *, setup=None, n_standards=2, wavelength_format="wavela",
                      wavelength_unit="Angstrom", medium="air", position_only=None,
                      dead_fiber=False, snr_range=(30.0, 150.0), airmass=None, exptime=None,
                      mjd=61345.4583, night="20261101", expid="KS20261101_0001",
                      conditions=None, field=None, standard_source=None, lsf_scale=1.0,
                      pixel_integration=False, fiber_lsf_scatter=0.0, xp=False,
                      chromatic_losses=False, lsf_shape="gaussian", arc_error=0.0,
                      second_order=0.0, second_order_blaze=None):
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
        Default: uniform in 1.0-2.0 (or the conditions' ``airmass_range``) and 600-1800 s.
    mjd : float
        MJD at the start of the exposure.
    night, expid : str
        Night (YYYYMMDD) and exposure id (EXPID).
    conditions : dict, optional
        Night-level conditions, drawn when absent: ``aerosol`` (mag/airmass at 1 um),
        ``drift`` (grey, tilt throughput drift), ``moon`` (sky brightening factor),
        ``transparency_range`` (of the exposures' transparency; default 0.8-1.0),
        ``airmass_range`` and ``pwv_range`` (default 1.0-2.0 and 0.4-2.5), ``seeing`` (the
        night's median, with ``chromatic_losses``); exposure-level: ``pwv`` (water factor,
        1: the telluric line list's reference column), ``transparency``.
    field : (float, float), optional
        Field centre RA, Dec in degrees (default random).
    standard_source : star source or path-like, optional
        Where the standard stars come from (:mod:`kspec_fluxcal.sim.star_sources`: a grid, the model
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
        (:mod:`kspec_fluxcal.sim.fiber_losses`): per fiber and wavelength, from the exposure's
        seeing (header SEEING), airmass and each fiber's positioning offset; the grey draw
        stays as the fiber's other losses. False: grey losses only.
    lsf_shape : {'gaussian', 'fiber'}
        Profile of the true line spread, with the FWHM above: a Gaussian, or the image of a
        round fiber (a semicircle 1.1 x the FWHM across) blurred by the camera's Gaussian
        (:mod:`~kspec_fluxcal.sim.optics`). The header's FWHMPCk stay the Gaussian's.
    arc_error : float
        rms (pixels, over fibers and pixels) of each fiber's wavelength-solution error: the
        light of fiber f falls at its written wavelengths minus (s_f + t_f x) pixels, x from
        -1 to 1 across the detector, s_f and t_f normal with variances rms^2 / 2 and
        3 rms^2 / 2 (truth ``arc_error``, in Angstrom). Written solutions are unchanged:
        a 1-D WAVELA or a WCS is every fiber's, though each fiber's light now falls
        elsewhere. Drawn from a stream of its own: everything else is the same with or
        without (the stars' spectra to ~1e-4 at the window's edges).
    second_order : float
        Second- to first-order efficiency ratio r (0: none, the default): the pixel at
        lambda also gets r x the photons of lambda / 2 over half its width, for lambda / 2
        within the setup (module docstring). Every other random draw is the same with or
        without.
    second_order_blaze : float, optional
        The grating's first-order blaze wavelength lambda_b (Angstrom, below twice the
        setup's blue end): the ratio then follows scalar theory, ``second_order`` x
        E_2(lambda / 2) / E_1(lambda / 2) with E_m(lambda) = sinc^2(pi (m - lambda_b /
        lambda)), ``second_order`` a scale in (0, 1] (1: scalar theory). Default None: the
        constant ``second_order``.

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
    std_source = _standard_source(stars, standard_source)
    written = _Written(wavelength_format, wavelength_unit, medium, mjd, night, expid,
                       _check_options(setup, n_standards, wavelength_format, wavelength_unit,
                                      medium, snr_range))
    position_only = _position_only(rng, position_only, n_standards)
    cond, losses = _exposure_conditions(rng, conditions, airmass, exptime, field, setup.fibers,
                                        chromatic_losses)
    pixels = _pixels(rng, setup, wavelength_format, arc_error, aux)
    optics = _true_lsfs(aux, setup, lsf_scale, pixel_integration, fiber_lsf_scatter, lsf_shape)
    second = _second_order(pixels, optics, second_order, second_order_blaze)
    kinds = _plan_fibers(rng, setup.fibers, n_standards, dead_fiber)
    targets = _targets(rng, aux, stars, std_source, kinds, pixels, optics, second)
    if targets.sharper > 0:  # the standards' source (the field's without standards)
        label = (std_source if n_standards else stars).label
        warnings.warn(coarse_source_message(label, targets.sharper), FluxCalWarning,
                      stacklevel=2)
    light = _light(rng, cond, pixels, optics, losses, second)
    # The second order's noise: a stream of its own (the main one stays as without).
    counts = _expose(rng, targets, light, kinds, snr_range, cond["transparency"],
                     None if second is None else aux.spawn(1)[0])
    catalog, fibres = _catalog(rng, aux, stars, targets, kinds, position_only, cond["field"])
    if fiber_lsf_scatter > 0:
        fibres["LSF_SCALE"] = optics.fiber_scale
    if losses is not None:
        cond["seeing"] = losses.seeing
    hdulist = _red_file(counts, fibres, pixels, cond, written)
    parts = _Parts(setup, cond, losses, pixels, optics, kinds, targets, light, counts, catalog)
    truth = {**_truth_arrays(parts, position_only),
             **_truth_scalars(parts, written, conditions, pixel_integration, stars.label)}
    # Only when asked for: truth files of the defaults stay as they were.
    if lsf_shape != "gaussian":
        truth["lsf_shape"] = np.str_(lsf_shape)
    if arc_error > 0:
        truth["arc_error"] = pixels.written - pixels.rows
    if second is not None:
        truth["second_order"] = np.float64(second.ratio)
        if second.blaze is not None:
            truth["second_order_blaze"] = np.float64(second.blaze)
        truth["second_order_counts"] = counts.second
    if xp:
        # A stream of its own, spawned last: every other draw stays as without XP.
        truth.update(_standard_xp(rng.spawn(1)[0], std_source, targets))
        _add_source_ids(catalog.rows)
    return SimulatedExposure(hdulist, truth, catalog.rows)


#: How :func:`coarse_source_message` begins (a filter of ``warnings`` matches it).
COARSE_SOURCE = "the star source "


def coarse_source_message(label, sharper):
    """The warning of a star source coarser than the instrument on a fraction ``sharper`` of
    the pixels (its lines come out broader than the written line spread says)."""
    return (f"{COARSE_SOURCE}{label} is coarser than the instrument's line spread on "
            f"{100 * sharper:.0f}% of the pixels: there its spectra are sampled, not convolved, "
            "and their lines are broader than the header's FWHMPCk keywords say (truth "
            "source_sharper)")


class _Written(NamedTuple):
    """How an exposure's file is written and labelled."""

    wavelength_format: str  # 'wavela', 'wavela2d' or 'wcs'
    wavelength_unit: str
    medium: str  # of the written wavelengths: 'air' or 'vac'
    mjd: float
    night: str
    expid: str
    unit_factor: float  # Angstrom per written wavelength unit


class _Parts(NamedTuple):
    """What the steps of :func:`simulate_exposure` made, for its truth."""

    setup: Setup
    cond: dict
    losses: object  # conditions._Losses or None
    pixels: object  # optics._Pixels
    optics: object  # optics._Optics
    kinds: np.ndarray
    targets: object  # targets._Targets
    light: object  # counts._Light
    counts: object  # counts._Counts
    catalog: object  # refcat._Catalog


def _standard_source(stars, standard_source):
    """The source of the standard stars: ``standard_source`` (a directory is loaded as
    :class:`GridStars`), or the field's source ``stars`` when it is None."""
    if standard_source is None:
        return stars
    if isinstance(standard_source, (str, Path)):
        return GridStars(standard_source)
    return standard_source


def _position_only(rng, position_only, n_standards):
    """Per standard, whether it has OBJID -1 (matched by position): the given flags, or
    drawn (probability ``_P_POSITION_ONLY``) when None; a bool array (n_standards,)."""
    if position_only is None:
        position_only = rng.random(n_standards) < _P_POSITION_ONLY
    return np.broadcast_to(np.asarray(position_only, bool), (n_standards,))


def _truth_arrays(parts, position_only):
    """The truth's arrays: the spectra, response terms, apertures, fibers and the standards'
    entries (module docstring), in the order the truth file stores them."""
    pixels, targets, light, counts, losses = (parts.pixels, parts.targets, parts.light,
                                              parts.counts, parts.losses)
    return {
        "wavelength": pixels.base, "true_flux": targets.true_flux,
        "response": counts.response, "telluric": light.telluric,
        "atmosphere": light.atmosphere,
        "throughput": _throughput(pixels.base, parts.cond["drift"]),
        "aperture": light.aperture, "aperture_expected": light.expected,
        **({} if losses is None else {"aperture_chromatic": light.apertures[1],
                                      "seeing": np.float64(losses.seeing),
                                      "fiber_offset": losses.offsets,
                                      "dar_residual": np.float64(_DAR_RESIDUAL)}),
        "counts_noiseless": counts.noiseless,
        "sky_counts": light.sky_counts, "fiber_kind": parts.kinds.astype("<U8"),
        "redshift": targets.redshift, "fiber_wavelength": pixels.rows,
        "true_flux_fiber": targets.true_rows, "response_fiber": counts.response_fiber,
        **_standard_truth(targets, counts, parts.catalog, position_only),
        "bands": np.array(BANDS),
    }


def _truth_scalars(parts, written, conditions, pixel_integration, field_source):
    """The truth's scalars: conditions, labels, the setup and the line spread (module
    docstring), in the order the truth file stores them (after :func:`_truth_arrays`)."""
    cond, setup, optics = parts.cond, parts.setup, parts.optics
    return {
        **{k: np.float64(cond[k]) for k in ("airmass", "exptime", "pwv", "aerosol",
                                            "temperature", "water_width")},
        "transparency": np.float64(parts.counts.transparency),
        "photometric": np.bool_((conditions or {}).get("photometric", False)),
        "mjd": np.float64(written.mjd), "night": np.str_(written.night),
        "expid": np.str_(written.expid), "setup": np.str_(setup.name),
        "setup_key": np.str_(setup_key(parts.pixels.base, setup.lsf)),
        "wavelength_format": np.str_(written.wavelength_format),
        "wavelength_unit": np.str_(written.wavelength_unit), "medium": np.str_(written.medium),
        "lsf_scale": np.float64(optics.scale), "fiber_lsf_scale": optics.fiber_scale,
        "pixel_integration": np.bool_(pixel_integration),
        "field_source": np.str_(field_source),
        "source_sharper": np.float64(parts.targets.sharper),
    }


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


def _red_file(counts, fibres, pixels, cond, written):
    """The RED file: counts, variance, FIBRES, the header (nominal LSF) and WAVELA or WCS."""
    setup = pixels.setup
    wavelength_format, wavelength_unit, medium, mjd, night, expid, unit_factor = written
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
    header["SIMULATE"] = (True, "simulated by kspec_fluxcal.sim")
    wave_out, wave_header = None, None
    rows = air_to_vacuum(pixels.written) if medium == "vac" else pixels.written
    if wavelength_format == "wcs":
        header["CRVAL1"] = pixels.base[0] / unit_factor
        header["CDELT1"] = setup.dispersion / unit_factor
        header["CRPIX1"] = 1.0
        header["CUNIT1"] = wavelength_unit
        header["CTYPE1"] = "Wavelength"
    else:
        wave_out = (rows if pixels.written_2d else rows[0]) / unit_factor
        wave_header = {"BUNIT": wavelength_unit}
        if medium == "vac":
            # 1-D: the WAVELA header says it; 2-D: the primary header (both are contract).
            if pixels.written_2d:
                header["AIRORVAC"] = ("vac", "wavelength solution in vacuum")
            else:
                wave_header["AIRORVAC"] = "vac"
    return red_hdulist(counts.counts, counts.variance, fibres, header, wavelength=wave_out,
                       wavelength_header=wave_header)
