"""The line list of the synthetic stellar model: hydrogen series, named strong metal lines,
the CH G band and a seeded pseudo-random list of weaker metal lines (the model's only
randomness)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..constants import SPEED_OF_LIGHT_KMS

__all__ = ["LINE_LIST_SEED", "LineList", "DEFAULT_LINES", "line_list"]

#: Seed of the pseudo-random metal-line list (the model's only randomness).
LINE_LIST_SEED = 20240613


@dataclasses.dataclass(frozen=True)
class LineList:
    """Lines of the synthetic model (every array has one entry per line).

    Attributes
    ----------
    wavelength : numpy.ndarray
        Line centre, Angstrom, air (all lines are above 2000 A).
    kind : numpy.ndarray of str
        ``"H"`` (hydrogen), ``"strong"`` (named strong metal line), ``"molecule"`` (CH G band)
        or ``"metal"`` (pseudo-random weak metal line).
    name : numpy.ndarray of str
        Identification, e.g. ``"H I 4-2"``, ``"Ca II K"``; ``""`` for pseudo-random lines.
    log_tau : numpy.ndarray
        log10 of the central optical depth at Teff = 5000 K, log g = 4, [M/H] = 0,
        [alpha/M] = 0, before the division by the relative continuum opacity (metal lines
        only; NaN for hydrogen).
    damping : numpy.ndarray
        Voigt damping parameter (Lorentzian over Doppler width) at log g = 4 (metal lines).
    t_scale : numpy.ndarray
        Strength ~ exp(-(Teff - 5000 K) / t_scale), K (metal lines).
    alpha : numpy.ndarray of bool
        Line of an alpha element (strength also ~ 10**[alpha/M]).
    ion : numpy.ndarray of bool
        Line of an ion (strength ~ g**(-1/3), as for ionised lines in cool atmospheres).
    mass : numpy.ndarray
        Atomic or molecular mass, amu (sets the thermal width).
    n_lower, n_upper : numpy.ndarray of int
        Principal quantum numbers of hydrogen lines (0 for metal lines).
    f_value : numpy.ndarray
        Absorption oscillator strength of hydrogen lines (NaN for metal lines).
    """

    wavelength: np.ndarray
    kind: np.ndarray
    name: np.ndarray
    log_tau: np.ndarray
    damping: np.ndarray
    t_scale: np.ndarray
    alpha: np.ndarray
    ion: np.ndarray
    mass: np.ndarray
    n_lower: np.ndarray
    n_upper: np.ndarray
    f_value: np.ndarray

    def __len__(self) -> int:
        return len(self.wavelength)

    def select(self, kind: str) -> LineList:
        """Return the lines of one kind (``"H"``, ``"strong"``, ``"molecule"``, ``"metal"``)."""
        return _subset(self, self.kind == kind)


def _subset(lines: LineList, mask: np.ndarray) -> LineList:
    cols = {f.name: getattr(lines, f.name)[mask] for f in dataclasses.fields(lines)}
    for arr in cols.values():
        arr.setflags(write=False)
    return LineList(**cols)


def _vacuum_to_air(wave_vac: np.ndarray) -> np.ndarray:
    """Air wavelength of a vacuum one, Angstrom (IAU standard; Morton 2000, ApJS 130, 403)."""
    s2 = (1e4 / np.asarray(wave_vac, dtype=float)) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return wave_vac / n


# Hydrogen. Known air wavelengths (gf-weighted multiplet centres) and absorption oscillator
# strengths (Wiese & Fuhr 2009, JPCRD 38, 565); higher members are computed (Rydberg formula
# with the Dirac fine-structure term, which reproduces the known ones to 0.02-0.08 A) and their
# f-values follow Kramers' n_u**-3 law scaled to the last tabulated member.
_H_KNOWN_AIR = {
    (2, 3): 6562.80, (2, 4): 4861.33, (2, 5): 4340.47, (2, 6): 4101.74, (2, 7): 3970.07,
    (2, 8): 3889.05, (2, 9): 3835.38, (2, 10): 3797.90, (2, 11): 3770.63, (2, 12): 3750.15,
    (3, 4): 18751.0, (3, 5): 12818.1, (3, 6): 10938.1, (3, 7): 10049.4, (3, 8): 9545.97,
    (3, 9): 9229.01, (3, 10): 9014.91, (3, 11): 8862.78, (3, 12): 8750.47, (3, 13): 8665.02,
    (3, 14): 8598.39, (3, 15): 8545.38, (3, 16): 8502.48, (3, 17): 8467.25,
    (4, 7): 21655.3, (4, 8): 19445.6,
}  # fmt: skip
_H_F_VALUES = {
    2: (0.6407, 0.1193, 0.04467, 0.02209, 0.01270, 0.008036, 0.005429, 0.003851, 0.002835,
        0.002151),
    3: (0.8421, 0.1506, 0.05584, 0.02768, 0.01604, 0.01023, 0.00698, 0.00500, 0.00372),
    4: (1.038, 0.1793, 0.06549, 0.03230, 0.01870, 0.01196, 0.00818),
}  # fmt: skip
#: Highest upper level of each series that we include (the lines have merged beyond).
_H_N_MAX = 22
_RYDBERG_H = 109677.58340  # cm^-1, hydrogen (reduced mass)
_FINE_STRUCTURE = 7.2973525693e-3


def _hydrogen_lines() -> dict[str, np.ndarray]:
    def level(n: int, j: float) -> float:  # energy in cm^-1 (negative), with Dirac fine structure
        return -_RYDBERG_H / n**2 * (1.0 + _FINE_STRUCTURE**2 / n**2 * (n / (j + 0.5) - 0.75))

    rows = []
    for n_lo, f_known in _H_F_VALUES.items():
        for n_up in range(n_lo + 1, _H_N_MAX + 1):
            # the strongest fine-structure component, (l = n_lo - 1, j = l + 1/2) -> j + 1
            sigma = level(n_up, n_lo + 0.5) - level(n_lo, n_lo - 0.5)
            wave = _H_KNOWN_AIR.get((n_lo, n_up), float(_vacuum_to_air(1e8 / sigma)))
            k = n_up - n_lo - 1
            if k < len(f_known):
                f = f_known[k]
            else:
                n_last = n_lo + len(f_known)
                f = f_known[-1] * _kramers_f(n_lo, n_up) / _kramers_f(n_lo, n_last)
            if 3000.0 <= wave <= 25000.0:
                rows.append((wave, n_lo, n_up, f))
    arr = np.array(rows)
    return {
        "wavelength": arr[:, 0],
        "n_lower": arr[:, 1].astype(int),
        "n_upper": arr[:, 2].astype(int),
        "f_value": arr[:, 3],
        "name": np.array([f"H I {u}-{lo}" for lo, u in arr[:, 1:3].astype(int)]),
    }


def _kramers_f(n_lo: int, n_up: int) -> float:
    """Kramers' semi-classical absorption oscillator strength (Gaunt factor 1)."""
    return (
        32.0 / (3.0 * math.sqrt(3.0) * math.pi)
        / (n_lo**5 * n_up**3) / (1.0 / n_lo**2 - 1.0 / n_up**2) ** 3
    )  # fmt: skip


# Named strong metal lines: air wavelength (A), name, log10 tau at the reference point
# (Teff 5000 K, log g 4, [M/H] 0), damping parameter a, t_scale (K), alpha, ion, mass (amu).
# The log tau values are calibrated so that a Teff 5800 K, log g 4.4, [M/H] 0 model has roughly
# the solar equivalent widths of Moore, Minnaert & Houtgast (1966) for these lines.
_STRONG_LINES = (
    (3933.66, "Ca II K", 6.87, 0.030, 700.0, True, True, 40.08),
    (3968.47, "Ca II H", 6.62, 0.030, 700.0, True, True, 40.08),
    (3944.01, "Al I", 3.46, 0.020, 900.0, False, False, 26.98),
    (3961.52, "Al I", 3.66, 0.020, 900.0, False, False, 26.98),
    (4045.81, "Fe I", 4.35, 0.020, 1100.0, False, False, 55.85),
    (4063.59, "Fe I", 4.01, 0.020, 1100.0, False, False, 55.85),
    (4071.74, "Fe I", 3.93, 0.020, 1100.0, False, False, 55.85),
    (4077.71, "Sr II", 3.64, 0.020, 1500.0, False, True, 87.62),
    (4215.52, "Sr II", 3.37, 0.020, 1500.0, False, True, 87.62),
    (4226.73, "Ca I", 4.51, 0.020, 900.0, True, False, 40.08),
    (4383.55, "Fe I", 4.19, 0.020, 1100.0, False, False, 55.85),
    (4404.75, "Fe I", 4.09, 0.020, 1100.0, False, False, 55.85),
    (4554.03, "Ba II", 2.77, 0.020, 1500.0, False, True, 137.33),
    (4957.60, "Fe I", 3.82, 0.020, 1100.0, False, False, 55.85),
    (5167.32, "Mg I b4", 3.03, 0.050, 1300.0, True, False, 24.31),
    (5172.68, "Mg I b2", 3.60, 0.050, 1300.0, True, False, 24.31),
    (5183.60, "Mg I b1", 3.80, 0.050, 1300.0, True, False, 24.31),
    (5269.54, "Fe I", 3.46, 0.020, 1100.0, False, False, 55.85),
    (5328.04, "Fe I", 3.26, 0.020, 1100.0, False, False, 55.85),
    (5371.49, "Fe I", 3.03, 0.020, 1100.0, False, False, 55.85),
    (5397.13, "Fe I", 2.88, 0.020, 1100.0, False, False, 55.85),
    (5405.77, "Fe I", 2.93, 0.020, 1100.0, False, False, 55.85),
    (5429.70, "Fe I", 2.88, 0.020, 1100.0, False, False, 55.85),
    (5446.92, "Fe I", 2.79, 0.020, 1100.0, False, False, 55.85),
    (5889.95, "Na I D2", 3.63, 0.020, 800.0, False, False, 22.99),
    (5895.92, "Na I D1", 3.38, 0.020, 800.0, False, False, 22.99),
    (6122.22, "Ca I", 2.47, 0.020, 1000.0, True, False, 40.08),
    (6162.17, "Ca I", 2.47, 0.020, 1000.0, True, False, 40.08),
    (6439.08, "Ca I", 1.73, 0.020, 1000.0, True, False, 40.08),
    (7664.90, "K I", 1.91, 0.020, 700.0, False, False, 39.10),
    (7698.96, "K I", 1.64, 0.020, 700.0, False, False, 39.10),
    (8498.02, "Ca II", 3.99, 0.020, 2500.0, True, True, 40.08),
    (8542.09, "Ca II", 4.79, 0.020, 2500.0, True, True, 40.08),
    (8662.14, "Ca II", 4.48, 0.020, 2500.0, True, True, 40.08),
    (8806.76, "Mg I", 2.71, 0.030, 1300.0, True, False, 24.31),
    (10827.09, "Si I", 2.58, 0.020, 1500.0, True, False, 28.09),
    (15740.70, "Mg I", 0.88, 0.030, 1500.0, True, False, 24.31),
    (15748.90, "Mg I", 1.35, 0.030, 1500.0, True, False, 24.31),
    (15765.80, "Mg I", 1.71, 0.030, 1500.0, True, False, 24.31),
    (16718.96, "Al I", 1.01, 0.020, 1000.0, False, False, 26.98),
    (22056.40, "Na I", 0.28, 0.020, 800.0, False, False, 22.99),
    (22083.70, "Na I", 0.16, 0.020, 800.0, False, False, 22.99),
)

#: Pseudo-random metal lines: count, range (A) and density ~ lambda**-_METAL_DENSITY_POWER
#: (denser in the blue, as in real spectra).
_N_METAL = 4000
_METAL_RANGE = (3000.0, 25000.0)
_METAL_DENSITY_POWER = 3.07
#: Fraction of them spread uniformly in ln(lambda) instead (the red and near-IR forest).
_METAL_FLAT_FRACTION = 0.39
#: No pseudo-random line within this distance of a hydrogen or named line, km/s.
_CLEAN_CORE_KMS = 100.0
#: log10 tau at the reference point: _METAL_LOG_TAU[0] + _METAL_LOG_TAU[1] * u**_METAL_LOG_TAU[2]
#: + _METAL_LOG_TAU[3] * log10(5000 A / lam), u uniform: many weak lines, few strong ones,
#: blue lines stronger on average (resonance lines of neutral metals crowd the near UV).
_METAL_LOG_TAU = (-0.37, 2.52, 0.90, 0.20)
#: Range of the damping parameter (log10, uniform) and of t_scale (K, uniform; x 1.5 for ions,
#: which as the dominant stage weaken more slowly with Teff than minority neutrals).
_METAL_LOG_DAMPING = (-2.0, -1.2)
_METAL_T_SCALE = (955.0, 1910.0)
#: Fraction of pseudo-random lines from alpha elements, and from ions.
_ALPHA_FRACTION = 0.25
_ION_FRACTION = 0.2
#: CH G band: line count, range (A; the band head is at the red end) and t_scale (K).
_N_GBAND = 150
_GBAND_RANGE = (4260.0, 4314.0)
_GBAND_T_SCALE = 600.0
_GBAND_LOG_TAU = (-0.3, 1.2)


def _build_line_list(seed: int = LINE_LIST_SEED) -> LineList:
    rng = np.random.default_rng(seed)
    # pseudo-random metal lines: inverse CDF of a lambda**-p density
    lo, hi = _METAL_RANGE
    q = 1.0 - _METAL_DENSITY_POWER
    flat = rng.random(_N_METAL) < _METAL_FLAT_FRACTION

    def draw(n_draw, flat_draw):
        u = rng.random(n_draw)
        return np.where(flat_draw, lo * (hi / lo) ** u, (lo**q + u * (hi**q - lo**q)) ** (1.0 / q))

    # keep the cores of the hydrogen and named lines clean, so that their centres are where
    # the line lists say (redraw, deterministically, the few lines that fall there)
    hyd = _hydrogen_lines()
    named = np.sort(np.concatenate([hyd["wavelength"], [row[0] for row in _STRONG_LINES]]))
    wave_m = draw(_N_METAL, flat)
    for _ in range(100):
        j = np.clip(np.searchsorted(named, wave_m), 1, named.size - 1)
        nearest = np.minimum(np.abs(wave_m - named[j - 1]), np.abs(wave_m - named[j]))
        bad = nearest < _CLEAN_CORE_KMS / SPEED_OF_LIGHT_KMS * wave_m
        if not bad.any():
            break
        wave_m[bad] = draw(int(bad.sum()), flat[bad])
    base, span, power, slope = _METAL_LOG_TAU
    log_tau_m = base + span * rng.random(_N_METAL) ** power + slope * np.log10(5000.0 / wave_m)
    damping_m = 10.0 ** rng.uniform(*_METAL_LOG_DAMPING, _N_METAL)
    ion_m = rng.random(_N_METAL) < _ION_FRACTION
    t_scale_m = rng.uniform(*_METAL_T_SCALE, _N_METAL) * np.where(ion_m, 1.5, 1.0)
    alpha_m = rng.random(_N_METAL) < _ALPHA_FRACTION
    mass_m = rng.choice(np.array([24.31, 28.09, 40.08, 47.87, 52.00, 55.85, 58.69]), _N_METAL)
    # CH G band: a comb of lines crowding towards the band head at 4314 A
    g_lo, g_hi = _GBAND_RANGE
    wave_g = g_hi - (g_hi - g_lo) * rng.random(_N_GBAND) ** 2
    log_tau_g = rng.uniform(*_GBAND_LOG_TAU, _N_GBAND)

    strong = list(zip(*_STRONG_LINES, strict=True))
    n_s, n_g, n_h = len(_STRONG_LINES), _N_GBAND, len(hyd["wavelength"])
    full = np.full
    cols = {
        "wavelength": np.concatenate([hyd["wavelength"], strong[0], wave_g, wave_m]),
        "kind": np.array(
            ["H"] * n_h + ["strong"] * n_s + ["molecule"] * n_g + ["metal"] * _N_METAL
        ),
        "name": np.concatenate([hyd["name"], strong[1], ["CH G band"] * n_g, [""] * _N_METAL]),
        "log_tau": np.concatenate([full(n_h, np.nan), strong[2], log_tau_g, log_tau_m]),
        "damping": np.concatenate([full(n_h, np.nan), strong[3], np.zeros(n_g), damping_m]),
        "t_scale": np.concatenate(
            [full(n_h, np.nan), strong[4], np.full(n_g, _GBAND_T_SCALE), t_scale_m]
        ),
        "alpha": np.concatenate([np.zeros(n_h, bool), strong[5], np.zeros(n_g, bool), alpha_m]),
        "ion": np.concatenate([np.zeros(n_h, bool), strong[6], np.zeros(n_g, bool), ion_m]),
        "mass": np.concatenate([np.full(n_h, 1.008), strong[7], np.full(n_g, 13.02), mass_m]),
        "n_lower": np.concatenate([hyd["n_lower"], np.zeros(n_s + n_g + _N_METAL, int)]),
        "n_upper": np.concatenate([hyd["n_upper"], np.zeros(n_s + n_g + _N_METAL, int)]),
        "f_value": np.concatenate([hyd["f_value"], full(n_s + n_g + _N_METAL, np.nan)]),
    }
    for key in ("log_tau", "damping", "t_scale", "mass", "wavelength", "f_value"):
        cols[key] = np.asarray(cols[key], dtype=float)
    for key in ("alpha", "ion"):
        cols[key] = np.asarray(cols[key], dtype=bool)
    for arr in cols.values():
        arr.setflags(write=False)
    return LineList(**cols)


#: The line list of the model: hydrogen, named strong lines, the CH G band and the seeded
#: pseudo-random metal lines (see :class:`LineList`). Read-only.
DEFAULT_LINES: LineList = _build_line_list()


def line_list(kind: str | None = None) -> LineList:
    """Return the model's line list (:data:`DEFAULT_LINES`), optionally one kind of line.

    Parameters
    ----------
    kind : {"H", "strong", "molecule", "metal"}, optional
        Only lines of this kind.

    Returns
    -------
    LineList
        Read-only arrays; wavelengths in Angstrom, air.
    """
    if kind is None:
        return DEFAULT_LINES
    if kind not in ("H", "strong", "molecule", "metal"):
        raise ValueError(f"kind={kind!r}: must be one of 'H', 'strong', 'molecule', 'metal'")
    return DEFAULT_LINES.select(kind)
