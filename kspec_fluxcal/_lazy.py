"""Public names of a package imported on first use (PEP 562), so that importing the package
costs only what a command then uses."""

from __future__ import annotations

import importlib


def lazy_names(package, table, namespace, computed=None):
    """The module-level ``__getattr__`` and ``__dir__`` of a package with lazy public names.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    table : dict of str to str
        Public name -> the submodule (relative to ``package``) that defines it.
    namespace : dict
        The package's ``globals()``: a name, once loaded, is kept there, so later look-ups
        do not come back; its ``__all__`` lists the public names for ``dir()``.
    computed : dict of str to callable, optional
        Names whose value a function gives (``__version__``).

    Returns
    -------
    (callable, callable)
        ``__getattr__`` and ``__dir__``.
    """
    computed = computed or {}

    def __getattr__(name):
        if name in computed:
            value = computed[name]()
        elif name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(namespace["__all__"]))

    return __getattr__, __dir__
