"""The QC summary of one calibrated exposure: a text file of what was calibrated, with which
stars, what was rejected and why, the notes and the history."""

from __future__ import annotations

import numpy as np

from .figures import _coord, _fmt, _label


def _check_lines(attrs):
    """The survey model used (FCALMOD) and the spectrophotometric check (FCALSP*)."""
    lines = [f"survey model (FCALMOD): {attrs['model_id']}"] if attrs.get("model_id") else []
    n = int(attrs.get("sphot_n") or 0)
    if not n:
        return [*lines, "spectrophotometric check: no program star with catalog photometry"]
    bands = ", ".join(f"{b} {attrs[f'sphot_{b}']:+.3f}" for b in "gri"
                      if attrs.get(f"sphot_{b}") is not None)
    scatter = attrs.get("sphot_scatter")
    return [*lines, f"spectrophotometric check (FCALSP*): {n} program star(s), median "
            f"synthetic - catalog {bands} mag"
            + (f", scatter {scatter:.3f} mag" if scatter is not None else "")]


def _quality_lines(attrs):
    """The grade, the model error, the line-spread width and the telluric columns (FCALQUAL,
    FCALMERR, FCALLSF, FCALO2, FCALH2O), those the exposure has (a grade-D exposure showed
    its grade only inside a HISTORY line)."""
    def value(key, form):
        v = attrs.get(key)
        return form.format(v) if isinstance(v, (int, float)) and np.isfinite(v) and v >= 0 \
            else "n/a"

    lines = [f"quality grade (FCALQUAL): {attrs['fcalqual']}"] if attrs.get("fcalqual") else []
    return [*lines,
            f"model error of the standards (FCALMERR): {value('fcalmerr', '{:.2%}')}",
            f"error of the calibration's level, every pixel (FCALLERR): "
            f"{value('fcallerr', '{:.2%}')}",
            f"line-spread width / the header's (FCALLSF): {value('fcallsf', '{:.3f}')}",
            f"telluric columns (FCALO2, FCALH2O): O2 {value('fcalo2', '{:.3f}')}, "
            f"H2O {value('fcalh2o', '{:.3f}')}"]


def _summary_text(qc, written, skipped):
    nstar = qc.status.size
    lines = [
        f"kspec-fluxcal QC summary for exposure {qc.expid}",
        f"source: {qc.source}",
        f"calibration source (FCALSRC): {qc.fcalsrc}",
        f"standards used (FCALNSTR): {qc.fcalnstr}"
        + (f" of {nstar}" if qc.stars is not None else " (per-star table not available)"),
        f"single-star calibration: {'yes' if qc.single_star else 'no'}",
        "FCALRMS (fractional rms between the standards): "
        + (f"{qc.fcalrms:.5f} ({100 * qc.fcalrms:.2f}%)" if np.isfinite(qc.fcalrms)
           else "n/a" + (" (one star)" if qc.fcalnstr == 1 else "")),
        *_quality_lines(qc.exposure.attrs),
        *_check_lines(qc.exposure.attrs),
    ]
    measured = int(qc.cal_mask.sum())
    lines.append(f"calibration vector: {qc.wavelength.size} pixels, "
                 f"{qc.wavelength[0]:.1f}-{qc.wavelength[-1]:.1f} A, "
                 f"{qc.wavelength.size - measured} bridged (not measured)")
    for note in qc.notes:
        lines.append(f"NOTE: {note}")
    if qc.stars is not None:
        lines += ["", f"standard stars ({nstar}):"]
        if nstar:
            lines += _star_table(qc)
        rejected = [s for s in range(nstar) if not qc.used[s]]
        lines += ["", f"rejected ({len(rejected)}):"]
        lines += [f"  {_label(qc, s)}: {qc.status[s]}" for s in rejected] or ["  none"]
    lines += ["", f"warnings ({len(qc.warnings)}):"]
    lines += [f"  {w}" for w in qc.warnings] or ["  none"]
    lines += ["", f"history ({len(qc.history)}):"]
    lines += [f"  {h}" for h in qc.history] or ["  none"]
    lines += ["", "plots written:"]
    lines += [f"  {name}" for name in written] or ["  none"]
    if skipped:
        lines += ["plots not drawn:"] + [f"  {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def _star_table(qc):
    stars = qc.stars
    columns = [  # header, width, value of star s
        ("fiber", 6, lambda s: str(int(stars["fiber"].values[s])) if "fiber" in stars.variables
         else str(s)),
        ("name", 10, lambda s: str(stars["fiber_name"].values[s]).strip()
         if "fiber_name" in stars.variables else ""),
        ("objid", 20, lambda s: str(int(stars["objid"].values[s])) if "objid" in stars.variables
         else ""),
        ("used", 5, lambda s: "yes" if qc.used[s] else "no"),
        ("grey", 7, lambda s: _fmt(qc.grey[s], ".3f")),
        ("teff", 7, lambda s: _fmt(_coord(stars, "teff", s), ".0f")),
        ("logg", 6, lambda s: _fmt(_coord(stars, "logg", s), ".2f")),
        ("feh", 6, lambda s: _fmt(_coord(stars, "feh", s), "+.2f")),
        ("rv", 8, lambda s: _fmt(_coord(stars, "rv", s), "+.1f")),
        ("ebv", 6, lambda s: _fmt(_coord(stars, "ebv", s), ".3f")),
        ("chi2/dof", 9, lambda s: _fmt(_coord(stars, "chi2_dof", s), ".2f")),
        ("snr", 7, lambda s: _fmt(_coord(stars, "snr", s), ".1f")),
        ("phot_rms", 9, lambda s: _fmt(_coord(stars, "phot_rms", s), ".3f")),
        ("bands", 6, lambda s: _fmt(_coord(stars, "n_bands", s), ".0f")),
        ("dropped", 12, lambda s: (str(stars["dropped_bands"].values[s]).strip() or "-")
         if "dropped_bands" in stars.variables else "-"),
        ("xp", 4, lambda s: "-" if "xp_used" not in stars.variables
         or str(_coord(stars, "xp_match", s)) in ("none", "")
         else "yes" if bool(_coord(stars, "xp_used", s)) else "no"),
    ]
    head = " ".join(f"{h:>{w}}" for h, w, _ in columns) + "  status"
    rows = ["  " + head]
    for s in range(qc.status.size):
        rows.append("  " + " ".join(f"{f(s):>{w}}" for _, w, f in columns) + f"  {qc.status[s]}")
    return rows
