"""Reading BOSZ 2024 spectrum files for the grid build, in this process or in a pool.

Kept outside :mod:`kspec_fluxcal.grid` and light (NumPy only): a pool's worker process
imports this module, and with it its parent packages; inside ``grid`` it imported that
package's ``__init__`` and with it xarray and pandas, 0.3 s of CPU per worker before its
first file.
"""

from __future__ import annotations

import contextlib
import gzip
import multiprocessing
import tempfile
from pathlib import Path

import numpy as np

from ._signals import starting_workers
from .constants import EBV_REFERENCE, EBV_SLOPE_REFERENCE
from .errors import GridError

__all__ = ["read_bosz_spectrum", "band_matrix", "template_reader"]

#: BOSZ files hold Eddington fluxes H: the surface flux is F = 4 pi H (and the continuum 4 pi C).
_SURFACE = 4.0 * np.pi


def read_bosz_spectrum(path, nwave):
    """Read one BOSZ 2024 spectrum file: surface flux 4*pi*H and continuum 4*pi*C.

    Parameters
    ----------
    path : path-like
        A ``.txt.gz`` file with two columns, H and C, one row per grid wavelength.
    nwave : int
        Number of rows expected (the wavelength file's length).

    Returns
    -------
    flux, continuum : numpy.ndarray (float64)
    """
    values = _read_values(path, nwave)
    return _SURFACE * values[:, 0], _SURFACE * values[:, 1]


def _read_values(path, nwave):
    """The file's H and C, shape (nwave, 2), checked (see :func:`read_bosz_spectrum`)."""
    try:
        # numpy's C parser given the path (it decompresses .gz itself): ~35% faster than
        # split() + float(), and much faster than given a gzip file object.
        values = np.loadtxt(path, dtype=np.float64, comments=None, ndmin=2)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise GridError(path, None, f"not a readable gzip file ({err})") from None
    except ValueError:
        values = np.zeros(0)  # a malformed row: diagnosed below
    if values.size != 2 * nwave:
        _diagnose(path, nwave)
    values = values.reshape(nwave, 2)
    if not np.all(np.isfinite(values)):
        row = int(np.flatnonzero(~np.all(np.isfinite(values), axis=1))[0])
        raise GridError(path, f"row {row + 1}", "non-finite value (NaN or inf)")
    return values


def _diagnose(path, nwave):
    """Raise the GridError saying what is wrong with a file that did not parse (slow path)."""
    with gzip.open(path, "rb") as fh:
        text = fh.read()
    try:
        np.array(text.split(), dtype=np.float64)
    except ValueError as err:
        raise GridError(path, None, f"non-numeric value ({err})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != nwave:
        raise GridError(path, None, f"has {len(lines)} rows, the wavelength file has {nwave}")
    row = next(i for i, ln in enumerate(lines) if len(ln.split()) != 2)
    raise GridError(path, f"row {row + 1}",
                    f"has {len(lines[row].split())} columns, expected 2 (H and C)")


def band_matrix(weights, reddened):
    """The band weights, plain and reddened by each law, as one compact matrix.

    Parameters
    ----------
    weights : numpy.ndarray, shape (nband, nwave)
        Photon-weighted band weights on the files' full wavelength grid.
    reddened : sequence of numpy.ndarray, shape (nband, nwave)
        The same weights times each law's extinction at
        :data:`~kspec_fluxcal.constants.EBV_REFERENCE`, then at
        :data:`~kspec_fluxcal.constants.EBV_SLOPE_REFERENCE`.

    Returns
    -------
    (matrix, span)
        ``matrix`` (nband * (1 + nlaw), span length): rows of ``weights`` then of each
        reddened set, restricted to ``span``, the slice of wavelengths where any weight is
        non-zero (the bands cover a third of BOSZ's 500-320000 A): one matrix-vector product
        per file gives every magnitude, and a pool's workers receive a third of the data.
    """
    full = np.concatenate([weights, *reddened], axis=0)
    used = np.flatnonzero(np.any(full != 0, axis=0))
    span = slice(int(used[0]), int(used[-1]) + 1) if used.size else slice(0, 0)
    return np.ascontiguousarray(full[:, span]), span


def template_products(path, nwave, trim, matrix, span, nband):
    """Everything the store needs from one file: trimmed flux and continuum (float32), AB
    magnitudes (band), extinction coefficients A_b / E(B-V) and their slope with E(B-V)
    (law, band); see :func:`band_matrix`."""
    values = _read_values(path, nwave)
    # 4 pi H and 4 pi C only where used (the bands' span, the kept range: a third of the
    # file's values), the same numbers as read_bosz_spectrum's.
    maggies = matrix @ (_SURFACE * values[span, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        mags = np.where(maggies > 0, -2.5 * np.log10(maggies), np.nan)
    mag, red = mags[:nband], mags[nband:].reshape(2, -1, nband)
    coeff = (red[0] - mag[None, :]) / EBV_REFERENCE
    further = (red[1] - mag[None, :]) / EBV_SLOPE_REFERENCE
    slope = (further - coeff) / (EBV_SLOPE_REFERENCE - EBV_REFERENCE)
    return ((_SURFACE * values[trim, 0]).astype(np.float32),
            (_SURFACE * values[trim, 1]).astype(np.float32), mag, coeff, slope)


@contextlib.contextmanager
def template_reader(workers, nwave, trim, matrix, span, nband):
    """A function reading files into :func:`template_products`, in order, with ``workers``
    processes (1: in this process).

    The pool (spawned processes that import only this module) lives as long as the
    ``with`` block: closed when the block completes, terminated when it raises (a bad file,
    Ctrl-C), and joined either way, so that no reader outlives the build.

    Yields
    ------
    callable
        ``read(paths)``: an iterator of the files' products, in the order of ``paths``;
        workers keep reading ahead while the caller writes what it has.
    """
    if workers <= 1:
        yield lambda paths: (template_products(path, nwave, trim, matrix, span, nband)
                             for path in paths)
        return
    with tempfile.TemporaryDirectory(prefix="kspec-grid-build-") as tmp:
        # The band matrix (~10 MB) goes through a file each worker maps: given to the pool
        # as an argument, it is written into each worker's pipe, which blocks until that
        # worker has started up, so the workers would start one after the other.
        shared = Path(tmp) / "bands.npy"
        np.save(shared, matrix)
        with starting_workers():
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_start_worker,
                initargs=(nwave, trim, str(shared), span, nband))
        try:
            yield lambda paths: pool.imap(_worker_products, paths)
        except BaseException:
            pool.terminate()
            raise
        else:
            pool.close()
        finally:
            pool.join()


#: What a pool worker keeps between files (set once by :func:`_start_worker`).
_WORKER = {}


def _start_worker(nwave, trim, matrix_file, span, nband):
    """A pool worker's initializer: the shared inputs, received once."""
    _WORKER["inputs"] = (nwave, trim, np.load(matrix_file), span, nband)


def _worker_products(path):
    return template_products(path, *_WORKER["inputs"])
