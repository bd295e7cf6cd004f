"""Calibrate one exposure end to end: fit the standards, combine, apply, write, QC."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import xarray as xr

from ._atomic import check_output_directory
from ._datasets import with_variables
from .calibration import apply_calibration, combine_vectors
from .catalog import read_catalog
from .config import Config, load_config, second_order_options
from .errors import ExposureError, FluxCalError, FluxCalWarning, OutputExistsError
from .exposure import add_history, calibration_marks, open_exposure
from .fit.standards import fit_standards
from .grid import open_grid
from .products import write_calibrated
from .second_order import correct_second_order
from .spectrophotometry import check_exposure
from .xp import read_xp

__all__ = ["calibrate", "calibrate_exposure", "CalibrationResult", "output_name"]


@dataclass
class CalibrationResult:
    """What :func:`calibrate_exposure` produced for one exposure."""

    calibrated: xr.Dataset
    stars: xr.Dataset
    calibration: xr.Dataset
    path: Path | None = None
    warnings: tuple[str, ...] = ()

    def summary(self):
        """One line: stars used/rejected, the scatter between them, the quality grade."""
        status = self.calibration["star_status"].values
        used = int(self.calibration.attrs["fcalnstr"])
        rejected = [f"fiber {int(f)}: {s}" for f, s, u in zip(
            self.calibration["fiber"].values, status, self.calibration["used"].values,
            strict=True) if not u]
        rms = self.calibration.attrs.get("fcalrms")
        rms_text = "n/a (one star)" if rms is None or rms != rms else f"{100 * rms:.2f}%"
        quality = self.calibration.attrs.get("fcalqual")
        text = (f"{self.calibrated.attrs.get('expid')}: {used} standard(s) used, "
                f"{len(rejected)} rejected, rms between standards {rms_text}"
                + (f", quality {quality}" if quality else ""))
        if rejected:
            text += " [" + "; ".join(rejected) + "]"
        return text


def output_name(path):
    """``<name>_fluxcal.fits`` for a RED file ``<name>.fits`` (or .fit, .fits.gz)."""
    name = Path(path).name
    for suffix in (".fits.gz", ".fits", ".fit", ".fts"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}_fluxcal.fits"


def _output_target(path, out, in_place):
    """Where the product of ``path`` goes (None: nowhere)."""
    if in_place:
        # Through a symlink, the file it points at is the one calibrated: replacing the link
        # itself would leave that file (in the lake) uncalibrated.
        return Path(os.path.realpath(path))
    if out is None:
        return None
    out = Path(out)
    return out if out.suffix.lower() in (".fits", ".fit") else out / output_name(path)


def check_output(out, label="out"):
    """Refuse, before any work, an ``out`` (a directory, or a ``.fits`` file) that cannot be
    written; ``label`` is how the user gave it (e.g. ``"--out"``). None passes."""
    if out is None:
        return
    out = Path(out)
    one_file = out.suffix.lower() in (".fits", ".fit") and not out.is_dir()
    check_output_directory(out, label, for_file=one_file)


def _check_target(target, path, overwrite, in_place):
    """Refuse, before the fit, an output that could not be written after it."""
    if target.exists() and not in_place and os.path.samefile(target, path):
        raise FluxCalError(f"{target}: is the input file; refusing to overwrite it "
                           "(use in_place=True, CLI --in-place)")
    if target.exists() and not overwrite:
        raise OutputExistsError(target)
    check_output_directory(target, for_file=True)


def calibrate(exposure, catalog, grid, config=None, *, cache_dir=None, xp=None):
    """Fit the standards of an opened exposure, combine them and calibrate every fiber.

    Parameters
    ----------
    exposure, catalog, grid, config, cache_dir, xp
        Passed to :func:`kspec_fluxcal.fit_standards` (see it): the opened exposure, the
        catalog, the template grid or library, the options, where libraries are cached,
        and the standards' Gaia XP spectra.

    Returns
    -------
    CalibrationResult
        Not written anywhere (``path`` is None). The package's warnings (skipped stars, a
        single usable star...) are collected in ``warnings`` and the history. The
        spectrophotometric check (:func:`kspec_fluxcal.spectrophotometry.check_exposure`,
        which computes the program fibers' flux) is in ``calibrated``'s attrs.
    """
    config = Config() if config is None else config
    marks = calibration_marks(exposure)
    if marks:
        # A product given as input: its calibration vector would be replaced by one of ~1.
        raise ExposureError(exposure.attrs.get("source"), marks[0][0],
                            f"already flux-calibrated ({'; '.join(m for _, m in marks)}); "
                            "calibrate the RED file it was made from")
    # Every fiber, standards and targets alike, before the standards are fitted.
    exposure = correct_second_order(exposure, **second_order_options(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FluxCalWarning)
        stars = fit_standards(exposure, catalog, grid, config, cache_dir=cache_dir, xp=xp)
        calibration = combine_vectors(stars, config=config)
        calibrated = apply_calibration(exposure, calibration)
        add_history(calibrated, config.provenance())
        check_exposure(calibrated, catalog)
    notes = tuple(dict.fromkeys(str(w.message) for w in caught  # each once
                                if issubclass(w.category, FluxCalWarning)))
    for w in caught:
        if not issubclass(w.category, FluxCalWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    calibrated.attrs["history"] = [*calibrated.attrs["history"], *(f"note: {n}" for n in notes)]
    stars = with_variables(stars, {name: ("star", calibration.variables[name].values)
                                   for name in ("star_status", "grey_level", "used")})
    return CalibrationResult(calibrated, stars, calibration, None, notes)


def calibrate_exposure(path, catalog, grid, out=None, *, config=None, overwrite=False,
                       in_place=False, cache_dir=None, qc_dir=None, xp=None, **options):
    """Flux-calibrate one RED file: what ``kspec-fluxcal calibrate`` does for one file.

    Parameters
    ----------
    path : path-like
        The RED file (formats contract section 1). It is never modified, unless
        ``in_place``.
    catalog : path-like or xarray.Dataset
        Standard-star catalog (Refcat2 CSV) or its :func:`read_catalog` result.
    grid : path-like or xarray.Dataset
        Template grid store, :func:`open_grid` result or a prepared setup.
    out : path-like, optional
        Output directory (the file is ``<name>_fluxcal.fits`` in it) or ``.fits`` path;
        None: nothing is written.
    config : Config or path-like, optional
        Options (default: the package defaults).
    overwrite : bool
        Replace an existing output.
    in_place : bool
        Replace the input file with the calibrated one (atomically); for a symbolic link,
        the file it points at (the link stays).
    cache_dir : path-like, False or None
        Where template libraries are cached on disk (see
        :func:`kspec_fluxcal.prepare_library`); None: the default location, False: none.
    qc_dir : path-like, optional
        Write the QC plots and summary there: drawn from the written product (as
        :func:`kspec_fluxcal.qc.qc_from_file` does), or from the result when nothing is written.
    xp : path-like or xarray.Dataset, optional
        Gaia XP spectra of the standards (GaiaXPy layout, :func:`kspec_fluxcal.xp.read_xp`):
        the broad shape of each matched standard's model is fitted to it as well (README,
        "Gaia XP spectra").
    **options
        Configuration overrides, e.g. ``metric="huber"``, ``smooth=False``.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    FluxCalError
        Bad input (file, catalog, grid, config) or no usable standard star.
    """
    if not isinstance(config, Config):
        config = load_config(config)
    if options:
        config = config.replace(**options)
    if not isinstance(catalog, xr.Dataset):
        catalog = read_catalog(catalog)
    if not isinstance(grid, xr.Dataset):
        grid = open_grid(grid, chunks=False)  # a cached library reads no template
    if xp is not None and not isinstance(xp, xr.Dataset):
        xp = read_xp(xp)
    target = _output_target(path, out, in_place)
    if target is not None:
        overwrite = overwrite or in_place
        _check_target(target, path, overwrite, in_place)
    if qc_dir is not None:
        check_output_directory(qc_dir)
    result = calibrate(open_exposure(path), catalog, grid, config, cache_dir=cache_dir, xp=xp)
    if target is not None:
        write_calibrated(result.calibrated, target, overwrite=overwrite, stars=result.stars)
    result.path = target
    if qc_dir is not None:
        from .qc import qc_from_file, write_qc

        # From the written product when there is one: the same plots as `kspec-fluxcal qc`
        # and the demo draw from files.
        if target is not None:
            qc_from_file(target, qc_dir, telluric=config.masks.telluric)
        else:
            write_qc(result, qc_dir, telluric=config.masks.telluric)
    return result
