"""Regenerate telluric_lines.csv: the default line list of the telluric model.

    python kspec_fluxcal/data/make_telluric_lines.py > kspec_fluxcal/data/telluric_lines.csv

A STAND-IN, not a measured line list (none could be shipped: HITRAN and published
transmission atlases are not redistributable here). In the five bands of the
``telluric_default`` mask, a seeded forest of lines with the bands' total equivalent widths at
airmass 1 (O2 A ~30 A, B ~8 A; water bands 10-25 A for a moderate column), line strengths
drawn from an exponential distribution under a band envelope, and Lorentzian pressure widths
typical of O2 (~0.025 A) and H2O (~0.05 A) lines at 0.8 atm. For real data, replace the file
(same columns; ``[telluric] lines`` in the configuration) with lines from HITRAN (e.g. through
HAPI) for the site: wavelength (air, Angstrom), species, equivalent width at airmass 1 and the
reference water column (Angstrom), Lorentzian half width (Angstrom).
"""

import numpy as np

#: (species, lo, hi, total equivalent width at airmass 1 (A), lines). Lines are kept 10 A
#: inside the mask region holding the band, so that no absorption reaches beyond it by more
#: than a line spread.
BANDS = (
    ("O2", 6870.0, 6920.0, 8.0, 40),
    ("H2O", 7160.0, 7330.0, 10.0, 90),
    ("O2", 7600.0, 7690.0, 30.0, 60),
    ("H2O", 8120.0, 8350.0, 12.0, 100),
    ("H2O", 8950.0, 9190.0, 25.0, 100),
)
#: Lorentzian half widths at half maximum, Angstrom (pressure broadening ~0.05 cm^-1/atm for
#: O2, ~0.09 for H2O, at 0.8 atm, near 7600 and 8200 A), and their relative scatter.
HWHM = {"O2": 0.025, "H2O": 0.05}
HWHM_SCATTER = 0.2
SEED = 7594


def lines():
    rng = np.random.default_rng(SEED)
    rows = []
    for species, lo, hi, total, n in BANDS:
        wave = np.sort(rng.uniform(lo, hi, n))
        envelope = np.sqrt(np.sin(np.pi * (wave - lo) / (hi - lo)))
        strength = rng.exponential(1.0, n) * envelope
        ew = total * strength / strength.sum()
        hwhm = HWHM[species] * (1.0 + HWHM_SCATTER * rng.uniform(-1.0, 1.0, n))
        rows += [(w, species, e, h) for w, e, h in zip(wave, ew, hwhm, strict=True)]
    return rows


def main():
    print("# Telluric line list (a synthetic stand-in; see make_telluric_lines.py).")
    print("# wavelength: air, Angstrom; ew: equivalent width at airmass 1 and the reference")
    print("# water column, Angstrom; hwhm: Lorentzian half width, Angstrom.")
    print("wavelength,species,ew,hwhm")
    for w, species, ew, hwhm in lines():
        print(f"{w:.4f},{species},{ew:.6f},{hwhm:.5f}")


if __name__ == "__main__":
    main()
