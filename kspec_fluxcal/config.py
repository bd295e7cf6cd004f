"""Configuration: a validated TOML file of options, with documented defaults.

The schema below is the single source of the options, their defaults, valid values and
documentation; ``configs/default.toml`` is generated from it (:meth:`Config.to_toml`) and a
test keeps the two identical.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._atomic import check_regular_file
from ._inputs import glob_problem
from .constants import (
    BANDS,
    CATALOG_COLUMNS,
    GUIDE_WAVELENGTH,
    KSPEC_COLLECTING_AREA_CM2,
    XP_SYSTEMATIC_BLUE,
    XP_SYSTEMATIC_RED,
)
from .errors import ConfigError

__all__ = ["Config", "load_config", "SCHEMA", "continuum_options", "second_order_options"]


#: Options of earlier versions, and what replaced them (a config written for one is told).
_REMOVED = {
    ("fit", "max_chi2_dof"): "stars are judged by their model error, not chi^2/dof; see "
                             "[fit] max_model_error (README, 'Star acceptance')",
}


@dataclass(frozen=True)
class Option:
    """One configuration option: default, type, valid values and documentation."""

    default: object
    doc: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None

    def validate(self, value, where, source):
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(source, where, f"expected {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            # TOML has nan and inf; every comparison with NaN is false, so no bound stops it.
            raise ConfigError(source, where, f"{value!r} is not a finite number")
        if kind is list:
            return self._validate_list(value, where, source)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(source, where, f"{value!r} is not one of "
                              f"{', '.join(map(repr, self.choices))}")
        if self.min is not None and value < self.min:
            raise ConfigError(source, where, f"{value!r} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ConfigError(source, where, f"{value!r} is above the maximum {self.max}")
        return value

    def _validate_list(self, value, where, source):
        """A list of strings, of the choices when there are any, each once (a band listed
        twice counted as two measurements)."""
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(source, where, f"expected a list of strings, got {value!r}")
        bad = [v for v in value if self.choices and v not in self.choices]
        if bad:
            raise ConfigError(source, where, f"invalid value(s) {bad!r}; valid: "
                              f"{', '.join(map(str, self.choices))}")
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ConfigError(source, where, f"{', '.join(repeated)} given more than once")
        return list(value)


SCHEMA = {
    "instrument": {
        "fwhm": Option(0.0, "Line-spread FWHM override, Angstrom, constant over the spectrum "
                       "(kspecdr's CALIBFLUX_FWHM); 0 = use the exposure's SPECFWHM/FWHMPCk.",
                       min=0.0, max=100.0),
        "collecting_area": Option(round(KSPEC_COLLECTING_AREA_CM2, 1),
                                  "Telescope collecting area, cm^2 (for the implied throughput "
                                  "of each standard).", min=1.0),
        "throughput_min": Option(0.02, "Lowest plausible end-to-end throughput (atmosphere, "
                                 "telescope, fiber, spectrograph, detector) at its peak.",
                                 min=0.0, max=1.0),
        "throughput_max": Option(0.6, "Highest plausible peak throughput.", min=0.0, max=1.0),
        "throughput_margin": Option(3.0, "A standard implying a throughput outside the range "
                                    "by up to this factor calibrates with grade D and a flag; "
                                    "beyond it, it is refused (its photometry is another "
                                    "star's?).", min=1.0),
        "second_order": Option(0.0, "Remove the grating's second order (no order-sorting "
                               "filter: lambda/2 on the pixel of lambda, from twice the "
                               "blue end): its second- to first-order efficiency ratio, "
                               "in [0, 1), as measured for the grating; with "
                               "second_order_blaze a scale of scalar theory's ratio in "
                               "(0, 1] (1: scalar theory). 0 = off (README, 'Second-order "
                               "light').", min=0.0, max=1.0),
        "second_order_blaze": Option(0.0, "The grating's first-order blaze wavelength, "
                                     "Angstrom, below twice the exposure's blue end: the "
                                     "ratio is then second_order x E2/E1 at lambda/2 "
                                     "(scalar theory); 0 = a constant ratio.", min=0.0),
    },
    "photometry": {
        "bands": Option([b for b in BANDS if b in CATALOG_COLUMNS],
                        "Catalog bands used to scale templates and fit reddening.",
                        choices=tuple(b for b in BANDS if b in CATALOG_COLUMNS)),
        "min_bands": Option(2, "A star needs at least this many valid bands.", min=1, max=10),
        "error_floor": Option(0.01, "Added in quadrature to catalog magnitude errors (zero-point "
                              "and filter-curve systematics), mag.", min=0.0, max=1.0),
        "outlier_sigma": Option(5.0, "A band is dropped when its residual exceeds this many "
                                "sigma ...", min=1.0),
        "outlier_mag": Option(0.1, "... and this many magnitudes.", min=0.0),
        "max_rms": Option(0.1, "Reject a star whose photometric residual rms exceeds this, mag.",
                          min=0.0),
    },
    "masks": {
        "telluric": Option("telluric_default", "Telluric regions (packaged name or file): masked "
                           "for template matching only, kept in calibration vectors."),
        "lines": Option("stellar_lines", "Stellar-line cores (packaged name or file): masked in "
                        "calibration vectors."),
        "extra": Option([], "More region files, masked everywhere."),
    },
    "continuum": {
        "method": Option("bspline", "Pseudo-continuum of observed and template spectra.",
                         choices=("bspline", "polynomial", "running_median")),
        "knot_spacing": Option(400.0, "B-spline interior knot spacing, Angstrom.", min=20.0),
        "degree": Option(3, "B-spline degree.", min=1, max=5),
        "poly_degree": Option(8, "Polynomial degree (method = 'polynomial'), in normalised "
                              "wavelength.", min=1, max=30),
        "window": Option(151, "Running-median window, pixels (method = 'running_median').",
                         min=5, max=1001),
        "sigma_low": Option(1.5, "Lower clipping threshold, sigma (rejects absorption lines).",
                            min=0.5),
        "sigma_high": Option(4.0, "Upper clipping threshold, sigma.", min=0.5),
        "iterations": Option(5, "Clipping iterations.", min=0, max=50),
    },
    "fit": {
        "metric": Option("chi2", "Template score: chi2, or huber (robust to sky residuals).",
                         choices=("chi2", "huber")),
        "huber_delta": Option(3.0, "Huber threshold, in sigma.", min=0.5),
        "correction_knots": Option(400.0, "Knot spacing (Angstrom) of the smooth multiplicative "
                                   "correction fitted with each template when scoring; 0 = a "
                                   "single amplitude.", min=0.0),
        "teff_window": Option(750.0, "Half width of the colour-Teff search window, K.", min=0.0),
        "rv_max": Option(500.0, "Radial-velocity search range, +/- km/s.", min=10.0, max=3000.0),
        "refine": Option(True, "Refine parameters between grid points (interpolation)."),
        "refine_starts": Option(2, "Refinements started from this many of the best grid points "
                                "(the best result is kept).", min=1, max=50),
        "alpha_extrapolation": Option(0.25, "How far [alpha/M] may be fitted above the "
                                      "grid's largest value, dex (linear in its two "
                                      "largest nodes; grids with one [alpha/M] keep it).",
                                      min=0.0, max=0.5),
        "alpha_prior": Option(0.3, "Width, dex, of a one-sided Gaussian prior on [alpha/M] "
                              "above the largest value the grid has at the star's [M/H] "
                              "(where the model is the [alpha/M] response of other "
                              "metallicities, or extrapolated); 0 = none.", min=0.0),
        "use_photometry": Option(True, "Choose template parameters with the photometric chi^2 "
                                 "of the scaled, reddened model added to the spectral one "
                                 "(breaks the Teff-[M/H]-log g degeneracy of the lines)."),
        "reddening": Option(True, "Fit E(B-V) with the flux scale (False: no reddening)."),
        "extinction_law": Option("F99", "Reddening law (R_V = 3.1); the grid stores each law's "
                                 "band coefficients.", choices=("F99", "CCM89")),
        "ebv_prior_sigma": Option(0.05, "Width of the Gaussian prior on E(B-V) around the "
                                  "catalog's extinction, mag (a star without one: around 0, "
                                  "0.1 mag wide); 0 = no prior for any star.", min=0.0),
        "ebv_max": Option(1.0, "Largest E(B-V) fitted, mag.", min=0.0, max=5.0),
        "lsf_prior": Option(0.05, "Width of the Gaussian prior, around 1, on the line-spread "
                            "width the standards show relative to the header's (real spectra "
                            "are a few per cent wider): a width the lines do not constrain "
                            "(templates coarser than the line spread) stays the header's.",
                            min=0.001, max=1.0),
        "spectral_dof": Option(10, "Weight of a star's spectrum against its photometry and "
                               "priors when choosing templates: the best spectral chi^2 counts "
                               "as this many independent measurements (template mismatch "
                               "makes pixel residuals correlated); 0 = the number of pixels.",
                               min=0),
        "warp_degree": Option(3, "Photometric warp of each standard's model: Legendre "
                              "polynomials of degree 1 up to this in 1/lambda, fitted with the "
                              "flux scale to all bands at the star's fitted E(B-V) (which the "
                              "warp leaves alone); 0 = no warp.", min=0, max=6),
        "warp_sigma": Option(0.03, "Prior width of each warp coefficient, mag: the warp stays "
                             "1 unless the bands ask for more.", min=0.001),
        "max_model_error": Option(0.1, "Reject a star whose model error (fractional per-pixel "
                                  "mismatch of its best model) is larger: not a star like the "
                                  "templates. Smaller mismatch only lowers the star's weight.",
                                  min=0.0),
        "line_error_scale": Option(2.0, "Weight of template lines in the calibration vectors: "
                                   "a line's model error is this many times the star's own "
                                   "line mismatch (rms residual per unit line depth; a fit's "
                                   "residuals understate its model's error) times the depth; "
                                   "0 = the floor below only (both 0: lines weighted by "
                                   "their noise only).", min=0.0),
        "line_error_floor": Option(0.75, "... and at least this times the depth (the lines of "
                                   "any grid are uncertain: oscillator strengths, damping, "
                                   "the line spread).", min=0.0),
        "min_snr": Option(5.0, "Reject a star with a lower median S/N per pixel.", min=0.0),
        "min_good_fraction": Option(0.5, "Reject a star with a smaller fraction of good pixels.",
                                    min=0.0, max=1.0),
    },
    "xp": {
        "xp_warp_degree": Option(24, "Photometric warp of a standard with a usable Gaia XP "
                                 "spectrum (--xp): Legendre degree in 1/lambda, fitted jointly "
                                 "to its bands and to XP / model at XP's resolution (XP "
                                 "resolves broad shapes the bands cannot); 0 = XP not used in "
                                 "the fit.", min=0, max=60),
        "level_tolerance": Option(0.05, "An XP spectrum is used only when its median ratio "
                                  "to the photometrically scaled model is within this of 1 "
                                  "(beyond: wrong units, another star, a bad spectrum; the "
                                  "star is flagged and calibrated without XP).",
                                  min=0.0, max=1.0),
        "systematic_red": Option(XP_SYSTEMATIC_RED, "XP systematic floor redward of 400 nm, "
                                 "fractional (published accuracy after corrections that are "
                                 "not applied here, Huang et al. 2024).", min=0.0, max=0.5),
        "systematic_blue": Option(XP_SYSTEMATIC_BLUE, "XP systematic floor at 336-400 nm, "
                                  "fractional.", min=0.0, max=0.5),
        "systematic_terms": Option(4, "The floor as a smooth error, correlated along the "
                                   "spectrum (XP's systematics are smooth): this many "
                                   "Legendre terms with the floor's rms, marginalised in the "
                                   "fit; 0 = added in quadrature to every sample "
                                   "(independent).", min=0, max=20),
    },
    "combine": {
        "method": Option("weighted_mean", "Combination of per-star vectors.",
                         choices=("weighted_mean", "median")),
        "sigma_clip": Option(3.0, "Per-wavelength clipping threshold, sigma.", min=1.0),
        "iterations": Option(5, "Clipping iterations.", min=0, max=50),
        "star_deviation": Option(0.05, "Reject a whole star whose vector's shape deviates from "
                                 "the others' by more than this (median fraction).", min=0.0),
        "star_level": Option(0.4, "... or whose grey level deviates by more than this (|ln "
                             "ratio|; fiber aperture losses make levels differ).", min=0.0),
        "aperture_scatter": Option(0.03, "Scatter of the standards' fiber aperture losses "
                                   "(fractional rms between fibers): the calibration's level "
                                   "is their mean's, uncertain by this over sqrt(standards) "
                                   "on top of their photometry (FCALLERR).", min=0.0, max=0.5),
        "smooth": Option(True, "Smooth the combined vector outside telluric bands (false: "
                                 "no telluric model either, which is fitted with the smooth "
                                 "response)."),
        "smooth_method": Option("bspline", "Smoothing: B-spline in ln(lambda) or Savitzky-Golay.",
                                choices=("bspline", "savgol")),
        "smooth_scale": Option(100.0, "Knot spacing (bspline) or window (savgol), Angstrom.",
                               min=5.0),
        "smooth_curvature": Option(0.01, "B-spline smoothing: prior rms of the response's "
                                   "second difference per knot, relative to its level: "
                                   "where the stars' vectors are weak (template lines "
                                   "weighted down, low S/N) the response stays smooth, where "
                                   "they are strong it follows them. 0.01 suits a smooth "
                                   "single-arm throughput (grating, CCD, coatings: the "
                                   "simulated one curves by 0.7 % rms per 100 A knot, 2 % at "
                                   "its dichroic-like dip); raise it for an instrument with "
                                   "sharp features (dichroic edges); 0 = no prior.", min=0.0),
    },
    "telluric": {
        "model": Option(True, "Model the O2 and H2O bands (two columns fitted from the "
                        "exposure's standards jointly, evaluated on each fiber's own pixels and "
                        "line spread); false: the standards' band absorption is copied."),
        "lines": Option("telluric_lines", "Telluric line list (packaged name or CSV file: "
                        "wavelength, species, ew, hwhm; see the README)."),
    },
    "survey": {
        "pattern": Option("**/*.fits", "Glob of RED files under the lake directory."),
        "fallback": Option(False, "Calibrate exposures without a usable standard that the "
                           "survey model cannot serve from the archive (nearest exposures of "
                           "the same setup, airmass not corrected); FCALSRC='archive'."),
        "fallback_window": Option(3.0, "Time window for the archive fallback, days.", min=0.0),
        "utc_offset": Option(9.0, "Site clock in hours from UT (Korea: 9), to name observing "
                             "nights in the archive (local date of the evening).",
                             min=-12.0, max=14.0),
    },
}


#: The chromatic terms the survey model can carry (kspec_fluxcal.survey.model.TERMS).
_MODEL_TERMS = ("seeing", "refraction")

def _night_prior(what, width=0.05):
    """A [model] option: the Gaussian prior width of a night's ``what`` (a curve or slope
    that deviates per night from the survey's)."""
    return Option(width, f"Prior width of a night's {what}.", min=0.001)

SCHEMA["model"] = {
    "enabled": Option(True, "Survey job: fit the survey-wide calibration model (throughput and "
                      "extinction per night, a grey factor per exposure, chromatic seeing "
                      "and refraction terms) from the exposures calibrated with their own "
                      "standards, then recalibrate with it: FCALSRC 'standards+model', or "
                      "'model' for exposures without usable standards (see the README). "
                      "False: every exposure alone."),
    "recalibrate": Option(True, "Combine each exposure's own standards with the model as a "
                          "prior, weighted by their uncertainties; false: the model only "
                          "calibrates exposures without usable standards."),
    "min_exposures": Option(8, "A setup's model needs this many exposures calibrated with "
                            "their own standards (fewer: no model for that setup).", min=2),
    "throughput_knots": Option(100.0, "Knot spacing of the throughput curves, Angstrom.",
                               min=20.0),
    "extinction_knots": Option(500.0, "Knot spacing of the extinction curves, Angstrom.",
                               min=50.0),
    "chromatic_knots": Option(1000.0, "Knot spacing of the chromatic terms, Angstrom.",
                              min=100.0),
    "terms": Option(list(_MODEL_TERMS), "Chromatic terms: seeing (header SEEING, arcsec "
                    "FWHM; an exposure without it takes the reference 1.5) and refraction "
                    "(tan^2 z = airmass^2 - 1).", choices=_MODEL_TERMS),
    "guide_wavelength": Option(GUIDE_WAVELENGTH, "Wavelength the fibers are positioned "
                               "(guided) at, Angstrom: the shape of the refraction term "
                               "(which is 1 at 4000 A: a guider redward of 4500 A).",
                               min=4500.0, max=11000.0),
    "refraction_sigma": Option(0.02, "Prior width of the refraction term's amplitude: the "
                               "light lost at 4000 A per unit tan^2 z, ln (~0.02: a star "
                               "displaced by the quarter of the differential refraction a "
                               "dispersion corrector leaves, 1.5\" seeing, 3\" fibers; "
                               "~0.3 without a corrector). Refraction and extinction differ "
                               "only in their curvature with airmass: a wide prior lets noise "
                               "trade one for the other.", min=0.001),
    "throughput_sigma": _night_prior("throughput deviation from the survey mean (ln)"),
    "extinction_sigma": _night_prior("extinction deviation from the survey mean, "
                                     "mag/airmass"),
    "grey_slope_sigma": _night_prior("grey extinction (slope of the grey factors against "
                                     "airmass) about the survey's, mag/airmass"),
    "star_shape_error": Option(0.01, "Starting shape error of one standard's calibration "
                               "(template mismatch), fractional; re-estimated from the "
                               "residuals.", min=0.0),
    "exposure_scatter": Option(0.005, "Starting scatter of the exposures' shapes about the "
                               "model, fractional; re-estimated from the residuals.", min=0.0),
    "huber": Option(2.0, "Exposures whose shape residual exceeds this many times the "
                    "expected count less (Huber weights); beyond 1.5 times it they are "
                    "outliers: flagged and left out of the fit.", min=1.0),
    "reweightings": Option(2, "Reweighting iterations of the fit (Huber weights and error "
                           "model from the residuals).", min=0, max=10),
    "batch": Option(64, "Exposures per statistics task (the leaves of the tree reduction).",
                    min=1),
    "photometric_scatter": Option(0.03, "A night whose grey factors scatter less than this "
                                  "(fractional) about their line against airmass, or than "
                                  "1.5 x [combine] aperture_scatter / sqrt(standards per "
                                  "exposure), is reported photometric.", min=0.0),
}


def continuum_options(config):
    """Keyword arguments of :func:`kspec_fluxcal.fit_continuum` from a configuration."""
    c = config.continuum
    return {"method": c.method, "knot_spacing": c.knot_spacing, "degree": c.degree,
            "poly_degree": c.poly_degree, "window": c.window, "sigma_low": c.sigma_low,
            "sigma_high": c.sigma_high, "iterations": c.iterations}


def second_order_options(config):
    """Keyword arguments of :func:`kspec_fluxcal.correct_second_order` from a configuration."""
    inst = config.instrument
    return {"ratio": inst.second_order, "blaze": inst.second_order_blaze}


class _Options(Mapping):
    """A read-only mapping over ``self._values`` whose keys are also attributes."""

    def __getitem__(self, key):
        return self._values[key]

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


class _Section(_Options):
    """The options of one section: ``config.fit.metric``."""

    def __init__(self, values):
        self._values = values

    def __repr__(self):
        return repr(self._values)


class Config(_Options):
    """Validated options, by section: ``config.fit.metric`` or ``config["fit"]["metric"]``.

    Parameters
    ----------
    values : mapping, optional
        ``{section: {option: value}}``; missing options take their defaults.
    source : str, optional
        Where the values came from (named in error messages).
    """

    def __init__(self, values=None, source=None):
        values = values or {}
        self.source = source
        unknown = [s for s in values if s not in SCHEMA]
        if unknown:
            raise ConfigError(source, f"section [{unknown[0]}]",
                              f"unknown section; valid sections: {', '.join(SCHEMA)}")
        merged = {}
        for section, options in SCHEMA.items():
            given = values.get(section, {})
            if not isinstance(given, Mapping):
                raise ConfigError(source, f"[{section}]", "must be a table of options")
            extra = [k for k in given if k not in options]
            if extra:
                why = _REMOVED.get((section, extra[0]))
                raise ConfigError(source, f"[{section}] {extra[0]}", f"removed: {why}" if why
                                  else f"unknown option; valid options: {', '.join(options)}")
            merged[section] = {
                name: opt.validate(given[name], f"[{section}] {name}", source)
                if name in given else (list(opt.default) if isinstance(opt.default, list)
                                       else opt.default)
                for name, opt in options.items()
            }
        _check_consistency(merged, source)
        self._values = merged

    def __getitem__(self, key):
        return _Section(self._values[key])

    def __eq__(self, other):
        return isinstance(other, Config) and self._values == other._values

    def __repr__(self):
        return f"Config({self._values!r})"

    def to_dict(self):
        """A plain nested dict of the values."""
        return {s: dict(o) for s, o in self._values.items()}

    def digest(self):
        """A short hash of every option's value (the archive's ``config_hash``)."""
        settings = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(settings.encode()).hexdigest()[:12]

    def changed(self):
        """The options whose value is not the default, as ``[section] name = value``."""
        defaults = _defaults()
        return [f"[{section}] {name} = {value!r}" for section, options in self._values.items()
                for name, value in options.items() if defaults[section][name] != value]

    def provenance(self):
        """One line for a product's HISTORY: where the options came from, their hash and
        those that differ from the defaults."""
        changed = self.changed()
        return (f"configuration {self.source or '(package defaults)'}, hash {self.digest()}: "
                + ("; ".join(changed) if changed else "every option at its default"))

    def replace(self, **options):
        """A copy with options changed, named ``section__option`` or by a unique name.

        ``config.replace(metric="huber", combine__smooth=False)``.
        """
        values = self.to_dict()
        for key, value in options.items():
            if "__" in key:
                section, name = key.split("__", 1)
            else:
                owners = [s for s, opts in SCHEMA.items() if key in opts]
                if len(owners) != 1:
                    valid = sorted({k for opts in SCHEMA.values() for k in opts})
                    problem = (f"ambiguous option (in {', '.join(owners)}); write section__{key}"
                               if owners else f"unknown option; valid: {', '.join(valid)}")
                    raise ConfigError(self.source, key, problem)
                section, name = owners[0], key
            if section not in values or name not in SCHEMA[section]:
                raise ConfigError(self.source, key, "unknown option")
            values[section][name] = value
        return Config(values, source=self.source)

    def to_toml(self):
        """The configuration as a documented TOML document."""
        lines = ["# kspec-fluxcal configuration. Every option is listed with its default;",
                 "# unknown sections or options are rejected.", ""]
        for section, options in SCHEMA.items():
            lines.append(f"[{section}]")
            for name, opt in options.items():
                doc = opt.doc
                if opt.choices and not isinstance(opt.default, list):
                    doc += f" Choices: {', '.join(map(str, opt.choices))}."
                lines.append(f"# {doc}")
                lines.append(f"{name} = {_toml_value(self._values[section][name])}")
            lines.append("")
        return "\n".join(lines)


@functools.cache
def _defaults():
    return Config()._values


def _check_consistency(values, source):
    """Checks across options, and of mask names, at load time rather than mid-calibration."""
    from .masks import load_regions

    phot = values["photometry"]
    if len(phot["bands"]) < phot["min_bands"]:
        raise ConfigError(source, "[photometry] bands",
                          f"{len(phot['bands'])} band(s) given but min_bands = "
                          f"{phot['min_bands']}: every star would be rejected")
    inst = values["instrument"]
    if not inst["throughput_min"] < inst["throughput_max"]:
        raise ConfigError(source, "[instrument] throughput_min",
                          f"{inst['throughput_min']} is not below throughput_max "
                          f"{inst['throughput_max']}")
    if inst["second_order_blaze"] and not inst["second_order"]:
        raise ConfigError(source, "[instrument] second_order",
                          f"0 with second_order_blaze = {inst['second_order_blaze']}: give "
                          "the scale of scalar theory's ratio (1: scalar theory), or set "
                          "second_order_blaze = 0 too to turn the correction off")
    if not inst["second_order_blaze"] and inst["second_order"] >= 1.0:
        raise ConfigError(source, "[instrument] second_order",
                          f"{inst['second_order']} is not a second- to first-order ratio "
                          "below 1 (a scale of 1 needs second_order_blaze)")
    if problem := glob_problem(values["survey"]["pattern"]):
        raise ConfigError(source, "[survey] pattern", f"{values['survey']['pattern']!r}: "
                          f"{problem}")
    from .telluric import telluric_lines

    try:
        telluric_lines(values["telluric"]["lines"])
    except ConfigError as err:
        place = f"{err.where}: " if err.where else ""
        raise ConfigError(source, "[telluric] lines",
                          f"{values['telluric']['lines']!r}: {place}{err.problem}") from None
    masks = values["masks"]
    for name, value in (("telluric", masks["telluric"]), ("lines", masks["lines"]),
                        *(("extra", v) for v in masks["extra"])):
        try:
            load_regions(value)
        except ConfigError as err:
            detail = err.problem if err.where is None else f"{err.where}: {err.problem}"
            raise ConfigError(source, f"[masks] {name}", f"{value!r}: {detail}") from None


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def load_config(path=None, **overrides):
    """Read a TOML configuration (defaults for what it omits) and apply overrides.

    Parameters
    ----------
    path : path-like, optional
        TOML file; None gives the defaults.
    **overrides
        Options as for :meth:`Config.replace`.

    Raises
    ------
    ConfigError
        Unreadable file, TOML syntax error, unknown section or option, wrong type or value.
    """
    if path is None:
        config = Config()
    else:
        path = os.fspath(path)
        check_regular_file(path, ConfigError)
        try:
            # TOML is UTF-8 whatever the locale; a byte-order mark (Windows editors write
            # one) made the first line 'Invalid statement'.
            values = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(path, None, f"unreadable ({err})") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(path, None, f"not valid TOML ({err})") from None
        config = Config(values, source=path)
    return config.replace(**overrides) if overrides else config
