"""NumPy submodules that SciPy asks for but no command uses, run only when first used.

Importing any SciPy module that works on arrays (``scipy.sparse``, ``scipy.special``) runs
``scipy._lib.array_api_compat.numpy``, which copies NumPy's namespace: ``getattr(numpy,
name)`` for every name of ``numpy.__all__`` and ``dir(numpy)``, and NumPy imports each of
its lazily loaded submodules when asked for it. ``numpy.f2py`` (the Fortran wrapper
generator; its parser compiles hundreds of regular expressions) and ``numpy.testing`` (with
``unittest``) cost 70-90 ms of ``calibrate``'s ~1 s start-up, and nothing runs their code.

:func:`defer_numpy_submodules` puts each of them in ``sys.modules`` (and in NumPy's
namespace) as a module whose code runs when a name it defines is first looked up, as
importlib's ``LazyLoader`` does, except that the attributes an import gives a module
(``__file__``, ``__spec__``, ``__path__``, ...) are there at once: ``inspect.getmodule``,
which astropy calls for each configuration item it defines, reads ``__file__`` of every
module in ``sys.modules``, and would run the code of ``LazyLoader``'s modules.
"""

from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["DEFERRED", "defer_numpy_submodules"]

#: The submodules deferred (NumPy itself imports them only when asked for them).
DEFERRED = ("numpy.f2py", "numpy.testing")


class _OnFirstUse(types.ModuleType):
    """A module whose code runs when a name it does not have yet is looked up (once: for
    modules nothing uses, not for ones that several threads may first use at once)."""

    def __getattr__(self, name):
        # Only for names not in the module's dict (its code has not run): run it, then look
        # again, as a plain module (a look-up during its code is a plain one too).
        self.__class__ = types.ModuleType
        try:
            self.__spec__.loader.exec_module(self)
        except BaseException:
            sys.modules.pop(self.__name__, None)  # as a failed import leaves it
            raise
        return getattr(self, name)


def defer_numpy_submodules(names=DEFERRED):
    """Defer the code of NumPy's submodules ``names`` to their first use.

    A submodule imported already, or not found, is left as it is.

    Returns
    -------
    list of str
        The submodules deferred.
    """
    import numpy

    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)  # __file__, __path__, ... set
        module.__class__ = _OnFirstUse
        sys.modules[name] = module
        setattr(numpy, name.rpartition(".")[2], module)
        deferred.append(name)
    return deferred
