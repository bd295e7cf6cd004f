"""Building the template grid: a BOSZ 2024 directory (formats contract section 3) indexed
from its file names, then converted into the labelled Zarr cube that :mod:`kspec_fluxcal.grid`
reads (its layout and chunks are described there).

The build is resumable: it goes into a hidden ``<out>.partial`` store one Teff slab at a time,
recording finished slabs, and is renamed into place only when complete. Files are read by
:mod:`kspec_fluxcal._bosz`, in this process or in a pool.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from .. import __version__
from .._atomic import TEMP_PREFIX, foreign_output
from .._bosz import band_matrix, read_bosz_spectrum, template_reader
from .._zarr import strings_as_object
from ..constants import (
    BANDS,
    BOSZ_RESOLUTIONS,
    CK04_MARKER,
    EBV_REFERENCE,
    EBV_SLOPE_REFERENCE,
)
from ..errors import FluxCalWarning, GridError
from ..photometry import band_weights
from ..reddening import LAWS, extinction_per_ebv
from . import PARAMS

__all__ = [
    "parse_bosz_filename",
    "scan_bosz",
    "read_bosz_spectrum",
    "build_grid",
    "POLICY",
]


BOSZ_NAME = re.compile(
    r"^bosz2024_(?P<atmos>[a-z]{2})_t(?P<teff>\d+)_g(?P<logg>[+-]\d+(?:\.\d+)?)"
    r"_m(?P<feh>[+-]\d+(?:\.\d+)?)_a(?P<alpha>[+-]\d+(?:\.\d+)?)_c(?P<carbon>[+-]\d+(?:\.\d+)?)"
    r"_v(?P<vmicro>\d+(?:\.\d+)?)_(?P<resolution>r\d+|rorig)_resam\.txt\.gz$"
)
WAVE_NAME = re.compile(r"^bosz2024_wave_(?P<resolution>r\d+|rorig)\.txt$")

CHUNK_WAVELENGTH = 8192
#: Version of the store's variables, part of a build's plan: a store of an older layout (no
#: ``ext_slope``) is not taken as up to date, nor is its partial build resumed.
STORE_LAYOUT = 2
#: The choice among several files at the same (teff, logg, feh, alpha).
POLICY = {
    "atmosphere": "prefer MARCS ('mp') over ATLAS9 ('ap')",
    "vmicro": "closest to 1 km/s, the lower on ties",
    "carbon": "closest to [C/M] = 0",
}
_ATMOS_RANK = {"mp": 0, "ap": 1}


def parse_bosz_filename(name):
    """Parameters encoded in a BOSZ 2024 spectrum file name, or None if it is not one.

    Returns
    -------
    dict or None
        ``atmos``, ``teff``, ``logg``, ``feh``, ``alpha``, ``carbon``, ``vmicro`` (floats but
        atmos) and ``resolution`` (the tag, e.g. 'r10000').
    """
    m = BOSZ_NAME.match(Path(name).name)
    if m is None:
        return None
    out = {k: float(v) for k, v in m.groupdict().items() if k not in ("atmos", "resolution")}
    out["atmos"] = m["atmos"]
    out["resolution"] = m["resolution"]
    return out


def scan_bosz(bosz_dir, resolution=None):
    """Index a BOSZ-layout directory from file names alone (no file is opened).

    Parameters
    ----------
    bosz_dir : path-like
        Directory with ``bosz2024_wave_r{R}.txt`` and ``r{R}/m*/bosz2024_*.txt.gz``.
    resolution : str, optional
        Resolution tag to use; needed only when several wavelength files are present.

    Returns
    -------
    dict
        ``wave_file`` (Path), ``resolution`` (tag), ``models`` (one dict per chosen file,
        with ``path`` and the parameters), ``skipped`` (list of (path, reason): malformed
        names, other resolutions, and files not chosen by :data:`POLICY`).
    """
    root = Path(bosz_dir)
    if not root.is_dir():
        raise GridError(root, None, "no such directory")
    waves = {m["resolution"]: p for p in sorted(root.glob("bosz2024_wave_*.txt"))
             if (m := WAVE_NAME.match(p.name))}
    if resolution is None:
        if not waves:
            elsewhere = sorted(p.relative_to(root) for p in root.rglob("bosz2024_wave_*.txt"))
            hint = (f" (found {elsewhere[0]}: move it to the top of the directory)"
                    if elsewhere else "")
            raise GridError(root, None, "no wavelength file bosz2024_wave_r<R>.txt at the top "
                            f"of the directory, e.g. bosz2024_wave_r10000.txt{hint}")
        if len(waves) > 1:
            raise GridError(root, None, f"several wavelength files ({', '.join(sorted(waves))}); "
                            "choose one with --resolution")
        resolution = next(iter(waves))
    if resolution not in BOSZ_RESOLUTIONS:
        raise GridError(root, None, f"unknown resolution {resolution!r}; valid: "
                        f"{', '.join(BOSZ_RESOLUTIONS)}")
    if resolution not in waves:
        raise GridError(root, None, f"no wavelength file bosz2024_wave_{resolution}.txt")
    skipped, candidates = [], {}
    for path in sorted(root.rglob("*.txt.gz")):
        params = parse_bosz_filename(path.name)
        if params is None:
            skipped.append((path, "file name does not follow the BOSZ 2024 pattern"))
            continue
        if params["resolution"] != resolution:
            skipped.append((path, f"resolution {params['resolution']}, building {resolution}"))
            continue
        key = tuple(params[p] for p in PARAMS)
        candidates.setdefault(key, []).append({"path": path, **params})
    models = []
    for key in sorted(candidates):
        ranked = sorted(candidates[key], key=lambda m: (
            _ATMOS_RANK.get(m["atmos"], 9), abs(m["vmicro"] - 1.0), m["vmicro"],
            abs(m["carbon"]), m["path"].name))
        models.append(ranked[0])
        for other in ranked[1:]:
            skipped.append((other["path"],
                            f"not chosen at {key} (policy: {ranked[0]['path'].name})"))
    if not models:
        raise GridError(root, None, f"no BOSZ 2024 spectrum files for {resolution} "
                        f"(expected {resolution}/m*/bosz2024_*_{resolution}_resam.txt.gz)")
    return {"wave_file": waves[resolution], "resolution": resolution, "models": models,
            "skipped": skipped}


def _read_wavelength(path):
    try:
        wave = np.array(Path(path).read_bytes().split(), dtype=np.float64)
    except ValueError as err:
        raise GridError(path, None, f"not a list of numbers ({err})") from None
    if not np.all(np.isfinite(wave)):
        row = int(np.flatnonzero(~np.isfinite(wave))[0])
        raise GridError(path, f"line {row + 1}", "non-finite wavelength (NaN or inf)")
    if wave.size < 2 or np.any(np.diff(wave) <= 0):
        raise GridError(path, None, "wavelengths must increase")
    return wave


def _plan_hash(scan, wave_min, wave_max):
    h = hashlib.sha1()
    h.update(f"{__version__}|{STORE_LAYOUT}|{scan['resolution']}|{wave_min}|{wave_max}|{BANDS}|"
             f"{LAWS}".encode())
    for m in scan["models"]:
        st = m["path"].stat()
        h.update(f"{m['path'].name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _empty_store(partial, axes, wave, attrs):
    """Create the store's arrays (no data chunk written: every one is the fill value) with
    their coordinates and attributes.

    Without Dask (0.6 s of CPU to import): xarray writes the first Teff slab of every
    variable (one value broadcast to its shape: Zarr stores none of its chunks, all equal to
    the fill value), and the arrays are then grown along Teff, which changes their metadata
    only. Written whole, Zarr would compare every chunk with the fill value: 10 s of CPU and
    0.4 GB for a BOSZ-sized grid (60 x 13 x 14 x 5 templates, 20000 wavelengths).
    """
    shape = tuple(len(axes[p]) for p in PARAMS)
    chunks = (1, *shape[1:])
    nw = wave.size
    cw = min(CHUNK_WAVELENGTH, nw)
    units = "erg/(s cm2 Angstrom)"
    extra = {"flux": (nw,), "continuum": (nw,), "exists": (), "synth_mag": (len(BANDS),),
             "ext_coeff": (len(LAWS), len(BANDS)), "ext_slope": (len(LAWS), len(BANDS))}

    def empty(name, fill, dtype):
        return np.broadcast_to(np.array(fill, dtype=dtype), shape + extra[name])

    ds = xr.Dataset(
        {
            "flux": (PARAMS + ("wavelength",), empty("flux", np.nan, np.float32),
                     {"units": units, "description": "surface flux F = 4 pi H"}),
            "continuum": (PARAMS + ("wavelength",), empty("continuum", np.nan, np.float32),
                          {"units": units, "description": "continuum 4 pi C"}),
            "exists": (PARAMS, empty("exists", False, bool),
                       {"description": "the grid point was in the source directory"}),
            "synth_mag": (PARAMS + ("band",), empty("synth_mag", np.nan, np.float64),
                          {"units": "mag", "system": "AB",
                           "description": "synthetic magnitude of the surface flux, full range"}),
            "ext_coeff": (PARAMS + ("law", "band"), empty("ext_coeff", np.nan, np.float64),
                          {"units": "mag", "description": "A_band / E(B-V) of the template, "
                           f"measured at E(B-V) = {EBV_REFERENCE}, R_V = 3.1"}),
            "ext_slope": (PARAMS + ("law", "band"), empty("ext_slope", np.nan, np.float64),
                          {"units": "mag", "description": "d(A_band / E(B-V)) / dE(B-V) of "
                           f"the template, between E(B-V) = {EBV_REFERENCE} and "
                           f"{EBV_SLOPE_REFERENCE}: A_band(E) = E (ext_coeff + ext_slope "
                           f"(E - {EBV_REFERENCE}))"}),
        },
        coords={
            **{p: (p, np.asarray(axes[p], dtype=np.float64)) for p in PARAMS},
            "wavelength": ("wavelength", wave, {"units": "Angstrom",
                                                "medium": "air (vacuum below 2000 A)"}),
            "band": ("band", list(BANDS)),
            "law": ("law", list(LAWS)),
        },
        attrs=attrs,
    )
    for p, unit in zip(PARAMS, ("K", "dex (cgs)", "dex", "dex"), strict=True):
        ds[p].attrs["units"] = unit
    encoding = {name: {"chunks": (len(ds[name]),)}
                for name in (*PARAMS, "wavelength", "band", "law")}
    encoding.update({name: {"chunks": chunks + ((cw,) if name in ("flux", "continuum")
                                                else more)}
                     for name, more in extra.items()})
    strings_as_object(ds.isel(teff=slice(0, 1))).to_zarr(
        partial, mode="w", consolidated=False, encoding=encoding, write_empty_chunks=False,
        zarr_format=3)
    _grow_teff(partial, ds["teff"].values)


def _grow_teff(partial, teff):
    """Grow every array of the store along Teff (its first axis where it has one) to the
    values ``teff``: metadata only (the new chunks are the fill value), then the axis itself."""
    import zarr  # here: the simulator imports this module, and has no use for Zarr (0.2 s)

    group = zarr.open_group(partial, mode="r+", zarr_format=3)
    for _, array in group.arrays():
        if tuple(array.metadata.dimension_names or ())[:1] == ("teff",):
            array.resize((teff.size, *array.shape[1:]))
    group["teff"][:] = teff


def _state_path(partial):
    # Beside the store, not inside: Zarr warns about foreign files in a hierarchy.
    return Path(partial).with_name(Path(partial).name + ".state.json")


def _load_state(partial):
    try:
        return json.loads(_state_path(partial).read_text())
    except (OSError, ValueError):
        return None


def _save_state(partial, state):
    tmp = _state_path(partial).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _state_path(partial))


def _provenance(bosz_dir):
    """(title, reference, synthetic) of a BOSZ-layout directory, from its marker files."""
    bosz = "Meszaros et al. 2024, A&A 688, A197 (BOSZ 2024)"
    if any(Path(bosz_dir).glob("SYNTHETIC_GRID*")):
        return "BOSZ 2024 stellar template grid (SYNTHETIC stand-in)", bosz, True
    if (Path(bosz_dir) / CK04_MARKER).exists():
        return ("Castelli & Kurucz 2004 (ATLAS9 ODFNEW) stellar template grid, BOSZ layout",
                "Castelli & Kurucz 2003, IAU Symp. 210, A20 (CK04)", False)
    return "BOSZ 2024 stellar template grid", bosz, False


def build_grid(bosz_dir, out, *, wave_min=3000.0, wave_max=11000.0, resolution=None,
               workers=1, progress=True, overwrite=False):
    """Convert a BOSZ-layout directory into the labelled Zarr cube (see module docstring).

    The build goes into a hidden ``<out>.partial`` store next to ``out``, one Teff slab at a
    time, recording finished slabs; it is renamed to ``out`` only when complete. Re-running
    an interrupted build resumes it (same files, same options); re-running a finished one
    with the same inputs leaves the store as it is.

    Parameters
    ----------
    bosz_dir : path-like
        BOSZ 2024 layout (formats contract section 3); malformed file names are skipped with
        a warning.
    out : path-like
        Zarr store to create.
    wave_min, wave_max : float
        Wavelength range kept in the cube, Angstrom (synthetic magnitudes use the full range).
    resolution : str, optional
        Resolution tag, when the directory holds several.
    workers : int
        Processes reading files (1 = in this process). With more, a pool reads ahead while
        this process writes finished slabs; it ends with the build, also on errors and
        Ctrl-C.
    progress : bool
        Show a progress bar and messages on stdout.
    overwrite : bool
        Rebuild even when a complete store from other inputs exists.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    out = Path(out)
    scan = scan_bosz(bosz_dir, resolution)
    for path, reason in scan["skipped"]:
        if "not chosen" not in reason:
            warnings.warn(f"{path}: skipped: {reason}", FluxCalWarning, stacklevel=2)
    plan = _plan_hash(scan, wave_min, wave_max)
    if _up_to_date(out, plan, overwrite, progress, len(scan["models"])):
        return out
    wave_full = _read_wavelength(scan["wave_file"])
    trim = np.flatnonzero((wave_full >= wave_min) & (wave_full <= wave_max))
    if trim.size < 2:
        raise GridError(scan["wave_file"], None, f"no wavelengths in {wave_min}-{wave_max} A")
    trim = slice(int(trim[0]), int(trim[-1]) + 1)
    models = scan["models"]
    axes = {p: sorted({m[p] for m in models}) for p in PARAMS}
    attrs = _store_attrs(bosz_dir, scan, wave_full[trim], plan)
    partial = out.with_name(f"{TEMP_PREFIX}{out.name}.partial")
    state = _start_partial(partial, plan, axes, wave_full[trim], attrs, progress)
    try:
        _fill(partial, state, models, axes, wave_full, trim, workers, progress)
    except GridError as err:  # a bad file: what was read stays for the build to resume
        raise type(err)(err.path, err.where, f"{err.problem} (the {len(state['done'])} Teff "
                        f"slab(s) written so far are kept in {partial} for the next build "
                        "to resume once the file is fixed; delete it to start over)") from None
    _publish(partial, out)
    if progress:
        print(f"wrote {out}: {len(models)} templates, {trim.stop - trim.start} wavelengths "
              f"{wave_full[trim][0]:.1f}-{wave_full[trim][-1]:.1f} A, {len(scan['skipped'])} "
              "files skipped")
    sparse = _sparseness(axes, len(models))
    if sparse:
        warnings.warn(f"{out}: {sparse}", FluxCalWarning, stacklevel=2)
    return out


def _sparseness(axes, n_models):
    """What makes a grid too sparse to fit stars with ('' when nothing does): Teff or log g
    with one node, and half of the grid's points or more missing."""
    thin = [p for p in ("teff", "logg") if len(axes[p]) < 2]
    points = int(np.prod([len(v) for v in axes.values()]))
    notes = [f"one {' and one '.join(thin)} only: such a grid cannot fit standard stars' "
             "parameters"] if thin else []
    if n_models <= 0.5 * points:
        notes.append(f"{points - n_models} of its {points} grid points are missing: models "
                     "across the holes are those of the nearest templates")
    return "; ".join(notes)


def _up_to_date(out, plan, overwrite, progress, n_models):
    """True when ``out`` was built from the same plan; refuse other inputs without
    ``overwrite``. An empty directory is as good as none."""
    if problem := foreign_output(out, lambda p: _build_plan(p) is not None,
                                 "a template grid store (a file, or a directory without the "
                                 "build plan of 'kspec-fluxcal grid build')"):
        raise GridError(out, None, problem)
    if not out.exists() or not any(out.iterdir()):
        return False
    existing = _build_plan(out)
    if existing == plan and not overwrite:
        if progress:
            print(f"{out}: up to date ({n_models} templates); nothing to do")
        return True
    if not overwrite:
        raise GridError(out, None, "exists and was built from other inputs or options (or "
                        "by a version with another store layout); pass overwrite=True (CLI: "
                        "--overwrite) to rebuild it")
    return False


def _build_plan(path):
    """The build plan of a Zarr store that a grid build wrote (None for anything else),
    read from its group metadata directly: a store with damaged arrays can be rebuilt."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    return attrs.get("build_plan") if isinstance(attrs, dict) else None


def _store_attrs(bosz_dir, scan, wave, plan):
    models = scan["models"]
    title, reference, synthetic = _provenance(bosz_dir)
    marker = Path(bosz_dir) / CK04_MARKER
    # A converted grid's own notes (its source, its continuum stand-in, vacuum -> air): the
    # cube alone must say what it is.
    conversion = {"conversion": marker.read_text()} if marker.exists() else {}
    return {**conversion,
        "title": title,
        "synthetic": int(synthetic),
        "source_directory": str(Path(bosz_dir).resolve()),
        "resolution": scan["resolution"],
        "resolving_power": BOSZ_RESOLUTIONS[scan["resolution"]],
        "n_files": len(models),
        "n_skipped": len(scan["skipped"]),
        "wave_min": float(wave[0]),
        "wave_max": float(wave[-1]),
        "policy": json.dumps(POLICY),
        "chosen_atmospheres": json.dumps(sorted({m["atmos"] for m in models})),
        "chosen_vmicro": json.dumps(sorted({m["vmicro"] for m in models})),
        "chosen_carbon": json.dumps(sorted({m["carbon"] for m in models})),
        "reference": reference,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "kspec_fluxcal_version": __version__,
        "build_plan": plan,
        "complete": 0,
    }


def _start_partial(partial, plan, axes, wave, attrs, progress):
    """The state of the partial store: resumed when it was started with the same plan."""
    state = _load_state(partial) if partial.exists() else None
    if state is None or state.get("plan") != plan:
        if partial.exists():
            shutil.rmtree(partial)
        _empty_store(partial, axes, wave, attrs)
        state = {"plan": plan, "done": []}
        _save_state(partial, state)
    elif progress:
        print(f"resuming an interrupted build: {len(state['done'])}/{len(axes['teff'])} Teff "
              "slabs already written", file=sys.stderr)
    return state


def _fill(partial, state, models, axes, wave_full, trim, workers, progress):
    """Read the files of the slabs not yet written and write each slab as soon as all its
    files are read."""
    import zarr

    todo = [m for m in models if m["teff"] not in state["done"]]
    if not todo:
        return
    weights = band_weights(list(BANDS), wave_full).fillna(0.0).values
    reddened = [weights * 10.0 ** (-0.4 * ebv * extinction_per_ebv(wave_full, law))
                for ebv in (EBV_REFERENCE, EBV_SLOPE_REFERENCE) for law in LAWS]
    matrix, span = band_matrix(weights, reddened)
    left = {t: sum(m["teff"] == t for m in todo) for t in dict.fromkeys(m["teff"] for m in todo)}
    workers = max(1, min(int(workers), len(todo)))
    if progress:
        print(f"reading {len(todo)} template files ({len(left)} Teff slabs) with {workers} "
              "worker(s)", file=sys.stderr)
    group = zarr.open_group(partial, mode="r+")
    started, slab = time.time(), []
    with template_reader(workers, wave_full.size, trim, matrix, span, len(BANDS)) as read:
        for m, product in zip(todo, read([m["path"] for m in todo]), strict=True):
            slab.append((m, product))
            left[m["teff"]] -= 1
            if left[m["teff"]]:
                continue
            _write_slab(group, axes, m["teff"], slab)
            slab = []
            state["done"].append(m["teff"])
            _save_state(partial, state)
            if progress:
                print(f"  {len(todo) - sum(left.values())}/{len(todo)} files, "
                      f"{len(state['done'])}/{len(axes['teff'])} Teff slabs written "
                      f"({time.time() - started:.0f} s)", file=sys.stderr, flush=True)


def _write_slab(group, axes, teff, products):
    """Write one Teff slab (every variable, every chunk, also all-NaN ones: a store's chunks
    are then all present, and a missing one means damage, see
    :func:`kspec_fluxcal.grid.check_chunks`)."""
    shape = tuple(len(axes[p]) for p in PARAMS[1:])
    flux, cont, mag, coeff, _ = products[0][1]
    arrays = {"flux": np.full(shape + flux.shape, np.nan, np.float32),
              "continuum": np.full(shape + cont.shape, np.nan, np.float32),
              "exists": np.zeros(shape, bool),
              "synth_mag": np.full(shape + mag.shape, np.nan),
              "ext_coeff": np.full(shape + coeff.shape, np.nan),
              "ext_slope": np.full(shape + coeff.shape, np.nan)}
    index = {p: {v: i for i, v in enumerate(axes[p])} for p in PARAMS[1:]}
    for m, (f, c, g, e, s) in products:
        at = tuple(index[p][m[p]] for p in PARAMS[1:])
        for name, value in zip(arrays, (f, c, True, g, e, s), strict=True):
            arrays[name][at] = value
    i = axes["teff"].index(teff)
    # Straight to the Zarr arrays: xarray's region writes re-open and re-validate the whole
    # store on every call, which cost more than the slab's compression.
    for name, values in arrays.items():
        group[name].with_config({"write_empty_chunks": True})[i] = values


def _publish(partial, out):
    """Mark the partial store complete and rename it to ``out`` (replacing an older one)."""
    import zarr

    group = zarr.open_group(partial, mode="r+")
    group.attrs["complete"] = 1
    _state_path(partial).unlink()
    if out.exists():
        old = out.with_name(f"{TEMP_PREFIX}{out.name}.old")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
