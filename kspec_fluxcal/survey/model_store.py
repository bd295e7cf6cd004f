"""The survey model's products: ``OUT/model.zarr``, one group per instrument setup.

Layout of a group (dims night, exposure, wavelength, fit_wavelength, term)
--------------------------------------------------------------------------
Per night (``night``, with ``mjd``, the mean of its fitted exposures'):
``throughput`` (night, wavelength): counts/s/A per flux unit above the atmosphere (airmass
0), at the night's mean grey level (the standards' fibers' aperture and the night's mean
transparency), and ``throughput_err`` (fractional); ``extinction`` (night, wavelength),
mag/airmass, with the night's grey extinction added, and ``extinction_err``;
``grey_extinction`` and ``grey_extinction_err`` (the slope of the grey factors' line
against airmass, exposures beyond 3 robust sigmas of it left out; fiber losses that grow
with airmass, through seeing and refraction, are in it too), ``grey_scatter`` (the grey
factors about their line, fractional), ``photometric`` (scatter within [model]
photometric_scatter or 1.5 x [combine] aperture_scatter / sqrt(standards per exposure), the
larger), ``water`` (H2O column
per airmass), ``lsf_scale``, ``n_exposures``, ``n_outliers``, ``median_residual`` (median
shape residual rms, fractional) and the spectrophotometric check's night medians
``sphot_g``, ``sphot_r``, ``sphot_i`` (mag; of the exposures calibrated in the run).
Per exposure fitted (``exposure``, indexed by ``expid``): ``exposure_night``,
``exposure_mjd``, ``airmass``, ``seeing``, ``n_stars``, ``grey`` (ln g_e, per second),
``grey_model`` (the night's line at its airmass), ``weight`` (Huber), ``outlier`` (its
shape: left out of the fit, and not recalibrated with the model), ``grey_outlier`` (its
grey factor: left out of the night's line, e.g. a cloud),
``residual_rms`` and ``residual`` (exposure, fit_wavelength: ln own - ln model, the grey
removed).
Survey-wide: ``chromatic`` (term, wavelength): ln response change per arcsec of seeing above
1.5 (``seeing``) and per unit tan^2 z (``refraction``); the error model ``tau`` and
``sigma_star`` (fit_wavelength, fractional).
Attrs: ``model_id``, ``setup``, ``spec`` (JSON), ``tau`` and ``sigma_star`` (their medians),
``version``, ``created``.

A group is written in a temporary directory and renamed into place: a job killed while
writing leaves the previous model.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

import numpy as np
import xarray as xr

from .. import __version__
from ..constants import FLUX_UNIT
from .archive import archive_grid
from .model import MAG_TO_LN

__all__ = ["ModelStoreWriter", "open_model", "model_setups", "MODEL_STORE"]

#: The store's name in the survey's output directory.
MODEL_STORE = "model.zarr"
#: The ``title`` of a model store's root group: what tells it from other stores.
MODEL_TITLE = "kspec-fluxcal survey model"
_THROUGHPUT_UNIT = f"count/(s Angstrom) / ({FLUX_UNIT})"
_ROW_CHUNK = 256


def setup_group(setup):
    """A group name for a setup key (keys are already file-name safe)."""
    return str(setup).replace("/", "_")


class ModelStoreWriter:
    """Writes one setup's group: the residuals as they arrive, the rest at :meth:`finish`.

    Parameters
    ----------
    path : path-like
        The model store (``OUT/model.zarr``); its root is created when absent.
    setup : str
    fit_loglam : numpy.ndarray
        ln(lambda) of the fit grid (residuals' wavelengths).
    exposures : int
        Exposures fitted (rows of ``residual``).
    """

    def __init__(self, path, setup, fit_loglam, exposures):
        import tempfile

        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            from .._atomic import atomic_directory

            with atomic_directory(self.path, overwrite=True) as tmp:
                zarr.open_group(tmp, mode="w").attrs.update(
                    {"title": MODEL_TITLE, "groups": "one per setup"})
        self.final = self.path / setup_group(setup)
        prefix = f".kspec-tmp-{self.final.name}."
        # A job killed while writing (SIGKILL: no clean-up) left its group; the survey's
        # lock makes this job the only writer of the store.
        for stale in self.path.glob(f"{prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.path))
        self.group = zarr.open_group(self.tmp, mode="w")
        wave = np.exp(fit_loglam)
        self._array("fit_wavelength", ("fit_wavelength",), wave, {"units": "Angstrom"})
        self.residual = self.group.create_array(
            "residual", shape=(exposures, wave.size), chunks=(_ROW_CHUNK, wave.size),
            dtype="f4", fill_value=np.nan, dimension_names=["exposure", "fit_wavelength"])
        self.residual.attrs.update({"units": "1", "description": "ln(own response) - "
                                    "ln(model), the exposure's grey removed"})

    def _array(self, name, dims, values, attrs=None):
        values = np.asarray(values)
        if values.dtype.kind == "U":
            values = values.astype(object)
        dtype = str if values.dtype.kind == "O" else values.dtype
        array = self.group.create_array(name, shape=values.shape, dtype=dtype,
                                        chunks=values.shape or None,
                                        dimension_names=list(dims))
        array[...] = values
        array.attrs.update(attrs or {})

    def write_residuals(self, rows, residual):
        """Residual curves of exposures at ``rows`` (positions in the exposure table)."""
        self.residual[np.asarray(rows), :] = np.asarray(residual, dtype=np.float32)

    def finish(self, model, levels, exposures, nights, attrs):
        """Write the curves, tables and attrs, then rename the group into place.

        Parameters
        ----------
        model : kspec_fluxcal.survey.model.SurveyModel
        levels : kspec_fluxcal.survey.levels.Levels
        exposures : dict of str to numpy.ndarray
            The exposure table (``expid``, ``exposure_night``, ``exposure_mjd``,
            ``airmass``, ``seeing``, ``n_stars``, ``grey``, ``grey_model``, ``weight``,
            ``outlier``, ``residual_rms``), in the order of the residual rows.
        nights : dict of str to numpy.ndarray
            The night table: ``night`` (labels) and per-night columns (``mjd``,
            ``n_exposures``, ``n_outliers``, ``median_residual``, ``sphot_*``, ...).
        attrs : dict
        """
        from .._atomic import atomic_directory

        grid = archive_grid()
        lo, hi = model.spec.wave_range
        wave = grid[(grid >= lo) & (grid <= hi)]
        self._array("wavelength", ("wavelength",), wave, {"units": "Angstrom", "medium": "air"})
        labels = np.asarray(nights["night"]).astype(str)
        level = levels.of(labels)
        s, s_err = model.curve("throughput", np.log(wave), labels)
        k, k_err = model.curve("extinction", np.log(wave), labels)
        grey_k = -level["slope"] / MAG_TO_LN
        self._array("throughput", ("night", "wavelength"),
                    np.exp(s + level["intercept"][:, None]).astype(np.float32),
                    {"units": _THROUGHPUT_UNIT, "description": "above the atmosphere, at the "
                     "night's mean grey level (the standards' fiber apertures, its mean "
                     "transparency)"})
        self._array("throughput_err", ("night", "wavelength"), s_err.astype(np.float32),
                    {"units": "1", "description": "fractional, the grey level's aside"})
        self._array("extinction", ("night", "wavelength"),
                    (k + grey_k[:, None]).astype(np.float32),
                    {"units": "mag/airmass", "description": "the night's curve with its grey "
                     "extinction (grey_extinction) added"})
        self._array("extinction_err", ("night", "wavelength"), k_err.astype(np.float32),
                    {"units": "mag/airmass", "description": "of the shape (grey aside)"})
        self._night_columns(nights, level, grey_k)
        terms = list(model.spec.terms)
        if terms:
            curves = np.stack([model.curve(t, np.log(wave), [""])[0][0] for t in terms])
            self._array("chromatic", ("term", "wavelength"), curves.astype(np.float32),
                        {"units": "ln per unit term", "description": "seeing: per arcsec "
                         "above 1.5; refraction: per unit tan^2 z"})
            self._array("term", ("term",), np.array(terms))
        for name, values in exposures.items():
            self._array(name, ("exposure",), values, _EXPOSURE_UNITS.get(name))
        for name, values, text in (
                ("tau", model.tau2, "scatter of the exposures' shapes about the model"),
                ("sigma_star", model.star_var, "shape error of one standard's calibration")):
            self._array(name, ("fit_wavelength",), np.sqrt(values), {"units": "1",
                                                                     "description": text})
        self.group.attrs.update({**attrs, "setup": model.spec.setup,
                                 "spec": json.dumps(model.spec.to_dict()),
                                 "tau": float(np.sqrt(np.median(model.tau2))),
                                 "sigma_star": float(np.sqrt(np.median(model.star_var))),
                                 "version": __version__, "created": _dt.datetime.now(
                                     _dt.UTC).isoformat(timespec="seconds")})
        with atomic_directory(self.final, overwrite=True) as tmp:
            Path(tmp).rmdir()
            self.tmp.rename(tmp)

    def _night_columns(self, nights, level, grey_k):
        extra = {"grey_extinction": (grey_k, "mag/airmass"),
                 "grey_extinction_err": (level["slope_err"] / MAG_TO_LN, "mag/airmass"),
                 "grey_scatter": (level["scatter"], "1"),
                 "water": (level["water"], "airmass x reference water column / airmass"),
                 "lsf_scale": (level["lsf"], "1")}
        for name, (values, units) in extra.items():
            self._array(name, ("night",), np.asarray(values, dtype=np.float64),
                        {"units": units})
        for name, values in nights.items():
            self._array(name, ("night",), values, _EXPOSURE_UNITS.get(name))

    def abandon(self):
        """Remove the temporary group (the job failed before :meth:`finish`)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


_EXPOSURE_UNITS = {"mjd": {"units": "d"}, "exposure_mjd": {"units": "d"},
                   "airmass": {"units": "1"}, "median_residual": {"units": "1"},
                   "seeing": {"units": "arcsec"},
                   "grey": {"units": "ln(counts/s/A per flux unit)"},
                   "grey_model": {"units": "ln(counts/s/A per flux unit)"},
                   "residual_rms": {"units": "1"}, "sphot_g": {"units": "mag"},
                   "sphot_r": {"units": "mag"}, "sphot_i": {"units": "mag"}}


def model_setups(path):
    """The setups of a model store (its groups)."""
    path = Path(path)
    return sorted(p.name for p in path.iterdir() if (p / "zarr.json").exists()
                  and not p.name.startswith("."))


def checked_model_setups(path):
    """The setups of the model store ``path``, an :class:`~kspec_fluxcal.errors.InputError`
    when it is none (missing, or another store)."""
    import zarr

    from ..errors import InputError

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise InputError(path, None, "no survey model here (the survey job writes "
                         "OUT/model.zarr when [model] enabled and a setup has enough exposures)")
    title = zarr.open_group(path, mode="r").attrs.get("title")
    if title != MODEL_TITLE:
        raise InputError(path, None, f"not a survey model store (its title: {title!r}; the "
                         "survey job writes OUT/model.zarr)")
    return model_setups(path)


def open_model(path, setup=None):
    """Open one setup's survey model (``OUT/model.zarr``) as an xarray Dataset.

    Parameters
    ----------
    path : path-like
        The model store.
    setup : str, optional
        The setup key; needed only when the store has several.

    Returns
    -------
    xarray.Dataset
        Indexed by ``night`` and ``expid`` (see the module docstring); the per-exposure and
        per-night values in memory (they select, e.g. ``m.expid[m.outlier]``), the curves
        of every exposure lazy.
    """
    from ..errors import InputError

    path = Path(path)
    setups = checked_model_setups(path)
    if setup is None:
        if len(setups) != 1:
            raise InputError(path, None, f"holds {len(setups)} setups ({', '.join(setups)}): "
                             "name one (setup=...)")
        setup = setups[0]
    elif setup_group(setup) not in setups:
        raise InputError(path, f"group {setup}", f"no such setup (present: {', '.join(setups)})")
    ds = xr.open_zarr(path, group=setup_group(setup), consolidated=False)
    ds = ds.set_coords([n for n in ("expid", "exposure_night", "exposure_mjd", "mjd")
                        if n in ds.variables])
    # A boolean Dask array cannot index (m.expid[m.outlier] raised): the small ones are read.
    for variable in ds.variables.values():
        if variable.ndim <= 1:
            variable.load()  # in place
    if ds.sizes.get("exposure", 0):  # in time order, as the archive (stored as fitted)
        ds = ds.sortby("exposure_mjd")
    return ds.set_xindex("expid")
