"""NumPy submodules that SciPy asks for but no command uses, run only when first used.

Importing any SciPy module that works on arrays (``scipy.sparse``, ``scipy.special``) runs
``scipy._lib.array_api_compat.numpy``, which copies NumPy's namespace: ``getattr(numpy,
name)`` for every name of ``numpy.__all__`` and ``dir(numpy)``, and NumPy imports each of
its lazily loaded submodules when asked for it. ``numpy.f2py`` (the Fortran wrapper
generator; its parser compiles hundreds of regular expressions) and ``numpy.testing`` (with
``unittest``) cost 60-90 ms of ``calibrate``'s ~1 s start-up, and nothing runs their code.

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
import threading
import types

__all__ = ["DEFERRED", "defer_numpy_submodules"]

#: The submodules deferred (NumPy itself imports them only when asked for them).
DEFERRED = ("numpy.f2py", "numpy.testing")

#: Held while a deferred module's code runs: another thread's first use waits for it, as it
#: would for an import under way (a re-entrant lock: that code may import other modules).
_LOCK = threading.RLock()
_RUNNING = set()


class _OnFirstUse(types.ModuleType):
    """A module whose code runs when a name it does not have yet is looked up."""

    def __getattr__(self, name):
        # Only for names not in the module's dict. The class changes once the code has run:
        # a thread that came in meanwhile then finds the name (or a plain AttributeError).
        with _LOCK:
            if type(self) is _OnFirstUse and self.__name__ not in _RUNNING:
                _run(self)
        if type(self) is _OnFirstUse:  # its own code looking itself up, half run
            raise AttributeError(f"partially initialized module {self.__name__!r} has no "
                                 f"attribute {name!r}")
        return getattr(self, name)


def _run(module):
    """Run a deferred module's code; on failure, leave no trace of it (the next use imports
    it anew, as after a failed import)."""
    _RUNNING.add(module.__name__)
    try:
        module.__spec__.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module.__name__, None)
        parent, _, short = module.__name__.rpartition(".")
        vars(sys.modules[parent]).pop(short, None)
        raise
    finally:
        _RUNNING.discard(module.__name__)
    module.__class__ = types.ModuleType


def defer_numpy_submodules(names=DEFERRED):
    """Defer the code of NumPy's submodules ``names`` to their first use.

    A submodule imported already, or not found, is left as it is.

    Parameters
    ----------
    names : sequence of str
        Full names of the submodules (their parent package imported first).

    Returns
    -------
    list of str
        The submodules deferred.
    """
    import numpy  # noqa: F401 (the parent of the default names)

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
        parent, _, short = name.rpartition(".")
        setattr(sys.modules[parent], short, module)
        deferred.append(name)
    return deferred
