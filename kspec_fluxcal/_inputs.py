"""The public building blocks' arguments, checked at the door: a path, an array or another
function's result where a Dataset is expected failed deep inside (``'str' object has no
attribute 'attrs'``, ``KeyError: 'status'``); the check says which argument and what it
should be."""

from __future__ import annotations

import xarray as xr

__all__ = ["expect_dataset", "refuse_repeated_columns", "glob_problem"]


def expect_dataset(value, name, function, made_by, needs=()):
    """Refuse ``value`` unless it is an xarray Dataset holding ``needs``.

    Parameters
    ----------
    value : object
        The argument.
    name, function : str
        The argument's and the function's names, for the message.
    made_by : str
        What makes such a Dataset (e.g. ``"kspec_fluxcal.open_exposure"``).
    needs : sequence of str
        Variables or coordinates it must have.

    Raises
    ------
    TypeError
        A :class:`~kspec_fluxcal.errors.FluxCalError` too, saying what was given instead.
    """
    from .errors import ArgumentError

    if not isinstance(value, xr.Dataset):
        raise ArgumentError(f"{function}: {name} must be an xarray.Dataset from {made_by}, "
                            f"not {type(value).__name__}")
    missing = [n for n in needs if n not in value.variables]
    if missing:
        raise ArgumentError(f"{function}: {name} has no {', '.join(missing)}: not a Dataset "
                            f"from {made_by}")


def refuse_repeated_columns(header, read, error, path, where="header line"):
    """Raise ``error(path, where, ...)`` when a column of ``read`` appears twice in a table's
    ``header``: which one holds the values? (Readers took the last, silently: a merged
    catalog's second g column of 99s dropped the band.) Repeated columns not read pass."""
    twice = [c for c in dict.fromkeys(header) if c in read and header.count(c) > 1]
    if twice:
        places = ", ".join(str(i + 1) for i, h in enumerate(header) if h == twice[0])
        raise error(path, where, f"column {twice[0]} appears {header.count(twice[0])} times "
                    f"(columns {places})")


def glob_problem(pattern):
    """What is wrong with ``pattern`` as a glob inside a directory ('' when nothing is):
    pathlib refuses an absolute one (NotImplementedError), and one with '..' finds nothing."""
    from pathlib import Path

    if not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        return "must be a glob relative to the lake directory, without '..' (e.g. '**/*.fits')"
    return ""
