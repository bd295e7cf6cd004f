"""Synthetic stellar spectra written in the BOSZ 2024 layout (formats contract, section 3).

The real BOSZ 2024 grid (Meszaros et al. 2024, A&A 688, A197) cannot be downloaded everywhere
(tests, CI, the demo), so this module makes a stand-in: a simple but physically sensible
stellar model, smooth in (Teff, log g, [M/H], [alpha/M]), written file for file in the BOSZ
layout. A marker file, :data:`SYNTHETIC_MARKER`, labels such a directory as synthetic, because
the spectra files themselves have no header.

The model, in the order it is built (all wavelengths in Angstrom, in air above 2000 A and in
vacuum below, as in BOSZ 2024):

1. Continuum: ``pi * B_lambda(T_lambda)``, a Planck function at a wavelength-dependent
   temperature given by the Eddington-Barbier relation in a grey atmosphere
   (``T^4(tau) = 3/4 Teff^4 (tau + 2/3)``, read at ``tau = 2/3 kbar / kappa_lambda``) with an
   H- (bound-free plus free-free) opacity shape. This puts the blue and the 1.6 um opacity
   window above the Planck curve, as in real models; metal bound-free opacity (a Mg I edge
   at 3757 A and a steep UV rise below ~2650 A, stronger in cool stars) pulls the UV below
   it. It is multiplied by smooth Balmer (3646 A) and Paschen (8204 A) jump factors.
2. Lines: hydrogen (Balmer, Paschen and Brackett series, Gaussian cores and Holtsmark-like
   ``|dlambda|^-5/2`` Stark wings), named strong metal lines at their real air wavelengths,
   the CH G band, a seeded pseudo-random list of weaker metal lines with pseudo-Voigt
   profiles (Gaussian thermal + microturbulent core, Lorentzian damping wing), and a smooth
   "haze" of unresolved weak lines in the blue. Metal lines scale with 10**[M/H] (alpha
   elements also with 10**[alpha/M]), weaken with Teff, and are stronger where the continuum
   opacity is low. Optical depths are added; the transmission saturates as
   ``1 - d (1 - exp(-tau))`` with ``d < 1``.
3. Energy conservation: the spectrum is scaled so that ``integral F dlambda = sigma Teff^4``
   (the flux lost in lines and jumps reappears as back-warming).
4. The line spectrum multiplies the continuum on an internal grid of 1.5 km/s steps, and the
   result (and the continuum) is convolved with a Gaussian line-spread function of
   ``FWHM = lambda / R``, so the resolution tag of the files is true.

The only randomness is the fixed, seeded line list; nothing is drawn per grid point, so the
spectra are smooth functions of the parameters and interpolating between them is meaningful.
The free constants were tuned so that the 6000 K and 4750 K models resemble the real BOSZ 2024
files of the same parameters (continuum shape, line blanketing per band, strong-line
equivalent widths); see the comments next to each constant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..constants import FWHM_PER_SIGMA, SPEED_OF_LIGHT_KMS
from .stellar_lines import DEFAULT_LINES, LINE_LIST_SEED, LineList, _build_line_list, _subset

__all__ = ["ModelFamily", "FAMILY_A", "FAMILY_B", "MODEL_FAMILIES", "synthetic_spectrum"]

# --- physical constants (CODATA 2018, exact SI definitions, cgs units) -----------------------
_H = 6.62607015e-27  # erg s
_C_CMS = SPEED_OF_LIGHT_KMS * 1e5  # cm/s
_K = 1.380649e-16  # erg/K
_AMU = 1.66053906660e-24  # g
_SIGMA_SB = 2.0 * math.pi**5 * _K**4 / (15.0 * _H**3 * _C_CMS**2)  # erg/s/cm2/K4
#: pi * B_lambda = _PLANCK_C1 / lam^5 / expm1(_PLANCK_C2 / (lam T)), lam in A, per A.
_PLANCK_C1 = 2.0 * math.pi * _H * _C_CMS**2 * 1e32
_PLANCK_C2 = _H * _C_CMS / _K * 1e8  # A K
_EV_K = 11604.51812  # K per eV
_SQRT_PI = math.sqrt(math.pi)

# --- internal sampling ----------------------------------------------------------------------
#: Step of the internal ln(lambda) grid, km/s: 1.3 Gaussian sigmas of the narrowest metal line
#: (thermal + 1 km/s microturbulence), which integrates a Gaussian to 1e-4; spectra differ from
#: a 1 km/s sampling by < 0.6 % (rms 0.03 %) at R = 10000, at 75 % of the cost.
_FINE_KMS = 1.5
_FINE_STEP = _FINE_KMS / SPEED_OF_LIGHT_KMS
#: Range of the internal grid; lines lie in 3000-25000 A and their windows end inside it.
_FINE_RANGE = (2850.0, 26500.0)
#: Part of the internal grid used for output; outside it the spectrum is smooth and is
#: evaluated directly (the margins keep the convolution's edge effects out).
_FINE_USED = (2900.0, 26000.0)
#: Microturbulence, km/s (the 'v1' of the file names).
_VMICRO = 1.0
#: Resolving powers this model can honour: below 100 the LSF would blur the domain edges; above
#: 50000 (the highest BOSZ tag) the LSF sigma would drop below 1.7 internal pixels.
_R_RANGE = (100.0, 50000.0)
#: Parameter ranges where the model is defined (wider than any grid we write).
_PARAM_RANGE = {
    "teff": (3500.0, 15000.0),
    "logg": (0.0, 6.0),
    "feh": (-5.0, 1.5),
    "alpha": (-1.0, 1.5),
}


# ============================================================================================
# Model
# ============================================================================================

# Continuum. H- opacity shape (bound-free threshold 1.6419 um, cross-section ~ lam^3 (1/lam -
# 1/lam0)^1.5; free-free ~ _HMINUS_FF (Teff / 6000 K)^_HMINUS_FF_POWER lam^2), normalised at
# 8500 A near its bound-free maximum. The free-free weight sets the 1.6 um opacity window
# (BOSZ: C / pi B = 1.20 at 6000 K, 1.46 at 4750 K).
_HMINUS_THRESHOLD_UM = 1.6419
_HMINUS_FF, _HMINUS_FF_POWER = 0.0666, 1.55
_HMINUS_NORM_UM = 0.85
#: Weight of the Eddington-Barbier temperature excursion: _GAMMA_HOT + (_GAMMA_COOL -
#: _GAMMA_HOT) * logistic((_GAMMA_T0 - Teff) / _GAMMA_DT); 1 is a grey Eddington atmosphere.
#: Fitted by eye to the BOSZ 2024 t4750/t6000 continua (C / pi B: 1.37 at 4500 A and 1.2 at
#: 1.6 um for 6000 K, 1.53 and 1.46 for 4750 K).
_GAMMA_COOL, _GAMMA_HOT, _GAMMA_T0, _GAMMA_DT = 1.7, 0.3, 6800.0, 900.0
#: Balmer and Paschen limits, A (air), and the widths of the smoothed jumps, A.
_BALMER_EDGE, _BALMER_EDGE_WIDTH = 3646.0, 12.0
_PASCHEN_EDGE, _PASCHEN_EDGE_WIDTH = 8203.6, 30.0
#: Balmer jump depth 1 - F(blue)/F(red): _BALMER_DEPTH * logistic((T - 7000) / 700)
#: * logistic((11500 - T) / 1500) * exp(-0.15 (log g - 4)), saturated below 0.9.
_BALMER_DEPTH = 0.62
_PASCHEN_TO_BALMER = 0.35
#: Metal bound-free opacity of cool stars in the UV (Mg I 2513 A, Al I 2076 A, Fe I edges),
#: added to the H- shape: _UV_K * exp(-(Teff - 6000) / _UV_DT) * 10**(0.5 [M/H])
#: * logistic((_UV_EDGE - lam) / _UV_EDGE_WIDTH) * (2500 A / lam)^_UV_POWER. Fitted to BOSZ
#: t6000 / t4750: C / pi B = 1.6 / 2.3 at 3000 A, 0.53 / 0.09 at 2500 A, 0.2 / 0.01 at 2000 A.
_UV_K, _UV_DT, _UV_EDGE, _UV_EDGE_WIDTH, _UV_POWER = 1.85, 1230.0, 2650.0, 60.0, 8.0
#: Mg I 3p bound-free edge (3757 A) and the near-UV metal opacity of cool stars:
#: _MG_K * 10**(0.5 [M/H]) * logistic((_MG_T - Teff) / 500 K) * logistic((3757 A - lam) / 40 A)
#: (BOSZ: C / pi B 1.6-1.2 over 3000-3640 A, but 1.57 at 4000 A, for 6000 K).
_MG_K, _MG_T, _MG_EDGE, _MG_EDGE_WIDTH = 0.3, 7000.0, 3757.0, 40.0

# Hydrogen lines. Wing optical depth C_w / (Gamma^2 + dlam^2)^1.25 (Holtsmark-like Stark wing,
# saturated equivalent width ~ 3 C_w^0.4); C_w of H-beta is _H_WING_BETA at the peak of s_H.
_H_WING_BETA = 155.0
#: Central optical depth of the Doppler core of H-beta at the peak of s_H (other lines scale
#: with f lambda); the Stark wing dominates the equivalent width, the core the line centre.
_H_CORE_BETA = 300.0
#: s_H(T, g) = exp(-_H_EXC (1/T - 1/9000)) / (1 + exp((T - _H_FALL_T) / _H_FALL_DT))
#: * 10**(0.25 (log g - 4)): population of n = 2 times the (Stark) wing strength ~ n_e; rises
#: towards 9000-10000 K and falls when hydrogen ionises.
_H_EXC, _H_FALL_T, _H_FALL_DT = 60000.0, 10000.0, 800.0
_H_SERIES_FACTOR = {2: 1.0, 3: 0.5, 4: 0.5}
#: Line transmission r(tau) + (1 - r(tau)) exp(-tau) with residual r = (1 - d) (1 + tau)^-beta:
#: the line source function does not vanish (weak lines have depth d tau), but falls where
#: stronger lines form higher up, so saturated cores keep deepening towards the centre
#: (a defined minimum, no flat bottom). (d, beta) for hydrogen and for metal lines.
_H_DEPTH, _H_BETA = 0.55, 0.08
_METAL_DEPTH, _METAL_BETA = 0.88, 0.06
#: Haze of unresolved weak lines: exp(-_HAZE * 10**[M/H] * exp(-(T - 5000) / _HAZE_DT)
#: * (3500 A / lam)^_HAZE_POWER / (1 + (_HAZE_UV / lam)^8)): grows steeply to the blue like the
#: real line blanketing, and turns over in the UV where the metal continuum opacity takes over.
#: The haze and the pseudo-random line parameters below were fitted together (least squares in
#: ln(F/C) over 15 bands from 3000 to 25000 A) to BOSZ 2024 t6000 g4.0 and t4750 g4.5 at
#: [M/H] = 0: F/C = 0.57 (3000-4000 A), 0.75 (4000-4500), 0.89 (4500-5500), 0.97-0.99 (red)
#: for 6000 K; the model gets 0.55, 0.74, 0.84-0.89, 0.95-0.98.
_HAZE, _HAZE_DT, _HAZE_POWER, _HAZE_UV = 1.51, 1214.0, 5.77, 3263.0
#: Optical depth at which line windows are cut (fixed per line, so spectra stay smooth in the
#: parameters); windows are sized for the strongest lines at Teff 4000 K, log g 5, [M/H] and
#: [alpha/M] = +0.5.
_TAU_CUT = 3e-4


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Free constants of the synthetic model: one set per model "family".

    The default values are the model of the module docstring (family ``"A"``, the one every
    synthetic grid is written with). Another family changes the model in form, not only in its
    parameters: stars of one family fitted with templates of another meet a template mismatch,
    as real stars do with any model grid (cross-model tests).

    Parameters
    ----------
    name : str
        Label (recorded by the simulator as the stars' source).
    line_seed : int
        Seed of the pseudo-random metal-line list (another line list: other weak lines).
    metal_log_tau_shift : float
        Added to log10 tau of the pseudo-random metal lines, dex (oscillator strengths of
        another line list).
    hminus_ff : float
        Weight of the H- free-free opacity (sets the near-infrared continuum slope).
    gamma_cool, gamma_hot : float
        Weights of the Eddington-Barbier temperature excursion of cool and hot models (the
        temperature gradient of the atmosphere: the continuum's colour at a given Teff).
    balmer_depth : float
        Scale of the Balmer (and Paschen) jump depth.
    mg_k : float
        Strength of the Mg I bound-free edge and near-UV metal opacity.
    h_wing_beta : float
        Stark-wing constant of the hydrogen lines (H-beta at the peak strength).
    haze : float
        Strength of the haze of unresolved weak lines.
    """

    name: str = "A"
    line_seed: int = LINE_LIST_SEED
    metal_log_tau_shift: float = 0.0
    hminus_ff: float = _HMINUS_FF
    gamma_cool: float = _GAMMA_COOL
    gamma_hot: float = _GAMMA_HOT
    balmer_depth: float = _BALMER_DEPTH
    mg_k: float = _MG_K
    h_wing_beta: float = _H_WING_BETA
    haze: float = _HAZE


#: The model of the module docstring: every synthetic grid is written with it.
FAMILY_A = ModelFamily()
#: A second model family, differing from A as two real model grids differ (each change is
#: within the spread of published physics): another weak-line list (seed) with oscillator
#: strengths 0.1 dex larger; H- free-free opacity +8 % (John 1988 vs Bell & Berrington 1987
#: cross-sections differ by a few %); a shallower temperature gradient (gamma -6 % cool,
#: +17 % hot: convection / mixing-length choices); Balmer jump 8 % shallower; Mg I
#: bound-free +20 % (photoionisation cross-sections are uncertain by 20-30 %); Stark wings
#: 10 % weaker (VCS vs Stehle-Hutcheon profiles); 11 % less unresolved-line haze ("missing
#: opacity").
FAMILY_B = ModelFamily(name="B", line_seed=LINE_LIST_SEED + 1, metal_log_tau_shift=0.1,
                       hminus_ff=0.072, gamma_cool=1.6, gamma_hot=0.35, balmer_depth=0.57,
                       mg_k=0.36, h_wing_beta=140.0, haze=1.35)
#: The model families by name.
MODEL_FAMILIES = {f.name: f for f in (FAMILY_A, FAMILY_B)}


def _logistic(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def _check_params(teff: float, logg: float, feh: float, alpha: float) -> None:
    for name, value in (("teff", teff), ("logg", logg), ("feh", feh), ("alpha", alpha)):
        lo, hi = _PARAM_RANGE[name]
        if not (np.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{name}={value!r}: outside the synthetic model's range [{lo}, {hi}]")


def _planck_surface(wave: np.ndarray, temp) -> np.ndarray:
    """pi B_lambda, erg/s/cm2/A, for wavelengths in A (temp may be an array)."""
    x = np.minimum(_PLANCK_C2 / (wave * temp), 700.0)
    return _PLANCK_C1 / wave**5 / np.expm1(x)


def _hminus_shape(wave: np.ndarray, teff: float, family: ModelFamily = FAMILY_A) -> np.ndarray:
    lam = wave * 1e-4
    ff = family.hminus_ff * (teff / 6000.0) ** _HMINUS_FF_POWER
    edge = np.clip(1.0 / lam - 1.0 / _HMINUS_THRESHOLD_UM, 0.0, None)
    kappa = lam**3 * edge**1.5 + ff * lam**2
    lam0 = _HMINUS_NORM_UM
    norm = lam0**3 * (1.0 / lam0 - 1.0 / _HMINUS_THRESHOLD_UM) ** 1.5 + ff * lam0**2
    return kappa / norm


def _balmer_depth(teff: float, logg: float, family: ModelFamily = FAMILY_A) -> float:
    raw = (
        family.balmer_depth
        * _logistic((teff - 7000.0) / 700.0)
        * _logistic((11500.0 - teff) / 1500.0)
        * math.exp(-0.15 * (logg - 4.0))
    )
    return float(0.9 * np.tanh(raw / 0.9))


def _continuum_opacity(wave: np.ndarray, teff: float, feh: float,
                       family: ModelFamily = FAMILY_A) -> np.ndarray:
    """Continuum opacity relative to its mean (1 near 8500 A): H-, UV metals, Mg I edge."""
    metals = 10.0 ** (0.5 * feh)
    return (
        _hminus_shape(wave, teff, family)
        + _UV_K
        * math.exp(-(teff - 6000.0) / _UV_DT)
        * metals
        * _logistic((_UV_EDGE - wave) / _UV_EDGE_WIDTH)
        * (2500.0 / wave) ** _UV_POWER
        + family.mg_k
        * metals
        * _logistic((_MG_T - teff) / 500.0)
        * _logistic((_MG_EDGE - wave) / _MG_EDGE_WIDTH)
    )


def _continuum(wave: np.ndarray, teff: float, logg: float, feh: float,
               family: ModelFamily = FAMILY_A) -> np.ndarray:
    """Unnormalised surface continuum flux, erg/s/cm2/A (see the module docstring)."""
    hot, cool = family.gamma_hot, family.gamma_cool
    gamma = hot + (cool - hot) * _logistic((_GAMMA_T0 - teff) / _GAMMA_DT)
    kappa = _continuum_opacity(wave, teff, feh, family)
    # Eddington-Barbier: the continuum forms at tau_Ross = 2/3 * kbar / kappa_lambda
    t4 = 1.0 + 0.5 * gamma * (1.0 / kappa - 1.0)
    temp = teff * t4**0.25
    cont = _planck_surface(wave, temp)
    d_balmer = _balmer_depth(teff, logg, family)
    cont *= 1.0 - d_balmer * _logistic((_BALMER_EDGE - wave) / _BALMER_EDGE_WIDTH)
    cont *= 1.0 - _PASCHEN_TO_BALMER * d_balmer * _logistic(
        (_PASCHEN_EDGE - wave) / _PASCHEN_EDGE_WIDTH
    )
    return cont


def _haze(wave: np.ndarray, teff: float, feh: float, family: ModelFamily = FAMILY_A) -> np.ndarray:
    strength = family.haze * 10.0**feh * math.exp(-(teff - 5000.0) / _HAZE_DT)
    return np.exp(-strength * (3500.0 / wave) ** _HAZE_POWER / (1.0 + (_HAZE_UV / wave) ** 8))


def _fine_grid() -> tuple[np.ndarray, float]:
    lo, hi = _FINE_RANGE
    n = int(math.ceil(math.log(hi / lo) / _FINE_STEP)) + 1
    return lo * np.exp(_FINE_STEP * np.arange(n)), math.log(lo)


_FINE_WAVE, _FINE_LN0 = _fine_grid()
_FINE_WAVE.setflags(write=False)


def _doppler_kms(teff: float, mass) -> np.ndarray:
    """Doppler width b = sqrt(2kT/m + xi^2), km/s."""
    return np.sqrt(2.0 * _K * teff / (np.asarray(mass) * _AMU) * 1e-10 + _VMICRO**2)


def _metal_log_tau(lines: LineList, teff, logg, feh, alpha,
                   family: ModelFamily = FAMILY_A) -> np.ndarray:
    return (
        lines.log_tau
        + feh
        + np.where(lines.alpha, alpha, 0.0)
        - (teff - 5000.0) / (lines.t_scale * math.log(10.0))
        - np.where(lines.ion, (logg - 4.0) / 3.0, 0.0)
        # a line's depth is set by line over continuum opacity: lines are stronger in the
        # continuum-opacity windows (the blue, 1.6 um)
        - np.log10(_continuum_opacity(lines.wavelength, teff, feh, family))
    )


def _h_strength(teff: float, logg: float) -> float:
    return (
        math.exp(-_H_EXC * (1.0 / teff - 1.0 / 9000.0))
        * float(_logistic((_H_FALL_T - teff) / _H_FALL_DT))
        * 10.0 ** (0.25 * (logg - 4.0))
    )


def _h_line_constants(lines: LineList, teff: float, logg: float,
                      family: ModelFamily = FAMILY_A):
    """Core optical depth and wing constant C_w (A^2.5) of each hydrogen line."""
    n_lo, n_up = lines.n_lower, lines.n_upper
    e_lo = 13.598 * (1.0 - 1.0 / n_lo**2) - 13.598 * 0.75  # eV above n = 2
    pop = n_lo**2 / 4.0 * np.exp(-e_lo * _EV_K / teff)
    n_dissolve = 16.0 - 1.5 * (logg - 4.0)
    dissolve = np.exp(-((n_up / n_dissolve) ** 6))
    series = np.array([_H_SERIES_FACTOR[int(n)] for n in n_lo])
    strength = _h_strength(teff, logg) * pop * dissolve * series
    f_beta, lam_beta = 0.1193, 4861.33
    wing = (
        family.h_wing_beta
        * strength
        * (lines.wavelength / lam_beta) ** 1.5
        * np.sqrt(lines.f_value / f_beta)
        * (n_up**2 - n_lo**2)
        / 12.0
    )
    core = _H_CORE_BETA * strength * lines.f_value * lines.wavelength / (f_beta * lam_beta)
    return core, wing


def _window_ceil(x: np.ndarray, lo: int = 8, hi: int = 2**15) -> np.ndarray:
    """Round half-widths up to a few sizes (steps of sqrt 2), so lines can be batched."""
    x = np.clip(np.asarray(x, dtype=float), lo, hi)
    return np.ceil(2.0 ** (np.ceil(2.0 * np.log2(x)) / 2.0)).astype(np.int64)


def _line_windows(lines: LineList = DEFAULT_LINES, family: ModelFamily = FAMILY_A) -> np.ndarray:
    """Half-widths (internal pixels) of the wing window of each line, fixed for all parameters.

    Sized for the strongest case (Teff 4000 K, log g 5, [M/H] and [alpha/M] = +0.5) so that the
    wing optical depth at the window edge is below _TAU_CUT.
    """
    is_h = lines.kind == "H"
    half_kms = np.zeros(len(lines))
    # metals: wing tau0 a / (sqrt(pi) v^2) = _TAU_CUT, v in Doppler widths
    m = ~is_h
    log_tau = (
        lines.log_tau[m] + 0.5 + np.where(lines.alpha[m], 0.5, 0.0)
        + 1000.0 / (lines.t_scale[m] * math.log(10.0))
        - np.where(lines.ion[m], 1.0 / 3.0, 0.0)
        + 0.5  # the weakest continuum opacity relative to its mean in 3000-25000 A
    )  # fmt: skip
    v_wing = np.sqrt(10.0**log_tau * lines.damping[m] * 10.0**0.3 / (_SQRT_PI * _TAU_CUT))
    half_kms[m] = v_wing * _doppler_kms(4000.0, lines.mass[m])
    # hydrogen: the largest wing constant over Teff at log g 5; C_w / dlambda^2.5 = _TAU_CUT
    temps = np.linspace(*_PARAM_RANGE["teff"], 116)
    hyd = _subset(lines, is_h)
    wing_max = np.max([_h_line_constants(hyd, t, 5.0, family)[1] for t in temps], axis=0)
    half_kms[is_h] = (wing_max / _TAU_CUT) ** 0.4 / hyd.wavelength * SPEED_OF_LIGHT_KMS
    return _window_ceil(half_kms / _FINE_KMS)


_WINDOWS = _line_windows()


@functools.cache
def _family_lines(family: ModelFamily) -> tuple[LineList, np.ndarray]:
    """The line list of a model family and its line windows (computed once per family)."""
    if family == FAMILY_A:
        return DEFAULT_LINES, _WINDOWS
    lines = _build_line_list(family.line_seed)
    if family.metal_log_tau_shift:
        cols = {f.name: getattr(lines, f.name) for f in dataclasses.fields(lines)}
        shifted = lines.log_tau + np.where(lines.kind == "metal", family.metal_log_tau_shift, 0.0)
        shifted.setflags(write=False)
        lines = LineList(**{**cols, "log_tau": shifted})
    return lines, _line_windows(lines, family)


def _windows(centre_px: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel indices of windows of +-half around each centre, and offsets from the centre."""
    idx = np.rint(centre_px).astype(np.int64)[:, None] + np.arange(-half, half + 1)
    return idx, idx - centre_px[:, None]


def _sum_on_grid(pieces: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Add (indices, values) pieces into one array of length n (one bincount for all)."""
    if not pieces:
        return np.zeros(n)
    idx = np.concatenate([p[0].ravel() for p in pieces])
    vals = np.concatenate([p[1].ravel() for p in pieces])
    inside = (idx >= 0) & (idx < n)
    if not inside.all():
        idx, vals = idx[inside], vals[inside]
    return np.bincount(idx, weights=vals, minlength=n)


def _line_optical_depths(teff, logg, feh, alpha, family: ModelFamily = FAMILY_A):
    """Hydrogen and metal optical depths on the internal grid.

    Profiles are split into a Gaussian core, evaluated within 6 Doppler widths, and a
    Lorentzian (metals) or Holtsmark-like (hydrogen) wing, evaluated over each line's fixed
    window; lines with equal windows are evaluated together.
    """
    lines, windows = _family_lines(family)
    n = _FINE_WAVE.size
    centre = (np.log(lines.wavelength) - _FINE_LN0) / _FINE_STEP
    is_h = lines.kind == "H"

    # metals: tau0 (exp(-v^2) + a / sqrt(pi) / (1 + v^2)), v = dlambda / Doppler width
    m = ~is_h
    # (no line is dropped when weak: the spectra stay smooth in the parameters)
    tau0 = 10.0 ** _metal_log_tau(_subset(lines, m), teff, logg, feh, alpha, family)
    damp = lines.damping[m] * 10.0 ** (0.3 * (logg - 4.0)) / _SQRT_PI
    b = _doppler_kms(teff, lines.mass[m]) / _FINE_KMS  # in internal pixels
    c_m = centre[m]
    half_m = windows[m]
    idx, dx = _windows(c_m, int(math.ceil(6.0 * b.max())))
    pieces = [(idx, tau0[:, None] * np.exp(-((dx / b[:, None]) ** 2)))]
    wing_ok = damp > 0
    for half in np.unique(half_m[wing_ok]):
        sel = wing_ok & (half_m == half)
        idx, dx = _windows(c_m[sel], int(half))
        v2 = (dx / b[sel, None]) ** 2
        pieces.append((idx, (tau0[sel] * damp[sel])[:, None] / (1.0 + v2)))
    tau_m = _sum_on_grid(pieces, n)

    # hydrogen: core exp(-v^2) + wing C_w / (Gamma^2 + dlambda^2)^1.25
    core, wing = _h_line_constants(_subset(lines, is_h), teff, logg, family)
    b_h = float(_doppler_kms(teff, 1.008)) / _FINE_KMS
    c_h = centre[is_h]
    px_a = lines.wavelength[is_h] * _FINE_STEP  # Angstrom per fine pixel at each line
    gamma2 = (2.0 * b_h * px_a) ** 2
    half_h = windows[is_h]
    idx, dx = _windows(c_h, int(math.ceil(6.0 * b_h)))
    pieces = [(idx, core[:, None] * np.exp(-((dx / b_h) ** 2)))]
    for half in np.unique(half_h):
        sel = half_h == half
        idx, dx = _windows(c_h[sel], int(half))
        x2 = gamma2[sel, None] + (dx * px_a[sel, None]) ** 2
        pieces.append((idx, wing[sel, None] / (x2 * np.sqrt(np.sqrt(x2)))))
    tau_h = _sum_on_grid(pieces, n)
    return tau_h, tau_m


def _transmission(tau: np.ndarray, depth: float, beta: float) -> np.ndarray:
    """Line transmission of optical depth tau: r + (1 - r) exp(-tau), r = (1-d)(1+tau)^-beta."""
    resid = (1.0 - depth) * (1.0 + tau) ** -beta
    return resid + (1.0 - resid) * np.exp(-tau)


def _smooth_part(wave: np.ndarray, teff, logg, feh,
                 family: ModelFamily = FAMILY_A) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised (flux, continuum) where there are no lines: continuum times the haze."""
    cont = _continuum(wave, teff, logg, feh, family)
    return cont * _haze(wave, teff, feh, family), cont


#: Quadrature grids (ln-uniform) for the energy integral outside the internal grid; the flux
#: beyond 3e6 A is < 1e-7 of the total for Teff >= 3500 K.
_OUTER_WAVE = (np.geomspace(50.0, _FINE_RANGE[0], 3000), np.geomspace(_FINE_RANGE[1], 3e6, 3000))


def _intrinsic_spectrum(teff, logg, feh, alpha, family: ModelFamily = FAMILY_A):
    """Flux and continuum on the internal grid before the LSF, normalised to sigma Teff^4."""
    wave = _FINE_WAVE
    flux, cont = _smooth_part(wave, teff, logg, feh, family)
    tau_h, tau_m = _line_optical_depths(teff, logg, feh, alpha, family)
    trans = _transmission(tau_h, _H_DEPTH, _H_BETA) * _transmission(
        tau_m, _METAL_DEPTH, _METAL_BETA
    )
    flux *= trans
    # energy conservation: int F dlambda = sigma Teff^4 (back-warming by the blanketed flux)
    total = float(np.dot(flux, wave)) * _FINE_STEP
    for outer in _OUTER_WAVE:
        f_out = _smooth_part(outer, teff, logg, feh, family)[0]
        total += float(np.trapezoid(f_out * outer, np.log(outer)))
    scale = _SIGMA_SB * teff**4 / total
    return flux * scale, cont * scale, scale


def _convolve_lsf(flux: np.ndarray, cont: np.ndarray, resolution: float):
    """Gaussian LSF of FWHM lambda / R on the internal grid; returns (ln-lambda, flux, cont).

    The grid is first block-averaged to <= sigma / 6 (the boxcar's variance is taken off the
    Gaussian's), which keeps the later linear interpolation within ~0.3 % of a line's depth.
    """
    sigma_px = 1.0 / (resolution * FWHM_PER_SIGMA * _FINE_STEP)
    k = max(1, int(sigma_px // 6))
    n = (flux.size // k) * k
    ln_wave = _FINE_LN0 + _FINE_STEP * (np.arange(n // k) * k + 0.5 * (k - 1))
    both = np.stack([flux[:n], cont[:n]]).reshape(2, n // k, k).mean(axis=2)
    sigma_bin = math.sqrt(max(sigma_px**2 - (k * k - 1) / 12.0, 1e-6)) / k
    both = gaussian_filter1d(both, sigma_bin, axis=1, mode="nearest", truncate=4.0)
    return ln_wave, both[0], both[1]


def synthetic_spectrum(
    wavelength: np.ndarray | Sequence[float],
    teff: float,
    logg: float,
    feh: float,
    alpha: float = 0.0,
    resolution: float = 10000.0,
    family: ModelFamily | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Surface flux and continuum of the synthetic stellar model.

    Parameters
    ----------
    wavelength : array_like
        Wavelengths, Angstrom: air above 2000 A, vacuum below (the BOSZ 2024 convention).
        Any shape and order.
    teff : float
        Effective temperature, K (3500-15000; the model is tuned for 4500-9000).
    logg : float
        log10 surface gravity, cgs (0-6).
    feh : float
        [M/H], dex (-5 to +1.5).
    alpha : float, optional
        [alpha/M], dex (-1 to +1.5).
    resolution : float, optional
        Resolving power R: the spectrum is convolved with a Gaussian of FWHM = lambda / R
        (100-50000).
    family : ModelFamily or str, optional
        The model's free constants, or a family name of :data:`MODEL_FAMILIES` (default
        :data:`FAMILY_A`, the model every synthetic grid is written with).

    Returns
    -------
    flux, continuum : numpy.ndarray
        Surface flux F = 4 pi H and continuum 4 pi C, erg/s/cm2/A, float64, shaped like
        ``wavelength``. ``flux <= continuum``, and the integral of the flux over all
        wavelengths is sigma Teff^4.

    Raises
    ------
    ValueError
        If a parameter is outside the model's range or a wavelength is not finite and > 0.

    Notes
    -----
    Lines exist between 3000 and 25000 A; outside, the flux is the continuum times a smooth
    haze of unresolved lines. Every call builds the whole intrinsic spectrum on the internal
    1.5 km/s grid (the energy normalisation needs it), so it costs about the same for any
    ``wavelength``: ~0.1 s for the 150000-pixel R = 10000 BOSZ grid.

    Examples
    --------
    >>> wave = bosz_wavelength_grid(5000, 6500.0, 6600.0)
    >>> flux, cont = synthetic_spectrum(wave, 6000.0, 4.0, 0.0)
    >>> bool(np.all(flux <= cont))
    True
    """
    _check_params(teff, logg, feh, alpha)
    if not (np.isfinite(resolution) and _R_RANGE[0] <= resolution <= _R_RANGE[1]):
        raise ValueError(f"resolution={resolution!r}: must be within {_R_RANGE}")
    wave = np.asarray(wavelength, dtype=np.float64)
    if not np.all(np.isfinite(wave) & (wave > 0)):
        raise ValueError("wavelength: every value must be finite and > 0 (Angstrom)")
    teff, logg, feh, alpha = float(teff), float(logg), float(feh), float(alpha)
    family = _as_family(family)
    flux_i, cont_i, scale = _intrinsic_spectrum(teff, logg, feh, alpha, family)
    flat = wave.ravel()
    flux = np.empty_like(flat)
    cont = np.empty_like(flat)
    inside = (flat >= _FINE_USED[0]) & (flat <= _FINE_USED[1])
    if inside.any():
        ln_grid, flux_c, cont_c = _convolve_lsf(flux_i, cont_i, resolution)
        ln_w = np.log(flat[inside])
        flux[inside] = np.interp(ln_w, ln_grid, flux_c)
        cont[inside] = np.interp(ln_w, ln_grid, cont_c)
    if not inside.all():
        f_out, c_out = _smooth_part(flat[~inside], teff, logg, feh, family)
        flux[~inside] = f_out * scale
        cont[~inside] = c_out * scale
    return flux.reshape(wave.shape), cont.reshape(wave.shape)


def _as_family(family) -> ModelFamily:
    if family is None:
        return FAMILY_A
    if isinstance(family, ModelFamily):
        return family
    if family in MODEL_FAMILIES:
        return MODEL_FAMILIES[family]
    raise ValueError(f"family={family!r}: use a ModelFamily or one of {sorted(MODEL_FAMILIES)}")
