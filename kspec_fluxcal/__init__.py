"""kspec-fluxcal: spectrophotometric flux calibration for K-SPEC fiber spectra.

Standard stars observed in the same exposure are fitted with BOSZ 2024 templates (a labelled
Zarr cube), scaled to their catalog photometry and turned into a calibration vector that is
applied to every fiber; the whole survey re-runs as one Dask graph.

The public names below are imported on first use (module ``__getattr__``, PEP 562): a
command pays only for the modules it needs (``kspec-fluxcal info`` never imports SciPy's
signal processing, a survey's client never imports matplotlib). The exceptions are light
and imported at once, so that ``except kspec_fluxcal.FluxCalError`` costs nothing.
"""

from . import errors as _errors
from ._lazy import lazy_names
from .errors import (  # noqa: F401 (public: __all__ lists errors.__all__)
    ArgumentError,
    CalibrationError,
    CatalogError,
    ConfigError,
    DownloadError,
    ExposureError,
    FluxCalError,
    FluxCalWarning,
    GridError,
    InputError,
    OutputExistsError,
    OutputLockedError,
    SchedulerLostError,
)

#: Public name -> the module (in this package) that defines it.
_LAZY = {
    **dict.fromkeys(("apply_calibration", "combine_vectors"), "calibration"),
    **dict.fromkeys(("match_standards", "read_catalog"), "catalog"),
    **dict.fromkeys(("Config", "load_config"), "config"),
    **dict.fromkeys(("fit_continuum", "normalize_continuum"), "continuum"),
    **dict.fromkeys(("open_exposure", "read_exposure_info"), "exposure"),
    "write_calibrated": "products",
    **dict.fromkeys(("TemplateGrid", "open_grid"), "grid"),
    "build_grid": "grid.build",
    "LineSpread": "lsf",
    **dict.fromkeys(("load_regions", "region_mask"), "masks"),
    "score_templates": "fit.matching",
    "cross_correlate_rv": "fit.velocity",
    **dict.fromkeys(("synthetic_mag", "teff_from_color"), "photometry"),
    **dict.fromkeys(("CalibrationResult", "calibrate_exposure"), "pipeline"),
    "fit_standards": "fit.standards",
    "template_library": "fit.exposure_templates",
    **dict.fromkeys(("prepare_library", "prepare_templates", "prepared_templates"), "templates"),
    "read_xp": "xp",
    "correct_second_order": "second_order",
}


def _package_version():
    # importlib.metadata costs tens of ms to import: paid when the version is first asked for.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kspec-fluxcal")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(),
                                  computed={"__version__": _package_version})


__all__ = [
    "__version__",
    # exposures and catalogs
    "open_exposure",
    "read_exposure_info",
    "write_calibrated",
    "read_catalog",
    "match_standards",
    "read_xp",
    # templates
    "build_grid",
    "open_grid",
    "TemplateGrid",
    "prepare_templates",
    "prepared_templates",
    "prepare_library",
    "template_library",
    "LineSpread",
    # photometry, masks, continuum, matching
    "synthetic_mag",
    "teff_from_color",
    "load_regions",
    "region_mask",
    "fit_continuum",
    "normalize_continuum",
    "cross_correlate_rv",
    "score_templates",
    # calibration
    "correct_second_order",
    "fit_standards",
    "combine_vectors",
    "apply_calibration",
    "calibrate_exposure",
    "CalibrationResult",
    # configuration
    "Config",
    "load_config",
    # errors
    *_errors.__all__,
]
