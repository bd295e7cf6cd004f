"""Star sources of the survey simulator: where the spectra of simulated stars come from.

A source draws stars and gives their spectra; :func:`kspec_fluxcal.sim.exposure.simulate_exposure`
takes any of them for its standard stars (and a parametric one, :class:`GridStars` or
:class:`ModelStars`, for science stars, galaxy continua and catalog decoys).

The interface (duck-typed)
--------------------------
``label`` : str
    Recorded per standard star as truth ``std_source`` (e.g. ``grid:synthetic``,
    ``model:B``, ``calspec``).
``wavelength`` : numpy.ndarray
    Native wavelengths of the spectra, Angstrom, increasing, air above 2000 A.
``resolving_power`` : float or None
    Gaussian resolving power of the spectra (FWHM = lambda / R), or None when the resolution
    varies otherwise; ``native_fwhm(wavelength)`` gives the FWHM in Angstrom either way.
``sample(rng, n, ranges=None)`` -> dict
    ``n`` stars: arrays ``teff``, ``logg``, ``feh``, ``alpha`` (NaN where unknown), and
    optionally ``ebv_reference`` (reddening already in the spectrum), ``rv_reference`` (the
    star's own velocity already in it; NaN = unknown) and ``name``.
``spectra(drawn)`` -> numpy.ndarray (n, nwave)
    Surface flux F (erg/s/cm^2/A, integral sigma Teff^4) of the drawn stars, times the
    reddening of ``ebv_reference`` if any: the flux at Earth is dilution (R/D)^2 x this.
``describe()`` -> dict
    What a survey manifest records.

Parametric sources (usable for the whole field) also have ``spectrum(teff, logg, feh,
alpha)`` and ``parameter_range(name, margin)``.
"""

from __future__ import annotations

import csv
import functools
from collections import OrderedDict
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.interpolate import CubicSpline

from ..constants import BOSZ_RESOLUTIONS, CK04_MARKER, STEFAN_BOLTZMANN
from ..errors import GridError, InputError
from ..grid import PARAMS, interpolation_weights
from ..grid.build import _read_wavelength, read_bosz_spectrum, scan_bosz
from ..reddening import extinction_per_ebv
from ..wavelength import vacuum_to_air
from .bosz_files import bosz_wavelength_grid
from .stellar_model import _as_family, synthetic_spectrum

__all__ = ["GridStars", "GridNodes", "ModelStars", "CalspecStars", "galactic_alpha",
           "off_nodes"]


#: [alpha/M] of thick-disk and halo stars, and the [M/H] below which stars have it (thin-disk
#: stars have 0): the convention of the BOSZ reference subgrid (alpha-enhanced models below
#: [M/H] = -0.5), a step standing in for the Galactic [alpha/Fe] plateau of ~+0.3 (e.g.
#: Bensby et al. 2014, A&A 562, A71).
ALPHA_ENHANCED, ALPHA_ENHANCED_BELOW = 0.25, -0.5


def galactic_alpha(feh):
    """[alpha/M] of Galactic stars of metallicity ``feh``.

    Parameters
    ----------
    feh : float or array_like
        [M/H].

    Returns
    -------
    float or numpy.ndarray
        :data:`ALPHA_ENHANCED` below [M/H] = :data:`ALPHA_ENHANCED_BELOW`, else 0.
    """
    feh = np.asarray(feh, dtype=np.float64)
    return np.where(feh < ALPHA_ENHANCED_BELOW, ALPHA_ENHANCED, 0.0)[()]


def off_nodes(values, nodes, distance):
    """True where ``values`` are more than ``distance`` local steps from every node.

    Parameters
    ----------
    values : numpy.ndarray
        Parameter values, 1-D.
    nodes : array_like
        Increasing grid nodes of that parameter (one node or none: no constraint).
    distance : float
        Minimum distance, in units of the local node spacing.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    if nodes.size < 2:
        return np.ones(np.shape(values), bool)
    step = np.gradient(nodes)
    near = np.abs(values[:, None] - nodes[None, :]) / step[None, :]
    return near.min(axis=1) > distance


class _Parametric:
    """What sources with spectra at any parameters (:meth:`spectrum`) share."""

    def native_fwhm(self, wavelength):
        """FWHM of the spectra's own resolution, Angstrom: lambda / R."""
        return np.asarray(wavelength, dtype=np.float64) / self.resolving_power

    def spectra(self, params):
        """Surface fluxes of drawn stars (a :meth:`sample` result), (nstar, nwave)."""
        return np.atleast_2d(self.spectrum(params["teff"], params["logg"], params["feh"],
                                           params["alpha"]))


class GridStars(_Parametric):
    """Spectra of a BOSZ-layout directory, read once, interpolated at off-grid parameters.

    Files are read on first use and kept in memory (float64 surface flux over the file's full
    wavelength range); the grid is small. Interpolation is multilinear in (Teff, log g,
    [M/H]) at the nearest [alpha/M], with :func:`kspec_fluxcal.grid.interpolation_weights`.

    Parameters
    ----------
    bosz_dir : path-like
        Directory in the BOSZ 2024 layout (formats contract section 3).
    resolution : str, optional
        Resolution tag, when the directory holds several.

    Attributes
    ----------
    label : str
        ``grid:synthetic`` (a :mod:`~kspec_fluxcal.sim.synthetic_grid` grid, model family A),
        ``grid:ck04`` (converted by :func:`~kspec_fluxcal.sim.ck04.convert_ck04`) or ``grid:bosz``.
    wavelength : numpy.ndarray
        The grid's wavelengths, Angstrom (air above 2000 A).
    resolving_power : float
        R of the spectra (Gaussian FWHM = lambda / R).
    axes : dict of str to numpy.ndarray
        Parameter values of the grid, by name (``teff``, ``logg``, ``feh``, ``alpha``).
    exists : numpy.ndarray of bool
        Which grid points have a file, shaped like the axes.
    """

    def __init__(self, bosz_dir, resolution=None):
        scan = scan_bosz(bosz_dir, resolution)
        self.path = Path(bosz_dir)
        self.resolution = scan["resolution"]
        self.resolving_power = BOSZ_RESOLUTIONS[self.resolution]
        self.wavelength = _read_wavelength(scan["wave_file"])
        self.axes = {p: np.array(sorted({m[p] for m in scan["models"]})) for p in PARAMS}
        self.exists = np.zeros(tuple(a.size for a in self.axes.values()), bool)
        self._files = {}
        for m in scan["models"]:
            index = tuple(int(np.searchsorted(self.axes[p], m[p])) for p in PARAMS)
            self.exists[index] = True
            self._files[index] = m["path"]
        self._flux = {}
        self.synthetic = any(self.path.glob("SYNTHETIC_GRID*"))
        ck04 = (self.path / CK04_MARKER).exists()
        self.label = "grid:synthetic" if self.synthetic else "grid:ck04" if ck04 else "grid:bosz"

    def describe(self):
        """What to record in a survey manifest."""
        return {"kind": "grid", "label": self.label, "path": str(self.path.resolve()),
                "resolution": self.resolution, "synthetic": bool(self.synthetic),
                "files_read": self.files_read}

    def _read(self, index):
        if index not in self._flux:
            self._flux[index] = read_bosz_spectrum(self._files[index], self.wavelength.size)[0]
        return self._flux[index]

    @property
    def files_read(self):
        """Number of spectrum files read so far (each is read once)."""
        return len(self._flux)

    def spectrum(self, teff, logg, feh, alpha=None):
        """Surface flux (erg/s/cm^2/A) interpolated at the given parameters, full range.

        Parameters
        ----------
        teff, logg, feh : float or array_like
            Parameters (broadcast together).
        alpha : float or array_like, optional
            [alpha/M] (nearest grid value; default 0).

        Returns
        -------
        numpy.ndarray
            Shape (npoint, nwave); (nwave,) when every parameter is a scalar.

        Raises
        ------
        ValueError
            When a point has no existing corner.
        """
        scalar = all(np.ndim(v) == 0 for v in (teff, logg, feh, alpha))
        index, weight = interpolation_weights(self.axes, self.exists, teff, logg, feh, alpha)
        if not np.all(np.isfinite(weight)):
            raise ValueError("no grid spectrum around the requested parameters")
        out = np.zeros((weight.shape[0], self.wavelength.size))
        for k in range(weight.shape[0]):  # a few stars, 8 corners each
            for c in np.flatnonzero(weight[k] > 0):
                out[k] += weight[k, c] * self._read(tuple(index[k, c]))
        return out[0] if scalar else out

    def complete(self, teff, logg, feh, alpha=None):
        """True where every corner with a non-zero interpolation weight exists (no hole)."""
        everywhere = np.ones_like(self.exists)
        index, raw = interpolation_weights(self.axes, everywhere, teff, logg, feh, alpha)
        present = self.exists[tuple(index[..., d] for d in range(len(PARAMS)))]
        return np.all(present | (raw == 0), axis=1)

    def alpha_for(self, feh):
        """[alpha/M] of stars of metallicity ``feh``, following the grid's convention.

        Galactic chemistry: +0.25 below [M/H] = -0.5 (thick disk, halo), else 0; taken at the
        nearest [alpha/M] that exists at both bracketing [M/H] nodes, so interpolation in
        [M/H] never mixes alpha values.
        """
        feh = np.atleast_1d(np.asarray(feh, dtype=np.float64))
        fehs, alphas = self.axes["feh"], self.axes["alpha"]
        have = self.exists.any(axis=(0, 1))  # (feh, alpha)
        out = np.empty(feh.shape)
        for k, value in enumerate(feh):
            lo = int(np.clip(np.searchsorted(fehs, value, side="right") - 1, 0, fehs.size - 1))
            hi = min(lo + 1, fehs.size - 1)
            both = have[lo] & have[hi]
            target = galactic_alpha(value)
            choices = alphas[both] if both.any() else alphas[have[lo]]
            out[k] = choices[np.argmin(np.abs(choices - target))]
        return out

    def parameter_range(self, name, margin=0.1):
        """(lo, hi) of parameter ``name`` inside the grid, ``margin`` of a step from the edges."""
        ax = self.axes[name]
        if ax.size == 1:
            return float(ax[0]), float(ax[0])
        return (float(ax[0] + margin * (ax[1] - ax[0])),
                float(ax[-1] - margin * (ax[-1] - ax[-2])))

    def sample(self, rng, n, ranges=None, *, margin=0.1, node_distance=0.02):
        """Draw ``n`` stars at off-grid parameters inside the grid.

        Parameters
        ----------
        rng : numpy.random.Generator
        n : int
        ranges : dict, optional
            ``{'teff': (lo, hi), 'logg': ..., 'feh': ...}``, intersected with the grid's range
            shrunk by ``margin`` of a step; default the grid's range.
        margin : float
            Distance from the grid's edges, in steps.
        node_distance : float
            Minimum distance of each parameter from a grid node, in local steps (so no star is
            exactly on a node); axes with a single value are exempt.

        Returns
        -------
        dict of str to numpy.ndarray
            ``teff``, ``logg``, ``feh``, ``alpha``; every interpolation corner exists.
        """
        ranges = dict(ranges or {})
        bounds = {}
        for p in PARAMS[:3]:
            lo, hi = self.parameter_range(p, margin)
            want = ranges.get(p, (lo, hi))
            lo, hi = max(lo, want[0]), min(hi, want[1])
            if lo > hi:
                raise ValueError(f"the grid's {p} range {self.axes[p][0]:g}-{self.axes[p][-1]:g} "
                                 f"does not overlap the requested {want[0]:g}-{want[1]:g}")
            bounds[p] = (lo, hi)

        def propose(m):
            cand = {p: rng.uniform(*bounds[p], m) for p in PARAMS[:3]}
            cand["alpha"] = self.alpha_for(cand["feh"])
            ok = self.complete(cand["teff"], cand["logg"], cand["feh"], cand["alpha"])
            for p in PARAMS[:3]:
                ok &= off_nodes(cand[p], self.axes[p], node_distance)
            return cand, ok

        # The grid's fault (too few points, or holes): an error about it, as a CLI line.
        return _accepted(n, propose, GridError(
            self.path, None, f"could not draw {n} off-grid stars with complete interpolation "
            f"corners in {bounds} (too few grid points, or holes?)"))


class GridNodes(GridStars):
    """The spectra of a BOSZ-layout directory at its own grid points (:meth:`sample` draws
    only those; :meth:`spectrum` interpolates, as :class:`GridStars`).

    For a few model spectra as standard stars at exactly their parameters (e.g. the two real
    BOSZ 2024 files of ``../shared/real/bosz2024_r5000``: two corners of a Teff-log g square,
    too sparse for :class:`GridStars` to interpolate in). Like :class:`CalspecStars`, the
    stars are what they are: :meth:`sample` ignores the simulator's parameter ranges.

    Parameters
    ----------
    bosz_dir : path-like
        Directory in the BOSZ 2024 layout.
    resolution : str, optional
        Resolution tag, when the directory holds several.
    """

    def __init__(self, bosz_dir, resolution=None):
        super().__init__(bosz_dir, resolution)
        self.label = self.label.replace("grid:", "nodes:")
        self._points = np.argwhere(self.exists)  # (npoint, 4) indices of existing files

    def describe(self):
        """What to record in a survey manifest."""
        return {**super().describe(), "kind": "grid_nodes"}

    def sample(self, rng, n, ranges=None, **_):
        """Draw ``n`` different grid points (repeats only when ``n`` exceeds them).

        Returns
        -------
        dict of str to numpy.ndarray
            ``teff``, ``logg``, ``feh``, ``alpha`` of the points and ``name`` (e.g.
            ``t6000 g4.0 m+0.00``).
        """
        total = len(self._points)
        # Each point once before any repeats (a shuffled list, as often as n needs).
        order = np.concatenate([rng.permutation(total) for _ in range(-(-n // total))])[:n]
        pick = self._points[order]
        out = {p: self.axes[p][pick[:, k]] for k, p in enumerate(PARAMS)}
        out["name"] = np.array([f"t{t:.0f} g{g:.1f} m{m:+.2f} a{a:+.2f}" for t, g, m, a in
                                zip(*(out[p] for p in PARAMS), strict=True)])
        return out


def _accepted(n, propose, failure):
    """``n`` accepted candidates: batches of max(16, 4 n) from ``propose(m)``, which returns
    (candidates by parameter, accepted mask), until enough are accepted (200 batches at most;
    then ``failure`` is raised: an exception, or the text of a ValueError).
    """
    chosen = {p: [] for p in PARAMS}
    count = 0
    for _ in range(200):
        cand, ok = propose(max(16, 4 * n))
        for p in PARAMS:
            chosen[p].append(cand[p][ok])
        count += int(ok.sum())
        if count >= n:
            return {p: np.concatenate(v)[:n] for p, v in chosen.items()}
    raise failure if isinstance(failure, Exception) else ValueError(failure)


# ============================================================================= model stars

#: Parameter box of model stars when none is given: F/G/K dwarfs and subgiants, thin disk to
#: halo (the synthetic model is tuned for 4500-9000 K).
_MODEL_RANGES = {"teff": (4500.0, 8000.0), "logg": (3.0, 5.0), "feh": (-2.5, 0.5)}


class ModelStars(_Parametric):
    """Spectra of the synthetic stellar model computed at the drawn parameters (no grid).

    Every star is :func:`kspec_fluxcal.sim.stellar_model.synthetic_spectrum` at its own parameters,
    so stars can lie anywhere inside the model's range: beyond a template grid's edges (e.g.
    [alpha/M] = +0.5 when the grid stops at +0.25), between its nodes in every parameter at
    once, and from another model family than the templates (``family="B"``). Spectra are
    cached (~0.1-0.4 s each).

    Parameters
    ----------
    family : str or kspec_fluxcal.sim.stellar_model.ModelFamily
        Model family (``"A"``: the model of the synthetic template grids; ``"B"``: the second
        family, see :data:`kspec_fluxcal.sim.stellar_model.FAMILY_B`).
    resolution : int
        Resolving power of the computed spectra (Gaussian FWHM = lambda / R).
    wave_range : (float, float)
        Wavelength range, Angstrom (the BOSZ grid of ``resolution`` cut to it); it must hold
        the instrument's range and the photometric bands (Gaia G to Ks: 3000-24000 A in
        vacuum; the stars are scaled by their G).
    ranges : dict, optional
        Parameter box ``{'teff': (lo, hi), 'logg': ..., 'feh': ..., 'alpha': ...}``; default
        4500-8000 K, log g 3-5, [M/H] -2.5 to +0.5, and [alpha/M] following
        :func:`galactic_alpha` (when ``alpha`` is not given).
    nodes : dict, optional
        Grid nodes per parameter (e.g. a template grid's axes) that drawn stars keep away from
        by ``node_distance`` steps: stars between the nodes in every listed parameter at once.
    node_distance : float
        Minimum distance from ``nodes``, in local steps (< 0.5).
    beyond : dict, optional
        A template grid's box ``{'teff': (lo, hi), ...}`` the stars must leave: each lies
        outside it in at least one of its parameters (stars beyond the grid's edges). Every
        ``ranges`` a caller of :meth:`sample` gives (the simulator's standard-star ranges, a
        grid's) is then ignored: such a source is for standards, not for the whole field.
    cache_size : int
        Spectra kept in memory.
    """

    synthetic = True

    def __init__(self, family="A", *, resolution=10000, wave_range=(2500.0, 26000.0),
                 ranges=None, nodes=None, node_distance=0.2, beyond=None, cache_size=256):
        self.family = _as_family(family)
        self.label = f"model:{self.family.name}"
        self.resolving_power = float(resolution)
        self.wavelength = bosz_wavelength_grid(int(resolution), *wave_range)
        self.ranges = {**_MODEL_RANGES, **dict(ranges or {})}
        self.nodes = {p: np.asarray(v, dtype=np.float64) for p, v in dict(nodes or {}).items()}
        if not 0.0 <= node_distance < 0.5:
            raise ValueError(f"node_distance={node_distance!r}: need 0 <= distance < 0.5")
        self.node_distance = float(node_distance)
        self.beyond = {p: tuple(float(v) for v in b) for p, b in dict(beyond or {}).items()}
        for p, box in self.beyond.items():
            if p not in PARAMS or len(box) != 2 or not box[0] <= box[1]:
                raise ValueError(f"beyond[{p!r}]={box!r}: need (lo, hi) of one of {PARAMS}")
        self._cache = OrderedDict()
        self._cache_size = int(cache_size)
        self.computed = 0

    def parameter_range(self, name, margin=0.0):
        """(lo, hi) of parameter ``name`` in the source's box (``margin`` is ignored: the model
        has no grid edges to keep away from)."""
        return tuple(float(v) for v in self.ranges[name])

    def _one(self, teff, logg, feh, alpha):
        key = tuple(float(v) for v in (teff, logg, feh, alpha))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        flux = synthetic_spectrum(self.wavelength, *key, resolution=self.resolving_power,
                                  family=self.family)[0]
        self.computed += 1
        self._cache[key] = flux
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return flux

    def spectrum(self, teff, logg, feh, alpha=None):
        """Surface flux (erg/s/cm^2/A) of the model at the given parameters.

        Parameters
        ----------
        teff, logg, feh, alpha : float or array_like
            Teff, log g, [M/H] and [alpha/M], broadcast together; ``alpha`` None follows
            :func:`galactic_alpha` of ``feh``.

        Returns
        -------
        numpy.ndarray
            On :attr:`wavelength`: (npoint, nwave), or (nwave,) for scalar parameters.
        """
        scalar = all(np.ndim(v) == 0 for v in (teff, logg, feh, alpha))
        alpha = galactic_alpha(feh) if alpha is None else alpha
        t, g, m, a = (np.atleast_1d(v) for v in np.broadcast_arrays(teff, logg, feh, alpha))
        out = np.stack([self._one(*p) for p in zip(t, g, m, a, strict=True)])  # a few stars
        return out[0] if scalar else out

    def sample(self, rng, n, ranges=None, **_):
        """Draw ``n`` stars uniformly in the box (intersected with ``ranges``, unless
        ``beyond`` is set), off ``nodes``, outside ``beyond``.

        Returns
        -------
        dict of str to numpy.ndarray
            ``teff``, ``logg``, ``feh``, ``alpha``.
        """
        ranges = {} if self.beyond else dict(ranges or {})
        names = [*PARAMS[:3], *(["alpha"] if "alpha" in self.ranges else [])]
        bounds = {}
        for p in names:
            lo, hi = self.ranges[p]
            want = ranges.get(p, (lo, hi))
            bounds[p] = (max(lo, want[0]), min(hi, want[1]))
            if bounds[p][0] > bounds[p][1]:
                raise ValueError(f"{self.label}: the {p} range {lo:g}-{hi:g} does not overlap "
                                 f"the requested {want[0]:g}-{want[1]:g}")

        def propose(m):
            cand = {p: rng.uniform(*bounds[p], m) for p in names}
            if "alpha" not in cand:
                cand["alpha"] = galactic_alpha(cand["feh"])
            ok = np.ones(m, bool)
            for p, nodes in self.nodes.items():
                ok &= off_nodes(cand[p], nodes, self.node_distance)
            if self.beyond:
                ok &= np.any([(cand[p] < lo) | (cand[p] > hi)
                              for p, (lo, hi) in self.beyond.items()], axis=0)
            return cand, ok

        return _accepted(n, propose, f"{self.label}: could not draw {n} stars in {bounds} away "
                         f"from the nodes {self.nodes}" + (f" and outside {self.beyond}"
                                                          if self.beyond else ""))

    def describe(self):
        """What to record in a survey manifest."""
        return {"kind": "model", "label": self.label, "family": self.family.name,
                "resolution": self.resolving_power,
                "wave_range": [float(self.wavelength[0]), float(self.wavelength[-1])],
                "ranges": {p: [float(v) for v in r] for p, r in self.ranges.items()},
                "nodes": {p: v.tolist() for p, v in self.nodes.items()},
                "node_distance": self.node_distance,
                "beyond": {p: list(b) for p, b in self.beyond.items()}}


# ============================================================================= CALSPEC stars

#: Resolution of the CALSPEC STIS spectra when a file's FWHM column is unusable (KF06T2 holds
#: flux-like numbers there): G430L FWHM 5.5 A below the 5450 A merge point, G750L 9.8 A
#: above (the FWHM columns of the other files; Bohlin, Gordon & Tremblay 2014, PASP 126, 711).
CALSPEC_FWHM = (5450.0, 5.5, 9.8)
#: A FWHM column whose median over 4000-9000 A is below this (Angstrom) is not in Angstrom.
_CALSPEC_FWHM_MIN = 0.5
#: Sampling of the common grid the stars are resampled onto: ln(lambda) steps of 1e-4
#: (0.35-0.85 A over 3500-8500 A), five times finer than CALSPEC's 2.75 / 4.88 A, from 1700 A
#: (the STIS spectra's blue end) to 30000 A (past 2MASS Ks).
_CALSPEC_DLNLAM = 1e-4
_CALSPEC_RANGE = (1700.0, 30000.0)


def _calspec_index(directory):
    """INDEX.csv rows (dicts of text)."""
    path = Path(directory) / "INDEX.csv"
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError as err:
        raise InputError(path, None, f"cannot read the CALSPEC index ({err})") from None


def _number(text):
    """A CSV field as a float: NaN when it is empty, missing (None) or not a number."""
    text = (text or "").strip()
    try:
        return float(text) if text else np.nan
    except ValueError:
        return np.nan


def _spectral_class(sptype):
    """The letter of a spectral type ('sdF8' -> 'F', 'A2/3' -> 'A')."""
    text = sptype.strip().upper()
    text = text[2:] if text.startswith("SD") else text
    return text[:1]


@functools.cache
def _read_calspec(path):
    """(air wavelength, flux, FWHM) of one CALSPEC file: good points only, vacuum -> air."""
    with fits.open(path) as hdul:
        data = hdul[1].data
        wave = np.asarray(data["WAVELENGTH"], dtype=np.float64)
        flux = np.asarray(data["FLUX"], dtype=np.float64)
        fwhm = np.asarray(data["FWHM"], dtype=np.float64)
        good = np.asarray(data["DATAQUAL"]) != 0
    good &= np.isfinite(flux) & (flux > 0) & np.isfinite(wave)
    optical = good & (wave > 4000.0) & (wave < 9000.0)
    if not np.nanmedian(fwhm[optical]) > _CALSPEC_FWHM_MIN:
        edge, blue, red = CALSPEC_FWHM
        fwhm = np.where(wave < edge, blue, red)
    return vacuum_to_air(wave[good]), flux[good], fwhm[good]


class CalspecStars:
    """Real CALSPEC standard stars (HST flux standards) as simulated standard stars.

    Each star is its observed CALSPEC spectrum (FLAM at Earth; DATAQUAL = 0 and
    non-positive points dropped; vacuum wavelengths converted to air) renormalised to a
    surface flux consistent with its reference Teff: the spectrum is divided by
    ``10^(-0.4 E(B-V)_ref A_lambda / E(B-V))`` (F99) to integrate it, scaled so that the
    integral over the file's whole range is sigma Teff^4, and returned with its reddening
    (``ebv_reference``). The simulator dilutes it ((R/D)^2) and adds its own extra
    reddening: truth E(B-V) = reference + extra. Stars are resampled (cubic spline in
    ln lambda) onto one common grid, ln-lambda steps of 1e-4 over 1700-30000 A.

    Their resolution is the files' own: FWHM 5.5 A below 5450 A (STIS G430L) and 9.8 A above
    (G750L), from the FWHM column (:data:`CALSPEC_FWHM` where the column is unusable). An
    instrument sharper than that sees the spectrum as sampled.

    Parameters
    ----------
    directory : path-like
        The CALSPEC directory with ``INDEX.csv`` and the ``*.fits.gz`` files.
    names : sequence of str, optional
        Stars to use (INDEX ``name``, ``targetid`` or file name, case-insensitive). Default:
        every star of spectral class in ``classes`` with a reference Teff and log g (from the
        CALSPEC model fits) within ``teff_range``.
    teff_range : (float, float)
        Reference Teff range of the default selection, K.
    classes : str
        Spectral classes of the default selection: F and G, and A for the late-A stars whose
        model Teff falls in ``teff_range`` (BD+26 2606, A5 by type, fits as 6590 K).

    Notes
    -----
    Stars without a reference Teff or log g (BD+17 4708, HD 209458 among the F/G stars) are
    left out: their surface-flux normalisation, and so their parallax, would be undefined.
    The reference parameters are the CALSPEC headers' model fits (Bohlin et al. 2017, AJ 153,
    234); [alpha/M] and the stars' own radial velocities are unknown (truth NaN).
    """

    resolving_power = None
    synthetic = False
    label = "calspec"

    def __init__(self, directory, *, names=None, teff_range=(5000.0, 7000.0), classes="AFG"):
        self.path = Path(directory)
        rows = _calspec_index(self.path)
        if names is not None:
            rows = self._named(rows, names)
        else:
            rows = [r for r in rows if _spectral_class(r["sptype"]) in classes
                    and teff_range[0] <= _number(r["model_teff"]) <= teff_range[1]]
        rows = [r for r in rows if np.isfinite(_number(r["model_teff"]))
                and np.isfinite(_number(r["model_logg"]))]
        if not rows:
            raise InputError(self.path / "INDEX.csv", None, "no CALSPEC star with a reference "
                             "Teff and log g matches the selection")
        self.names = np.array([r["name"] for r in rows])
        self.reference = {
            key: np.array([_number(r[f"model_{col}"]) for r in rows])
            for key, col in (("teff", "teff"), ("logg", "logg"), ("feh", "logz"), ("ebv", "ebv"))}
        self.wavelength = np.exp(np.arange(np.log(_CALSPEC_RANGE[0]), np.log(_CALSPEC_RANGE[1]),
                                           _CALSPEC_DLNLAM))
        spectra, fwhm = [], []
        for k, row in enumerate(rows):  # ~20 files, read once
            wave, flux, width = _read_calspec(self.path / row["file"])
            ebv = np.nan_to_num(self.reference["ebv"][k])
            dereddened = flux * 10.0 ** (0.4 * ebv * extinction_per_ebv(wave))
            scale = STEFAN_BOLTZMANN * self.reference["teff"][k] ** 4 / np.trapezoid(
                dereddened, wave)
            ln_w = np.log(wave)
            inside = np.clip(np.log(self.wavelength), ln_w[0], ln_w[-1])
            spectra.append(scale * CubicSpline(ln_w, flux)(inside))
            fwhm.append(np.interp(self.wavelength, wave, width))
        self._flux = np.stack(spectra)
        self._fwhm = np.median(np.stack(fwhm), axis=0)

    def _named(self, rows, names):
        """The INDEX rows of the named stars; an error names those missing or unusable."""
        wanted = {n.strip().lower() for n in names}
        keys = [{r["name"].lower(), r["targetid"].lower(), r["file"].lower()} for r in rows]
        chosen = [r for r, k in zip(rows, keys, strict=True) if k & wanted]
        unknown = wanted - set().union(*(k for k in keys if k & wanted))
        unusable = [r["name"] for r in chosen if not (np.isfinite(_number(r["model_teff"]))
                                                      and np.isfinite(_number(r["model_logg"])))]
        if unknown or unusable:
            raise InputError(self.path / "INDEX.csv", None,
                             f"unknown stars {sorted(unknown)}; without a reference Teff and "
                             f"log g (no surface-flux normalisation): {unusable}")
        return chosen

    def native_fwhm(self, wavelength):
        """FWHM of the spectra's own resolution at ``wavelength``, Angstrom (median over the
        stars of the files' FWHM columns)."""
        return np.interp(wavelength, self.wavelength, self._fwhm)

    def sample(self, rng, n, ranges=None, **_):
        """Draw ``n`` different stars of the list (repeats only when ``n`` exceeds it);
        ``ranges`` is ignored (the stars are what they are).

        Returns
        -------
        dict of str to numpy.ndarray
            Reference ``teff``, ``logg``, ``feh`` (NaN where unknown), ``alpha`` (NaN),
            ``ebv_reference``, ``rv_reference`` (NaN: the star's own velocity is in its
            spectrum but not known here), ``name`` and ``index`` (row in the list).
        """
        index = rng.choice(self.names.size, n, replace=n > self.names.size)
        return {"teff": self.reference["teff"][index], "logg": self.reference["logg"][index],
                "feh": self.reference["feh"][index], "alpha": np.full(n, np.nan),
                "ebv_reference": self.reference["ebv"][index], "rv_reference": np.full(n, np.nan),
                "name": self.names[index], "index": index}

    def spectra(self, params):
        """Surface fluxes times the reference reddening of the drawn stars, (nstar, nwave)."""
        return self._flux[np.asarray(params["index"], dtype=np.int64)]

    def describe(self):
        """What to record in a survey manifest."""
        return {"kind": "calspec", "label": self.label, "path": str(self.path.resolve()),
                "stars": self.names.tolist()}
