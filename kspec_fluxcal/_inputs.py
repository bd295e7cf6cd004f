"""The public building blocks' arguments, checked at the door: a path, an array or another
function's result where a Dataset is expected failed deep inside (``'str' object has no
attribute 'attrs'``, ``KeyError: 'status'``); the check says which argument and what it
should be."""

from __future__ import annotations

import xarray as xr

__all__ = ["expect_dataset"]


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
