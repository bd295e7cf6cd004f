"""Exceptions raised by kspec-fluxcal.

Every problem with user input is reported by a subclass of :class:`FluxCalError` whose
message names the file, the place in it (HDU, column, keyword, row) and what is wrong, so
that the command line can print it as one line without a traceback.
"""

from __future__ import annotations

import os

__all__ = [
    "FluxCalError",
    "InputError",
    "ExposureError",
    "CatalogError",
    "GridError",
    "ConfigError",
    "CalibrationError",
    "ArgumentError",
    "OutputExistsError",
    "OutputLockedError",
    "SchedulerLostError",
    "DownloadError",
    "FluxCalWarning",
]


class FluxCalError(Exception):
    """Base class of every error raised on purpose by kspec-fluxcal."""


class InputError(FluxCalError, ValueError):
    """A file or value given to kspec-fluxcal is not what the formats contract says.

    Parameters
    ----------
    path : str or path-like or None
        The file (or directory) at fault.
    where : str or None
        The place inside it: an HDU, a column, a keyword, a row.
    problem : str
        What is wrong, ideally with how to fix it.
    """

    def __init__(self, path, where, problem):
        self.path = None if path is None else os.fspath(path)
        self.where = where
        self.problem = problem
        parts = [p for p in (self.path, where) if p]
        super().__init__(": ".join([*parts, problem]))

    def __reduce__(self):
        # Rebuilt from its parts, so that it survives pickling (Dask process and distributed
        # workers send exceptions back to the client this way).
        return type(self), (self.path, self.where, self.problem)


class ExposureError(InputError):
    """A RED file (contract section 1) cannot be read or is inconsistent."""


class CatalogError(InputError):
    """The standard-star catalog (contract section 2) cannot be used."""


class GridError(InputError):
    """The template grid (contract section 3, or its Zarr cube) cannot be used."""


class ConfigError(InputError):
    """A configuration file or option is invalid."""


class CalibrationError(FluxCalError):
    """An exposure could not be calibrated (for example: no usable standard star).

    Parameters
    ----------
    message : str
        What failed.
    reasons : dict, optional
        Why each standard star was rejected, keyed by a star label.
    """

    def __init__(self, message, reasons=None):
        self.message = message
        self.reasons = dict(reasons or {})
        if self.reasons:
            detail = "; ".join(f"{k}: {v}" for k, v in self.reasons.items())
            message = f"{message} ({detail})"
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.message, self.reasons)


class ArgumentError(FluxCalError, TypeError):
    """A public function was given something else than it takes (a path where a Dataset is
    expected, another function's result): which argument, and what it should be."""


class OutputExistsError(FluxCalError, FileExistsError):
    """An output already exists and overwriting was not asked for."""

    def __init__(self, path):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: exists; pass overwrite=True (CLI: --overwrite) to "
                         "replace it")

    def __reduce__(self):
        return type(self), (self.path,)


class OutputLockedError(FluxCalError):
    """Another job is writing to the same output directory (it holds the lock file)."""


class SchedulerLostError(FluxCalError):
    """The survey job lost its Dask scheduler: it stops, what finished is committed, and
    ``--resume`` on a live cluster finishes the rest."""


class DownloadError(FluxCalError):
    """A download failed for good (after retries)."""


class FluxCalWarning(UserWarning):
    """Something was skipped or assumed; the result is still valid."""
