"""The simulation kit: simulated surveys with known truth, synthetic template grids, the
comparison of a calibration with the truth, and the demo.

It sits above the pipeline: it may import pipeline modules (to write RED files, convolve
spectra, calibrate in the demo), and no pipeline module imports it.

- The simulator: :mod:`.setups` (instrument setups), :mod:`.star_sources` (where simulated
  stars come from), :mod:`.spectra` and :mod:`.targets` (what the fibers hold),
  :mod:`.optics` (pixels and true line spread), :mod:`.atmosphere` (extinction, tellurics,
  sky), :mod:`.conditions` (what is drawn per night and exposure), :mod:`.fiber_losses` and
  :mod:`.counts` (from flux to noisy counts), :mod:`.refcat` (the catalog),
  :mod:`.xp_spectra` (Gaia XP), :mod:`.exposure` (one exposure and its truth) and
  :mod:`.survey` (a survey written to disk).
- Synthetic template grids: :mod:`.stellar_lines` and :mod:`.stellar_model` (the synthetic
  stellar model), :mod:`.bosz_files` (the BOSZ 2024 file layout), :mod:`.synthetic_grid`
  (writing a grid) and :mod:`.ck04` (the Castelli & Kurucz 2004 grid in that layout).
- Truth comparison: :mod:`.accuracy`. The demo: :mod:`.demo`.

The public names below are imported on first use, as the package's own are.
"""

from .._lazy import lazy_names

#: Public name -> the module (in this subpackage) that defines it.
_LAZY = {
    **dict.fromkeys(("Setup", "DEFAULT_SETUP", "ISOPLANE_SETUP", "LARGE_SETUP"), "setups"),
    **dict.fromkeys(("GridStars", "GridNodes", "ModelStars", "CalspecStars"), "star_sources"),
    "doppler_shift": "spectra",
    **dict.fromkeys(("atmospheric_extinction", "telluric_transmission"), "atmosphere"),
    **dict.fromkeys(("CATALOG_HEADER", "parallax", "gaia_parallax_error", "write_catalog"),
                    "refcat"),
    **dict.fromkeys(("xp_rows", "write_xp"), "xp_spectra"),
    **dict.fromkeys(("SimulatedExposure", "simulate_exposure"), "exposure"),
    "simulate_survey": "survey",
    **dict.fromkeys(("LINE_LIST_SEED", "LineList", "DEFAULT_LINES", "line_list"),
                    "stellar_lines"),
    **dict.fromkeys(("ModelFamily", "FAMILY_A", "FAMILY_B", "MODEL_FAMILIES",
                     "synthetic_spectrum"), "stellar_model"),
    **dict.fromkeys(("bosz_wavelength_grid", "bosz_filename"), "bosz_files"),
    **dict.fromkeys(("SYNTHETIC_MARKER", "GENERATOR_VERSION", "write_synthetic_grid"),
                    "synthetic_grid"),
    **dict.fromkeys(("read_ck04_file", "convert_ck04"), "ck04"),
    **dict.fromkeys(("compare_with_truth", "star_summary", "with_true_calibration"),
                    "accuracy"),
    **dict.fromkeys(("run_demo", "accuracy_table"), "demo"),
}


__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
