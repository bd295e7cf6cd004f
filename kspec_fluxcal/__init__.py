"""kspec-fluxcal: spectrophotometric flux calibration for K-SPEC fiber spectra.

Standard stars observed in the same exposure are fitted with BOSZ 2024 templates (a labelled
Zarr cube), scaled to their catalog photometry and turned into a calibration vector that is
applied to every fiber; the whole survey re-runs as one Dask graph.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kspec-fluxcal")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .calibration import apply_calibration, combine_vectors
from .catalog import match_standards, query_photometry, read_catalog
from .config import Config, load_config
from .continuum import fit_continuum, normalize_continuum
from .errors import (
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
)
from .exposure import open_exposure, read_exposure_info, write_calibrated
from .grid import TemplateGrid, build_grid, open_grid
from .lsf import LineSpread
from .masks import load_regions, region_mask
from .matching import cross_correlate_rv, score_templates
from .photometry import synthetic_mag, teff_from_color
from .pipeline import CalibrationResult, calibrate_exposure
from .standards import fit_standards, template_library
from .templates import prepare_library, prepare_templates, prepared_templates
from .xp import read_xp

__all__ = [
    "__version__",
    # exposures and catalogs
    "open_exposure",
    "read_exposure_info",
    "write_calibrated",
    "read_catalog",
    "match_standards",
    "query_photometry",
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
    "fit_standards",
    "combine_vectors",
    "apply_calibration",
    "calibrate_exposure",
    "CalibrationResult",
    # configuration
    "Config",
    "load_config",
    # errors
    "FluxCalError",
    "InputError",
    "ExposureError",
    "CatalogError",
    "GridError",
    "ConfigError",
    "CalibrationError",
    "OutputExistsError",
    "DownloadError",
    "FluxCalWarning",
]
