"""Astropy's FITS module imported on first use.

Importing ``astropy.io.fits`` imports astropy and, through ``astropy.utils.data``,
``astropy.units``: ~0.2 s of the ~1 s from a ``calibrate`` command's start to its first
exposure's calibration. A plain file is read (:mod:`kspec_fluxcal.fits_bytes`) and its
product written (:mod:`kspec_fluxcal.fits_cards`, :mod:`kspec_fluxcal.fits_file`) without
it: astropy is imported only where a file, header or card is not plain.
"""

from __future__ import annotations

import sys

__all__ = ["fits", "loaded_fits", "verify_error"]


def fits():
    """The ``astropy.io.fits`` module, imported on the first call."""
    from astropy.io import fits as module

    return module


def loaded_fits():
    """``astropy.io.fits`` if it was imported already, else None: an object of its classes
    (a Header, an HDU) exists only once it is, so this tells one apart without importing
    it."""
    return sys.modules.get("astropy.io.fits")


class _NeverRaised(Exception):
    """Stands for the exception class of a module not imported: nothing raises it."""


def verify_error():
    """Astropy's ``VerifyError``, for an ``except`` clause; while ``astropy.io.fits`` is not
    imported, nothing can have raised it, and a class that nothing raises stands for it."""
    module = sys.modules.get("astropy.io.fits.verify")
    return _NeverRaised if module is None else module.VerifyError
