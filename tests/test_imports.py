"""A command pays only for the modules it uses (issue 14), seen in a fresh process's
``sys.modules`` after the command: the package's import is light (its public names are
imported on first use), no single-process command imports dask.distributed, and matplotlib
comes only with QC plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Heavy packages that ``import kspec_fluxcal`` must leave alone.
NOT_ON_IMPORT = ("numpy", "scipy", "xarray", "astropy", "dask", "zarr", "distributed",
                 "matplotlib", "speclite", "bokeh")


def imported(code):
    """Modules (packages and their submodules) imported by running ``code`` in a fresh
    interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def command(*args):
    """Code running ``kspec-fluxcal args`` as the entry point does (its status checked)."""
    return ("from kspec_fluxcal.cli import main\ntry:\n"
            f"    status = main({[str(a) for a in args]!r})\n"
            "except SystemExit as exit:  # --help\n    status = exit.code\n"
            "assert not status, status")


def test_package_import_is_light_and_the_api_whole():
    assert not imported("import kspec_fluxcal") & set(NOT_ON_IMPORT)
    names = imported("import kspec_fluxcal as kf\nfor name in kf.__all__: getattr(kf, name)")
    assert "xarray" in names  # the names resolve (to the modules that define them)
    assert not names & {"distributed", "matplotlib", "bokeh"}


@pytest.mark.parametrize(("args", "absent", "present"), [
    pytest.param(lambda i, t: ("--help",), NOT_ON_IMPORT, (), id="help"),
    pytest.param(lambda i, t: ("info", i["red"]),
                 ("distributed", "matplotlib", "speclite", "bokeh", "zarr"), ("astropy",),
                 id="info"),
    pytest.param(lambda i, t: ("calibrate", i["red"], "--catalog", i["catalog"], "--grid",
                               i["cube"], "--out", t / "cal"),
                 # scipy.signal imports scipy.stats: 0.3 s, for the opt-in Savitzky-Golay only;
                 # scipy.interpolate (0.1 s with scipy.optimize): B-splines are our own;
                 # scipy.ndimage (0.1 s): median filters for opt-in methods only;
                 # scipy.spatial (0.1 s): a tree for position matches in large catalogs only
                 # dask (0.4-0.6 s with its array module): xarray imports it to ask whether
                 # data are Dask arrays or collections, and the grid is opened without Dask;
                 # numpy.f2py, numpy.testing (with unittest; 60-90 ms): SciPy asks NumPy for
                 # them, nothing uses them (deferred, their code never runs);
                 # astropy (0.2-0.4 s with astropy.units): a plain file is read and its
                 # product written without it
                 ("distributed", "matplotlib", "bokeh", "scipy.signal", "scipy.stats",
                  "scipy.interpolate", "scipy.optimize", "scipy.ndimage", "scipy.spatial",
                  "speclite", "dask", "numpy.f2py.f2py2e", "numpy.testing._private",
                  "unittest", "astropy"),
                 ("scipy",), id="calibrate"),
    pytest.param(lambda i, t: ("calibrate", i["red_gz"], "--catalog", i["catalog"], "--grid",
                               i["cube"], "--out", t / "cal"),
                 # a compressed file is not plain: astropy reads it
                 ("distributed", "matplotlib", "bokeh", "dask"), ("astropy.io.fits",),
                 id="calibrate-unusual-file"),
    pytest.param(lambda i, t: ("calibrate", i["red"], "--catalog", i["catalog"], "--grid",
                               i["cube"], "--out", t / "qc", "--qc"),
                 ("distributed", "bokeh"), ("matplotlib",), id="calibrate-qc"),
    pytest.param(lambda i, t: ("grid", "build", i["bosz"], "--out", t / "g.zarr", "--quiet"),
                 # filter curves are read from speclite's tables, without importing it;
                 # the store is created without Dask (its import was 0.6 s of CPU)
                 ("distributed", "matplotlib", "bokeh", "speclite", "dask"), ("zarr",),
                 id="grid-build"),
])
def test_commands_import_only_what_they_use(command_inputs, tmp_path, args, absent, present):
    names = imported(command(*args(command_inputs, tmp_path)))
    assert not names & set(absent)
    assert set(present) <= names


def test_deferred_dask_lookup_still_knows_dask_arrays():
    """xarray, told lazily of Dask's array type and collections (as ``calibrate`` does), writes
    and reads a Zarr store without importing Dask, and treats Dask arrays as such once they
    exist (lazy, chunked, computed by Dask), masked Dask arrays included."""
    code = (
        "from kspec_fluxcal._dask_on_demand import defer_dask_lookup\n"
        "assert defer_dask_lookup()\n"
        "import sys, numpy as np, xarray as xr\n"
        "import tempfile\n"
        "store = tempfile.mkdtemp() + '/s.zarr'\n"
        "xr.Dataset({'a': ('x', np.arange(3.0))}, coords={'x': [1.0, 2.0, 3.0]}).to_zarr(\n"
        "    store, consolidated=False)\n"
        "plain = xr.open_zarr(store, chunks=None, consolidated=False)\n"
        "assert float(plain['a'].sum()) == 3.0 and plain['a'].chunks is None\n"
        "assert 'dask' not in sys.modules\n"
        "import dask.array as da\n"
        "lazy = xr.DataArray(da.arange(4.0, chunks=2), dims='x')\n"
        "assert lazy.chunks == ((2, 2),) and isinstance(lazy.data, da.Array)\n"
        "assert float((lazy * 2).sum().compute()) == 12.0\n"
        "masked = da.ma.masked_less(da.arange(4.0, chunks=2), 1.0)\n"
        "assert np.isnan(xr.DataArray(masked, dims='x').values[0])\n"
        "assert not defer_dask_lookup()  # once is enough\n"
    )
    imported(code)  # its assertions fail the subprocess


def test_grid_build_workers_import_numpy_only():
    """A grid build's pool workers (spawned processes) import the module of the functions they
    run, and its parent packages: none of them imports xarray (0.3 s of CPU per worker)."""
    from kspec_fluxcal.grid.build import template_reader

    names = imported(f"import {template_reader.__module__}")
    assert "numpy" in names
    assert not names & {"xarray", "pandas", "scipy", "zarr", "dask", "astropy"}


def test_deferred_numpy_submodules_work_when_used():
    """NumPy's submodules that SciPy asks for are not run by SciPy's import (nor by
    ``inspect.getmodule``, which reads every module's ``__file__``), and work when used."""
    code = (
        "from kspec_fluxcal._numpy_on_demand import DEFERRED, defer_numpy_submodules\n"
        "assert defer_numpy_submodules() == list(DEFERRED)\n"
        "import inspect, sys, scipy.sparse, scipy.special, numpy as np\n"
        "eye = scipy.sparse.eye\n"
        "assert inspect.getmodule(eye.__code__) is sys.modules[eye.__module__]  # scans all\n"
        "assert 'numpy.f2py.f2py2e' not in sys.modules and 'unittest' not in sys.modules\n"
        "assert scipy.sparse.eye(2).toarray().trace() == 2.0\n"
        "from numpy.testing import assert_array_equal\n"
        "assert_array_equal(np.arange(2), [0, 1])\n"
        "assert 'unittest' in sys.modules and np.testing.assert_array_equal is assert_array_equal\n"
        "assert callable(np.f2py.run_main) and 'numpy.f2py.f2py2e' in sys.modules\n"
        "assert type(np.f2py) is type(np) and sys.modules['numpy.f2py'] is np.f2py\n"
        "assert defer_numpy_submodules() == []  # imported: nothing to defer\n"
    )
    imported(code)  # its assertions fail the subprocess


def test_deferred_numpy_submodule_first_used_by_threads_at_once():
    """Threads that first use a deferred module together all get it, as with an import under
    way (one runs its code, the others wait): 3 of 4 failed when the first one turned it into
    a plain module before its code had run."""
    code = (
        "from kspec_fluxcal._numpy_on_demand import defer_numpy_submodules\n"
        "assert 'numpy.testing' in defer_numpy_submodules()\n"
        "import threading, numpy as np\n"
        "barrier, errors = threading.Barrier(4), []\n"
        "def use(k):\n"
        "    barrier.wait()\n"
        "    try:\n"
        "        if k % 2:\n"
        "            from numpy.testing import assert_allclose\n"
        "            assert_allclose(1.0, 1.0)\n"
        "        else:\n"
        "            np.testing.assert_array_equal([1], [1])\n"
        "    except Exception as err:\n"
        "        errors.append(repr(err))\n"
        "threads = [threading.Thread(target=use, args=(k,)) for k in range(4)]\n"
        "for t in threads: t.start()\n"
        "for t in threads: t.join()\n"
        "assert not errors, errors\n"
    )
    imported(code)  # its assertions fail the subprocess


def test_deferred_numpy_submodule_imported_anew_after_a_failed_first_use():
    """A first use whose code fails leaves nothing behind: the next use imports the module
    anew (it had stayed a half-run module on ``numpy``: AttributeError ever after)."""
    code = (
        "from kspec_fluxcal._numpy_on_demand import defer_numpy_submodules\n"
        "assert 'numpy.testing' in defer_numpy_submodules()\n"
        "import sys, numpy as np\n"
        "loader = sys.modules['numpy.testing'].__spec__.loader\n"
        "real = loader.exec_module\n"
        "def fail(module):\n"
        "    raise OSError('disk gone')\n"
        "loader.exec_module = fail\n"
        "try:\n"
        "    np.testing.assert_allclose\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('the failure was not raised')\n"
        "loader.exec_module = real\n"
        "assert 'numpy.testing' not in sys.modules\n"
        "np.testing.assert_allclose(1.0, 1.0)\n"
        "import numpy.testing\n"
        "assert sys.modules['numpy.testing'] is np.testing\n"
    )
    imported(code)  # its assertions fail the subprocess


def test_simulator_imports_no_zarr():
    """The simulator reads BOSZ-layout files through the grid build's reader and writes FITS:
    importing its star sources does not import Zarr (0.2 s of every ``simulate``)."""
    assert "zarr" not in imported("import kspec_fluxcal.sim.star_sources")
