"""Quality-control plots and a text summary of one calibrated exposure.

The astronomer judges a calibration by looking at it: the combined vector and each star's,
how far every star departs from the combination, how well each template matches, how the
catalog photometry agrees with the scaled models, each standard's Gaia XP spectrum against
its model (when XP spectra were given), and one calibrated science spectrum.
Files are ``<expid>_<kind>.png`` and ``<expid>_summary.txt`` in the output directory, each
written atomically, and an exposure's files together.

Figures are drawn with :class:`matplotlib.figure.Figure` on an explicit Agg canvas, never
through pyplot: no global backend switch, no figure registry, so QC can run in Dask worker
threads next to each other and inside an interactive session without disturbing it.

The rooms: :mod:`kspec_fluxcal.qc.data` gathers what is drawn (one constructor, from a result
or from a file), :mod:`kspec_fluxcal.qc.plots` draws each kind of plot (with the helpers of
:mod:`kspec_fluxcal.qc.figures`), :mod:`kspec_fluxcal.qc.summary` writes the text; this module
writes the files.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

from .._atomic import atomic_file
from ..errors import FluxCalError, FluxCalWarning
from .data import _from_file, _from_result
from .figures import _DPI
from .plots import (
    _plot_calibration,
    _plot_photometry,
    _plot_residuals,
    _plot_spectrum,
    _plot_telluric,
    _plot_template_match,
    _plot_xp,
)
from .summary import _summary_text

__all__ = ["write_qc", "qc_from_file", "qc_directory", "check_distinct_names", "QC_PLOTS"]

#: Plot kinds, in the order they are written; each file is ``<expid>_<kind>.png``.
QC_PLOTS = ("calibration", "residuals", "telluric", "template_match", "photometry", "xp",
            "spectrum")


# ----------------------------------------------------------------------------- public API


def qc_directory(calibrated_dir):
    """Where the QC of the calibrated files in ``calibrated_dir`` goes: ``<dir>/qc``, files
    ``<expid>_<kind>.png`` (the one layout of ``calibrate --qc`` and the demo).

    Parameters
    ----------
    calibrated_dir : path-like
        The directory of the calibrated files.

    Returns
    -------
    pathlib.Path
    """
    return Path(calibrated_dir) / "qc"


def write_qc(result, out_dir, *, telluric="telluric_default"):
    """Write the QC plots and summary of a :class:`~kspec_fluxcal.CalibrationResult`.

    Parameters
    ----------
    result : CalibrationResult
        From :func:`kspec_fluxcal.calibrate_exposure` (its ``calibrated``, ``stars`` and
        ``calibration``; Dask-backed members are computed here).
    out_dir : path-like
        Output directory, created if needed. Existing QC files of the same exposure are
        replaced.
    telluric : str, path-like or sequence of (lo, hi)
        Telluric bands to mark (a mask name or file for :func:`kspec_fluxcal.load_regions`);
        use the mask the calibration was made with.

    Returns
    -------
    list of pathlib.Path
        The files written: ``<expid>_<kind>.png`` for each kind of :data:`QC_PLOTS` that
        could be drawn, then ``<expid>_summary.txt`` (which lists what was not drawn, and
        why).

    Warns
    -----
    FluxCalWarning
        When drawing one plot fails on unexpected data; the other files are still written.
        Errors writing a file (disk full, permissions) are raised, and an interruption
        (Ctrl-C) ends it: either leaves the previous versions of the exposure's files
        intact, none of the new ones published (but in the renames that publish them, a
        few file operations at the very end).
    """
    return _write(_from_result(result, telluric), out_dir)


def qc_from_file(path, out_dir, *, telluric="telluric_default"):
    """Write the QC plots and summary of a calibrated FITS file (formats contract section 4).

    The per-star plots (residuals, template match, photometry) need the FCALSTAR table that
    :func:`kspec_fluxcal.write_calibrated` writes when given ``stars``; without it only the
    combined vector and a calibrated spectrum are drawn, and the summary says so.

    Parameters
    ----------
    path : path-like
        A calibrated file.
    out_dir : path-like
        Output directory, created if needed.
    telluric : str, path-like or sequence of (lo, hi)
        Telluric bands to mark.

    Returns
    -------
    list of pathlib.Path
        The files written (see :func:`write_qc`).

    Raises
    ------
    ExposureError
        When the file cannot be read or carries no calibration (no FLUXCAL table).
    """
    return _write(_from_file(path, telluric), out_dir)


def check_distinct_names(paths, calibrated_only=False, directory_of=None):
    """Refuse, before any work, files whose QC would share names: QC files are named by
    EXPID, so a second file of the same exposure (a copy, a re-reduction) would replace the
    first's QC without a word.

    Parameters
    ----------
    paths : sequence of path-like
        RED or calibrated files about to be given QC. A file that is not a regular file or
        whose header cannot be read is passed over (its own error comes when its turn
        comes; a FIFO is not waited on), and so is one of ``calibrated_only`` that is not
        calibrated (it gets no QC).
    calibrated_only : bool
        Only calibrated files (FLUXCAL = T) count, as for ``kspec-fluxcal qc``.
    directory_of : callable, optional
        Where each file's QC goes (``calibrate --in-place --qc``: beside each file); by
        default all in one directory.

    Raises
    ------
    FluxCalError
        Naming the two files and their EXPID.
    """
    from astropy.io import fits

    from ..exposure.header import exposure_id

    seen = {}
    for path in paths if len(paths) > 1 else ():
        if not Path(path).is_file():
            continue
        try:
            header = fits.getheader(path)
        except Exception:  # astropy's errors on a damaged file vary
            continue
        if calibrated_only and header.get("FLUXCAL") is not True:
            continue
        expid = exposure_id(header, path)
        where = None if directory_of is None else directory_of(path)
        first = seen.setdefault((where, _safe_name(expid)), path)
        if first != path:
            raise FluxCalError(f"{first} and {path} are both exposure {expid}: their QC files "
                               "(named by EXPID) would replace each other; give them to "
                               "separate runs")


# ----------------------------------------------------------------------------- writing


def _safe_name(expid):
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", expid).strip("._")
    return name or "exposure"


def _write(qc, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _safe_name(qc.expid)
    drawers = {
        "calibration": _plot_calibration,
        "residuals": _plot_residuals,
        "telluric": _plot_telluric,
        "template_match": _plot_template_match,
        "photometry": _plot_photometry,
        "xp": _plot_xp,
        "spectrum": _plot_spectrum,
    }
    written, skipped = [], []
    summary = out_dir / f"{stem}_summary.txt"
    # The exposure's files are published together, once all are drawn (the summary, which
    # lists them, last): an interruption or a failed write leaves the previous set whole,
    # not some plots of each.
    with contextlib.ExitStack() as publish:
        summary_tmp = publish.enter_context(atomic_file(summary, overwrite=True))
        for kind in QC_PLOTS:
            try:
                fig, why = drawers[kind](qc)
            except Exception as err:  # one odd plot must not cost the others
                fig, why = None, f"drawing failed ({type(err).__name__}: {err})"
                warnings.warn(f"{qc.expid}: QC plot {kind}.png not drawn: {why}",
                              FluxCalWarning, stacklevel=3)
            if fig is None:
                skipped.append(f"{kind}.png: {why}")
                continue
            path = out_dir / f"{stem}_{kind}.png"
            with open(publish.enter_context(atomic_file(path, overwrite=True)), "wb") as fh:
                fig.savefig(fh, format="png", dpi=_DPI)
            written.append(path)
        text = _summary_text(qc, [p.name for p in written], skipped)
        Path(summary_tmp).write_text(text, encoding="utf-8")
    written.append(summary)
    return written


