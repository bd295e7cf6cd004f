"""The Castelli & Kurucz (2004) ATLAS9 grid as a template grid in the BOSZ 2024 layout.

The STScI/CDBS packaging of the grid (``ck{m25..p05}/ck*_{teff}.fits``: one FITS table per
metallicity and Teff, with a ``WAVELENGTH`` column and one surface-flux column per log g,
``g00`` .. ``g50``) is rewritten file for file in the layout of formats contract section 3,
so that :func:`kspec_fluxcal.grid.build_grid` turns it into a cube the pipeline opens like a
BOSZ one. It gives templates from another stellar model than the spectra they are fitted to
(the synthetic model, CALSPEC stars): cross-model accuracy tests.

What the conversion does and assumes
------------------------------------
* Wavelengths are vacuum in the CDBS files (the brief's convention, usual for ATLAS9; the
  files do not say); they are converted to air above 2000 A, as in BOSZ 2024, with
  :func:`kspec_fluxcal.wavelength.vacuum_to_air`. The flux densities are not rescaled by
  d(lambda_vac)/d(lambda_air) (= n, 1.0003: far below the grid's accuracy).
* Fluxes are FLAM surface fluxes F; the files get H = F / 4 pi (Eddington flux).
* CK04 has no continuum: the second column is a stand-in, **C = H** (flux over continuum is
  1 everywhere). Nothing in the pipeline fits with the grid's continuum; code that does must
  not use a CK04 grid's.
* [alpha/M] = +0.00 (the ODFNEW grid is solar-scaled), [C/M] = +0.00, microturbulence
  2 km/s (``v2``), atmosphere tag ``ap`` (ATLAS9).
* Resolution tag ``r500``, the nearest BOSZ tag: the spectra are flux distributions sampled
  every 20 A over 2900-10000 A (lambda / dlambda ~ 200-450), not broadened by any
  line-spread function. The pipeline then treats them as R = 500 spectra: for an instrument
  of ~10 A FWHM it warns that the instrument is sharper than the grid and interpolates
  (a supported case).
* All-zero columns are models absent from the grid (holes, at low log g for hot models):
  they are skipped.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

from .._atomic import atomic_directory, foreign_output
from ..constants import CK04_MARKER
from ..errors import GridError
from ..wavelength import vacuum_to_air
from .bosz_files import _file_bytes, bosz_filename

__all__ = ["CK04_RESOLUTION", "read_ck04_file", "convert_ck04"]

#: BOSZ resolution tag given to CK04 (see the module docstring).
CK04_RESOLUTION = 500
#: Microturbulence of the CK04 models, km/s (AA_README: "the microturbulent velocity used is
#: 2 km s^-1").
CK04_VMICRO = 2
#: File name of a CK04 table: ck{p|m}{10 |[M/H]|}_{teff}.fits (AA_README).
_CK04_NAME = re.compile(r"^ck(?P<sign>[pm])(?P<mh>\d\d)_(?P<teff>\d+)\.fits$")
_LOGG_COLUMN = re.compile(r"^g(?P<g>\d\d)$")


def read_ck04_file(path):
    """Read one CK04 table: its Teff, [M/H], vacuum wavelengths and the existing models.

    Parameters
    ----------
    path : path-like
        A ``ck{p|m}NN_{teff}.fits`` file of the CDBS packaging.

    Returns
    -------
    dict
        ``teff`` (K), ``feh`` ([M/H]), ``wavelength`` (vacuum, Angstrom, float64) and
        ``flux`` (dict of log g to surface flux in erg/s/cm^2/A, float64); all-zero columns
        (absent models) are left out.

    Raises
    ------
    GridError
        When the name or the table is not that of a CK04 file.
    """
    path = Path(path)
    match = _CK04_NAME.match(path.name)
    if match is None:
        raise GridError(path, None, "not a CK04 file name (ck{p|m}NN_{teff}.fits)")
    sign = 1.0 if match["sign"] == "p" else -1.0
    feh = sign * int(match["mh"]) / 10.0 + 0.0
    with fits.open(path) as hdul:
        if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
            raise GridError(path, "HDU 1", "missing the binary table of spectra")
        data = hdul[1].data
        names = list(data.columns.names)
        if "WAVELENGTH" not in names:
            raise GridError(path, "HDU 1", "no WAVELENGTH column")
        wave = np.asarray(data["WAVELENGTH"], dtype=np.float64)
        flux = {}
        for name in names:
            g = _LOGG_COLUMN.match(name)
            values = np.asarray(data[name], dtype=np.float64)
            if g is not None and np.any(values != 0):
                flux[int(g["g"]) / 10.0] = values
    if wave.size < 2 or np.any(np.diff(wave) <= 0):
        raise GridError(path, "HDU 1 column WAVELENGTH", "wavelengths must increase")
    return {"teff": float(match["teff"]), "feh": feh, "wavelength": wave, "flux": flux}


def _selected(path, teff_range, fehs):
    match = _CK04_NAME.match(path.name)
    if match is None:
        return False
    teff = float(match["teff"])
    feh = (1.0 if match["sign"] == "p" else -1.0) * int(match["mh"]) / 10.0
    in_feh = fehs is None or any(abs(feh - f) < 1e-6 for f in fehs)
    return teff_range[0] <= teff <= teff_range[1] and in_feh


def _marker_text(source, teff_range, loggs, fehs, n_files):
    return (
        "Castelli & Kurucz (2004) ATLAS9 ODFNEW grid (STScI/CDBS packaging), converted to the\n"
        "BOSZ 2024 layout by kspec_fluxcal.sim.convert_ck04. Not BOSZ, not synthetic.\n"
        "Wavelengths: vacuum -> air above 2000 A (Morton 2000). H = F / 4 pi; continuum stand-in\n"
        "C = H (CK04 has none). [alpha/M] = 0, v = 2 km/s, tag r500 (20 A sampling, no LSF).\n"
        f"source: {source}\nteff: {list(teff_range)}\n"
        f"logg: {'all' if loggs is None else sorted(loggs)}\n"
        f"feh: {'all' if fehs is None else sorted(fehs)}\nspectra: {n_files}\n"
    )


def convert_ck04(source, out, *, teff_range=(4000.0, 9500.0), loggs=None, fehs=None,
                 overwrite=False, progress=False):
    """Write (a box of) the CK04 grid in the BOSZ 2024 directory layout.

    Parameters
    ----------
    source : path-like
        The CDBS ``ck04models`` directory (with ``ck{m25..p05}/`` subdirectories).
    out : path-like
        Directory to create: ``bosz2024_wave_r500.txt`` (air above 2000 A),
        ``r500/m{feh}/bosz2024_ap_t{teff}_g{logg}_m{feh}_a+0.00_c+0.00_v2_r500_resam.txt.gz``
        and the marker :data:`kspec_fluxcal.constants.CK04_MARKER`. It appears whole
        (written to a temporary directory, then renamed).
    teff_range : (float, float)
        Teff range to convert, K (inclusive).
    loggs, fehs : sequence of float, optional
        log g and [M/H] values to convert (default: every one present).
    overwrite : bool
        Replace an existing ``out``.
    progress : bool
        Print one line per metallicity to stderr.

    Returns
    -------
    pathlib.Path
        ``out``, ready for :func:`kspec_fluxcal.grid.build_grid`.

    Raises
    ------
    GridError
        When no CK04 file is in the box, or the files disagree on their wavelengths.
    OutputExistsError
        When ``out`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> convert_ck04("shared/real/ck04", "store/ck04_bosz", teff_range=(5000, 7500),
    ...              loggs=(3.5, 4.0, 4.5, 5.0))  # doctest: +SKIP
    """
    source, out = Path(source), Path(out)
    files = sorted(p for p in source.glob("ck*/ck*_*.fits") if _selected(p, teff_range, fehs))
    if not files:
        raise GridError(source, None, f"no CK04 file (ck*/ck*_*.fits) with Teff in {teff_range}"
                        + ("" if fehs is None else f" and [M/H] in {list(fehs)}"))
    if overwrite and (problem := foreign_output(out, lambda p: (p / CK04_MARKER).is_file(),
                                                f"a converted CK04 grid (no {CK04_MARKER})")):
        raise GridError(out, None, problem)
    want = None if loggs is None else {round(float(g), 1) for g in loggs}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        wave_vac, written = None, 0
        for path in files:
            model = read_ck04_file(path)
            if wave_vac is None:
                wave_vac = model["wavelength"]
            elif not np.array_equal(model["wavelength"], wave_vac):
                raise GridError(path, "HDU 1 column WAVELENGTH",
                                f"differs from the wavelengths of {files[0].name}")
            for logg, flux in model["flux"].items():
                if want is not None and logg not in want:
                    continue
                name = bosz_filename(model["teff"], logg, model["feh"], 0.0, CK04_RESOLUTION,
                                     atmos="ap", vmicro=CK04_VMICRO)
                target = tmp / f"r{CK04_RESOLUTION}" / f"m{model['feh']:+.2f}" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                # Negative or tiny far-UV values become BOSZ's "0 1" rows in _file_bytes.
                positive = np.clip(flux, 0.0, None)
                target.write_bytes(_file_bytes(wave_vac, positive, positive))
                written += 1
            if progress:
                print(f"{path.name}: {len(model['flux'])} log g", file=sys.stderr, flush=True)
        if written == 0:
            raise GridError(source, None, f"no CK04 model with log g in {sorted(want)}")
        air = vacuum_to_air(wave_vac)
        text = "".join(f"{w:.7e}\n" for w in air.tolist())
        (tmp / f"bosz2024_wave_r{CK04_RESOLUTION}.txt").write_text(text)
        (tmp / CK04_MARKER).write_text(_marker_text(source.resolve(), teff_range, loggs, fehs,
                                                    written))
    return out

