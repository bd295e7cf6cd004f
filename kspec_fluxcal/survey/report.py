"""What a survey run did (:class:`SurveyReport`: exposures calibrated, skipped, failed, their
quality and notes, the survey model's summary) and where it is kept (``OUT/notes.json``,
``OUT/quality.csv``).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SurveyReport", "write_notes"]


@dataclass
class SurveyReport:
    """What a survey run did.

    Attributes
    ----------
    calibrated, skipped, fallback, model_only : list of str
        EXPIDs calibrated in this run, skipped as archived with the same inputs (resume),
        calibrated from the archive, and from the survey model alone (no usable standard;
        subsets of ``calibrated``).
    model : dict of str to dict
        Per setup whose survey model was fitted in this run: its summary (exposures and
        nights fitted, outliers, the error model, exposures recalibrated), or why none was.
    failed : dict of str to str
        EXPID (or file, when it could not be read) -> reason.
    notes : dict of str to list of str
        Warnings raised while calibrating an exposure (skipped stars, numerical warnings),
        collected in the workers so that they reach the report rather than a worker's stderr.
    quality : dict of str to dict
        Per calibrated EXPID: ``grade`` (FCALQUAL), ``used`` and ``standards`` (stars used,
        standard fibers), ``fcalrms``, ``fcalmerr``, ``fcallsf``.
    planned : list of str
        EXPIDs of the lake's readable RED files: the exposures the survey has now (what
        ``notes.json`` and ``quality.csv`` keep from earlier runs is limited to them).
    fitted : list of str
        EXPIDs whose standards were fitted in this run (the first pass finished, calibrated
        or failed); an exposure only recalibrated with the survey model is not among them.
    archive : pathlib.Path
    notes_file : pathlib.Path or None
        ``OUT/notes.json``, where the notes and failures are kept (see :func:`write_notes`).
    dashboard : str or None
        Link to the Dask dashboard (None when nothing had to be computed).
    elapsed : float
        Seconds.
    out : pathlib.Path or None
        The survey's output directory, where :meth:`save` writes (set by the job).
    """

    calibrated: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    fallback: list = field(default_factory=list)
    model_only: list = field(default_factory=list)
    model: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    planned: list = field(default_factory=list)
    fitted: list = field(default_factory=list)
    archive: Path | None = None
    notes_file: Path | None = None
    dashboard: str | None = None
    elapsed: float = 0.0
    out: Path | None = None
    _saved_at: float = field(default=-float("inf"), repr=False)

    #: Seconds between saves of ``notes.json`` and ``quality.csv`` during a run
    #: (:meth:`checkpoint`): a job killed by SIGKILL runs no clean-up and loses at most
    #: that much of them (it lost all of its run's).
    CHECKPOINT = 30.0

    def save(self):
        """Write ``out/notes.json`` and ``out/quality.csv``; returns the latter's path."""
        write_notes(self.out, self)
        self._saved_at = time.monotonic()
        return self.write_quality(Path(self.out) / "quality.csv")

    def checkpoint(self):
        """:meth:`save` when :attr:`CHECKPOINT` seconds have passed since the last (after an
        archive commit: they then describe what is committed)."""
        if self.out is not None and time.monotonic() - self._saved_at >= self.CHECKPOINT:
            self.save()

    @property
    def ok(self):
        """True when every exposure was calibrated or deliberately skipped (up to date)."""
        return not self.failed

    #: Exposures listed one per line in :meth:`summary` up to this many.
    LISTED = 50

    def summary(self):
        """A short multi-line summary: counts, quality grades, failures."""
        lines = [f"{len(self.calibrated)} calibrated ({len(self.fallback)} from the archive), "
                 f"{len(self.skipped)} skipped as up to date, {len(self.failed)} failed, "
                 f"in {self.elapsed:.1f} s"]
        grades = [q["grade"] for q in self.quality.values()]
        if grades:
            lines.append("  quality: " + ", ".join(f"{g} {grades.count(g)}"
                                                   for g in sorted(set(grades))))
        lines += [f"  survey model, setup {setup}: {_model_text(m)}"
                  for setup, m in sorted(self.model.items())]
        if len(self.quality) <= self.LISTED:
            lines += [f"  {expid}: {_quality_text(q)}" for expid, q in sorted(self.quality.items())]
        if self.notes or self.notes_file:
            where = f"; notes and failures: {self.notes_file}" if self.notes_file else ""
            lines.append(f"  {len(self.notes)} exposure(s) with notes in this run{where}")
        lines += [f"  {line}" for line in self.failure_lines()]
        if len(self.failed) > self.LISTED:  # 5000 duplicate files are not 5000 lines
            lines.append(f"  ... and {len(self.failed) - self.LISTED} more failure(s)"
                         + (f": {self.notes_file}" if self.notes_file else ""))
        return "\n".join(lines)

    def failure_lines(self, limit=LISTED):
        """``FAILED <name>: <reason>`` per failure, sorted; the first ``limit`` (None: all)."""
        failed = sorted(self.failed.items())[:limit]
        return [f"FAILED {name}: {reason}" for name, reason in failed]

    def write_quality(self, path):
        """Write the per-exposure quality table (CSV) atomically: this run's exposures, and
        the rows of an earlier table for the survey's other exposures (skipped as up to
        date, or not reached before an interruption), so that it lists the whole survey."""
        from .._atomic import atomic_file

        holds = self._still_holds()
        rows = {expid: row for expid, row in _saved_rows(path).items() if holds(expid)}
        for expid, q in self.quality.items():
            rows[expid] = [expid, "calibrated", q["grade"], q["used"], q["standards"],
                           f"{q['fcalrms']:.5f}", f"{q['fcalmerr']:.5f}", f"{q['fcallsf']:.4f}",
                           q.get("source", "standards"), ""]
        for name, reason in self.failed.items():
            rows[name] = [name, "failed", "", "", "", "", "", "", "", reason]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(_QUALITY_COLUMNS)
        writer.writerows(rows[key] for key in sorted(rows))
        with atomic_file(path, overwrite=True) as tmp:
            Path(tmp).write_text(text.getvalue())
        return Path(path)

    def _still_holds(self):
        """A test of whether an earlier run's entry for a key (EXPID, or the lake path of a
        file that could not be planned) still holds: an exposure the survey still has that
        this run did not calibrate or fail. Without a plan (``planned`` empty), any such
        exposure. (Sets: a survey has up to ~10^5 exposures.)"""
        redone = set(self.calibrated) | set(self.failed) | set(self.fitted)
        planned = set(self.planned)
        return lambda key: key not in redone and (not planned or key in planned)


#: The columns of ``quality.csv``.
_QUALITY_COLUMNS = ("expid", "status", "quality", "used", "standards", "fcalrms", "fcalmerr",
                    "fcallsf", "source", "reason")


def _saved_rows(path):
    """The rows of an existing quality table by EXPID (none when absent or unreadable)."""
    try:
        with open(path, newline="") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not table or tuple(table[0]) != _QUALITY_COLUMNS:
        return {}
    return {row[0]: row for row in table[1:] if len(row) == len(_QUALITY_COLUMNS)}


def _model_text(m):
    if "skipped" in m:
        return m["skipped"]
    return (f"{m['exposures']} exposures over {m['nights']} night(s) fitted, "
            f"{m['outliers']} outlier(s); exposures scatter {100 * m['tau']:.2f}% about it, "
            f"one standard {100 * m['sigma_star']:.2f}% (medians over wavelength); "
            f"{m['recalibrated']} recalibrated with it, {m['model_only']} from it alone")


def _quality_text(q):
    def shown(value, form):  # an exposure calibrated from the model alone has no fit
        return form.format(value) if np.isfinite(value) else "n/a"

    source = f", {q['source']}" if q.get("source", "standards") != "standards" else ""
    return (f"quality {q['grade']}, {q['used']}/{q['standards']} standards, "
            f"rms {shown(100 * q['fcalrms'], '{:.2f}%')}, "
            f"model error {shown(100 * q['fcalmerr'], '{:.1f}%')}, "
            f"LSF {shown(q['fcallsf'], 'x{:.3f}')}{source}")


def write_notes(out, report):
    """Keep the notes and failures of a run in ``out/notes.json``, atomically.

    The file maps EXPID (or, for files that could not be planned, their path under the
    lake) to notes (``"notes"``) and to the reason of a failure (``"failed"``). An exposure
    whose standards were fitted in this run (:attr:`SurveyReport.fitted`) gets this run's
    notes only; one only recalibrated with the survey model keeps its notes, but for an
    earlier model stage's, and gets the new ones added; one skipped as up to date keeps its
    notes. Failures are this run's and
    those of the survey's exposures it did not reach (an interrupted run); entries of
    exposures no longer in the lake are dropped.

    Parameters
    ----------
    out : path-like
        The survey's output directory.
    report : SurveyReport
        The run's report.

    Returns
    -------
    pathlib.Path
        The file; also set as ``report.notes_file``.
    """
    from .._atomic import atomic_file

    path = Path(out) / "notes.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    fitted, planned = set(report.fitted), set(report.planned)
    notes = {k: v for k, v in saved.get("notes", {}).items()
             if k not in fitted and (not planned or k in planned)}
    for expid in set(report.calibrated) & set(notes):
        # Calibrated in this run with the survey model: the notes of an earlier run's model
        # stage (a failed recalibration...) no longer hold; this run's are added below.
        notes[expid] = [n for n in notes[expid] if not n.lower().startswith("survey model")]
    for expid, new in report.notes.items():
        notes[expid] = list(dict.fromkeys(notes.get(expid, []) + list(new)))
    holds = report._still_holds()
    failed = {k: v for k, v in saved.get("failed", {}).items() if holds(k)}
    failed.update(report.failed)
    kept = {"notes": notes, "failed": failed}
    text = json.dumps({"updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **kept}, indent=1,
                      sort_keys=True)
    with atomic_file(path, overwrite=True) as tmp:
        Path(tmp).write_text(text + "\n")
    report.notes_file = path
    return path
