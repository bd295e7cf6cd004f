"""Telluric absorption: the O2 and H2O bands as a two-parameter model, fitted from an
exposure's standards jointly and evaluated on every fiber's own pixels and line spread.

Model
-----
At high resolution the atmosphere transmits exp(-o2 tau_O2(lambda) - h2o tau_H2O(lambda)),
tau_s the optical depth of species s at airmass 1 and the reference water column (from a
line list: Lorentzian lines whose strengths give the listed equivalent widths at unit
column, through the Lorentzian curve of growth, :mod:`kspec_fluxcal.line_growth`). A fiber
sees that transmission convolved with its line spread (Gaussian, FWHM(lambda) of the
exposure times the fiber's own scale) and sampled at its pixels. ``o2`` is ~ the airmass
(O2 is well mixed), ``h2o`` ~ the airmass times the precipitable water in units of the
reference column: reported per exposure, they follow water vapour over a night. The fit
is Gauss-Newton in (o2, h2o) on the standards' observed transmissions, every star on its
own pixels.

The default line list is a synthetic stand-in (see ``data/make_telluric_lines.py``); real
data want a list from HITRAN for the site, given by the ``[telluric] lines`` option.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse

from ._inputs import refuse_repeated_columns
from ._lagrange import lagrange_matrix
from ._nan import nan_to_num
from ._telluric_kernels import _Sampler
from .constants import FWHM_PER_SIGMA, PIXEL_OUTLIER_SIGMA
from .errors import ConfigError
from .line_growth import lorentz_strength
from .wavelength import distinct_rows

__all__ = ["telluric_lines", "optical_depths", "line_optical_depth", "high_resolution_grid",
           "sample_transmission", "transmission", "divide_transmission", "fit_telluric",
           "uncovered_red", "TELLURIC_LINES"]

#: Line lists shipped with the package, by name.
TELLURIC_LINES = ("telluric_lines",)
#: Step of the high-resolution grid, Angstrom: five points per FWHM of the narrowest lines.
_STEP = 0.01
#: The high-resolution transmission is averaged in boxes of at least this many steps (0.1 A:
#: equivalent widths kept exactly, the line spread widened by box^2/12 in variance) before
#: the line-spread kernels, which then need that many times fewer terms.
_BOX = 10
#: In the fit, boxes grow with the narrowest line spread sampled, up to sigma /
#: _BOX_PER_SIGMA (the boxes' moments keep the sum exact to third order, see _Sampler).
_BOX_PER_SIGMA = 3.0
#: Lorentzian wings are summed this far from each line centre, Angstrom.
_WING = 6.0
#: Gauss-Newton iterations of the fit (it converges in 3-4 from the airmass).
_ITERATIONS = 8
#: Fits of the columns at most, the outliers of each left out of the next.
_REJECTION_PASSES = 3
#: ... stopped when a step is smaller than this, in columns (their errors are ~0.01-0.05).
_TOLERANCE = 1e-4


@functools.cache
def telluric_lines(source="telluric_lines"):
    """The telluric line list: a packaged name or a CSV file.

    Returns
    -------
    dict of numpy.ndarray
        ``wavelength`` (air, Angstrom), ``water`` (bool: H2O, else O2), ``ew`` (equivalent
        width at unit column, Angstrom), ``hwhm`` (Lorentzian, Angstrom) and ``strength``
        (integrated optical depth at unit column, Angstrom), sorted by wavelength.

    Raises
    ------
    ConfigError
        No such file; a missing column; a line (named by its line number and column) whose
        species is not O2 or H2O, whose equivalent width or half width is not a positive
        number, or whose wavelength is not in air Angstrom (3000-30000).
    """
    name = os.fspath(source)
    if name in TELLURIC_LINES:
        text = resources.files("kspec_fluxcal").joinpath(f"data/{name}.csv").read_text()
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(name, None, f"no such telluric line list (packaged: "
                              f"{', '.join(TELLURIC_LINES)})")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no column
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(name, None, f"not a readable CSV text file ({err})") from None
    wave, water, ew, hwhm = _parse_lines(name, text)
    order = np.argsort(wave)
    out = {"wavelength": wave[order], "water": water[order], "ew": ew[order],
           "hwhm": hwhm[order]}
    out["strength"] = lorentz_strength(out["ew"], out["hwhm"])
    return out


#: Pixels this far (Angstrom) beyond a line list's reddest line are said to have no telluric
#: model: its lines' wings reach only _WING, and a list ending inside a band's red wing (the
#: stand-in's 8950-9190 A band) is no reason to warn.
_UNCOVERED = 100.0
#: The strong water band beyond the stand-in list (air, Angstrom): water's 0.94 micron band,
#: named in the message when the pixels reach it.
_WATER_094 = (9300.0, 9700.0)


def uncovered_red(wavelength, source="telluric_lines"):
    """Say which of an exposure's pixels lie redder than a telluric line list reaches.

    Parameters
    ----------
    wavelength : array_like
        Pixel wavelengths, Angstrom (air); NaN ignored.
    source : str or path-like
        The line list (as for :func:`telluric_lines`).

    Returns
    -------
    str or None
        A message naming the list, its last line and the uncovered range (and the strong
        water band near 9300-9700 A when the pixels reach it); None when the list covers
        the pixels to within :data:`_UNCOVERED` A.
    """
    last = float(telluric_lines(source)["wavelength"][-1])
    top = float(np.nanmax(wavelength, initial=-np.inf))
    if not top > last + _UNCOVERED:
        return None
    band = (f" (water absorbs strongly near {_WATER_094[0]:.0f}-{_WATER_094[1]:.0f} A)"
            if top > _WATER_094[0] else "")
    return (f"the telluric line list ({os.fspath(source)}) ends at {last:.0f} A: the pixels "
            f"at {last:.0f}-{top:.0f} A have no telluric correction{band}; give a line list "
            "and a telluric mask that cover them ([telluric] lines, [masks] telluric)")


#: Columns of a telluric line list, and the wavelengths (air, Angstrom) its lines may have:
#: a list in nm or micron, or of another region, is refused rather than silently unused.
_LINE_COLUMNS = ("wavelength", "species", "ew", "hwhm")
_LINE_RANGE = (3000.0, 30000.0)


def _parse_lines(name, text):
    """The columns of a line list's CSV text (wavelength, water, ew, hwhm), every value
    checked: a line with a zero width, a non-positive equivalent width or another species
    would otherwise vanish from the model (or count as O2) without a word."""
    rows = [(k, r) for k, r in enumerate(text.splitlines(), start=1)
            if r.strip() and not r.startswith("#")]
    if not rows:
        raise ConfigError(name, None, "empty telluric line list (expected CSV columns "
                          f"{', '.join(_LINE_COLUMNS)})")
    head = [h.strip() for h in rows[0][1].split(",")]
    missing = [c for c in _LINE_COLUMNS if c not in head]
    if missing:
        raise ConfigError(name, f"line {rows[0][0]}", f"missing column(s) {', '.join(missing)}"
                          f" (expected CSV columns {', '.join(_LINE_COLUMNS)})")
    if len(rows) < 2:
        raise ConfigError(name, None, "no lines (only a header)")
    refuse_repeated_columns(head, _LINE_COLUMNS, ConfigError, name, f"line {rows[0][0]}")
    where = {c: head.index(c) for c in _LINE_COLUMNS}
    values = {c: [] for c in _LINE_COLUMNS}
    lo, hi = _LINE_RANGE
    for number, row in rows[1:]:
        cells = [c.strip() for c in row.split(",")]
        if len(cells) != len(head):
            raise ConfigError(name, f"line {number}", f"{len(cells)} fields, the header has "
                              f"{len(head)}")
        species = cells[where["species"]].upper()
        if species not in ("O2", "H2O"):
            raise ConfigError(name, f"line {number}, column species",
                              f"{cells[where['species']]!r}: the model has O2 and H2O only")
        values["species"].append(species == "H2O")
        for column in ("wavelength", "ew", "hwhm"):
            text_value = cells[where[column]]
            try:
                value = float(text_value)
            except ValueError:
                value = np.nan
            bad = (not np.isfinite(value) or value <= 0.0
                   or (column == "wavelength" and not lo <= value <= hi))
            if bad:
                need = (f"air Angstrom in {lo:g}-{hi:g} (nm or micron?)"
                        if column == "wavelength" else "a positive number, Angstrom")
                raise ConfigError(name, f"line {number}, column {column}",
                                  f"{text_value!r}: must be {need}")
            values[column].append(value)
    return (np.array(values["wavelength"]), np.array(values["species"], dtype=bool),
            np.array(values["ew"]), np.array(values["hwhm"]))


def line_optical_depth(wavelength, centre, strength, hwhm, water):
    """Optical depths of Lorentzian lines on a uniform grid, O2 and H2O apart.

    Parameters
    ----------
    wavelength : numpy.ndarray
        Uniform grid, Angstrom.
    centre, strength, hwhm : numpy.ndarray
        Line centres, integrated optical depths and Lorentzian half widths, Angstrom.
    water : numpy.ndarray of bool
        Which lines are H2O (the others O2).

    Returns
    -------
    numpy.ndarray, shape (2, n)
        O2 and H2O optical depths (each line summed within :data:`_WING` of its centre).
    """
    step = wavelength[1] - wavelength[0]
    tau = np.zeros((2, wavelength.size))
    half = int(round(_WING / step))
    offsets = np.arange(-half, half + 1)
    nearest = np.round((centre - wavelength[0]) / step).astype(int)
    cols = np.clip(nearest[:, None] + offsets[None, :], 0, wavelength.size - 1)  # (lines, window)
    dx = wavelength[cols] - centre[:, None]
    g = hwhm[:, None]
    profile = strength[:, None] * (g / np.pi) / (dx**2 + g**2)
    for k, species in enumerate((~water, water)):
        np.add.at(tau[k], cols[species].ravel(), profile[species].ravel())
    return tau


def high_resolution_grid(source="telluric_lines"):
    """The uniform high-resolution grid spanning a line list (Angstrom, step :data:`_STEP`)."""
    lines = telluric_lines(source)
    return np.arange(lines["wavelength"][0] - _WING, lines["wavelength"][-1] + _WING, _STEP)


@functools.lru_cache(maxsize=8)
def optical_depths(source="telluric_lines"):
    """High-resolution optical depths at unit column over the line list's span.

    Returns
    -------
    wavelength : numpy.ndarray
        Uniform grid, Angstrom (air), step :data:`_STEP`.
    tau : numpy.ndarray, shape (2, n)
        O2 and H2O optical depths.
    """
    lines = telluric_lines(source)
    wave = high_resolution_grid(source)
    return wave, line_optical_depth(wave, lines["wavelength"], lines["strength"],
                                    lines["hwhm"], lines["water"])


class _Boxes(NamedTuple):
    """A high-resolution grid cut into boxes of ``box`` points (the first ``n`` points)."""

    box: int
    n: int
    centres: np.ndarray  # (n / box,) box centres
    moments: np.ndarray  # (box, 3): zeroth, first and second moments about the centre
    active: np.ndarray  # (n / box,) boxes with absorption
    hr_active: np.ndarray  # (n,) their points
    # (n / box,) the species a box's points absorb by: 0 O2 only, 1 both, 2 H2O only (or None)
    kind: np.ndarray = None


def _boxes(hr_wave, active, box):
    """:class:`_Boxes` of ``hr_wave`` (``active``: its points with absorption)."""
    step = hr_wave[1] - hr_wave[0]
    n = hr_wave.size // box * box
    offset = (np.arange(box) - 0.5 * (box - 1)) * step
    boxed = active[:n].reshape(-1, box).any(axis=1)
    return _Boxes(box, n, hr_wave[:n].reshape(-1, box).mean(axis=1),
                  np.stack([np.ones(box), offset, offset**2], axis=1) / box, boxed,
                  np.repeat(boxed, box))


@functools.lru_cache(maxsize=8)
def _line_list_boxes(source, box):
    """The line list's :class:`_Boxes` and its optical depths at their active points (the
    same for every exposure whose narrowest line spread gives this box size)."""
    hr_wave, tau = optical_depths(source)
    boxes = _boxes(hr_wave, tau.sum(axis=0) > 1e-9, box)
    has = (tau[:, :boxes.n].reshape(2, -1, box) != 0).any(axis=2)
    boxes = boxes._replace(kind=np.where(has[0] & has[1], 1, np.where(has[0], 0, 2)))
    # Each species' row contiguous (the boolean index gives them strided): a model's exp and
    # derivatives read them at every evaluation, 1.5x faster so; float32: see _Model.__call__.
    active = np.ascontiguousarray(tau[:, :boxes.n][:, boxes.hr_active], dtype=np.float32)
    active.flags.writeable = False  # shared by every model of this box size
    return boxes, active


def _box_size(hr_wave, narrowest):
    """Points per box: a third of the narrowest sigma, at least :data:`_BOX`."""
    if not np.isfinite(narrowest):
        return _BOX
    return max(_BOX, int(narrowest / _BOX_PER_SIGMA / (hr_wave[1] - hr_wave[0])))


def sample_transmission(hr_wave, hr_transmission, wavelength, sigma):
    """A high-resolution transmission (uniform grid) seen at pixels through Gaussian line
    spreads of ``sigma`` (Angstrom, per pixel or one); 1 where it is 1 within reach."""
    boxes = _boxes(hr_wave, hr_transmission < 1.0, _BOX)
    sampler = _Sampler(boxes, wavelength, sigma)
    values = hr_transmission[None, :sampler.n][:, boxes.hr_active][:, sampler.points]
    return sampler.sample(values, [1.0])[0]


class _Model:
    """The telluric model of a line list at distinct rows of pixels, each row with its own
    line-spread scale (:func:`~kspec_fluxcal.wavelength.distinct_rows`)."""

    def __init__(self, rows, lsf, source):
        wave, scale = rows[:, 1:], rows[:, 0]
        finite = np.isfinite(wave)
        fwhm = lsf.fwhm(np.where(finite, wave, 1.0))
        # The narrowest (NaN: no wavelength or no scale), once: 14 fibers' own solutions are
        # 57k pixels, each pass over them ~0.1 ms. On one scale, the narrowest FWHM's sigma
        # (rounding is monotonic: the same value), the pixels' sigmas only if they are sampled.
        def sigmas():
            return np.where(finite, fwhm * scale[:, None] / FWHM_PER_SIGMA, np.nan)

        if 0 < scale[0] < np.inf and np.all(scale == scale[0]):
            narrowest = float(np.fmin.reduce(fwhm, where=finite, initial=np.inf, axis=None)
                              * scale[0] / FWHM_PER_SIGMA)
            sigma = None
        else:
            sigma = sigmas()
            narrowest = float(np.nanmin(sigma, initial=np.inf))
        boxes, tau = _line_list_boxes(source, _box_size(optical_depths(source)[0], narrowest))
        self.shape = wave.shape
        self.nodes = _Nodes.of(wave, finite, narrowest, lsf, scale)
        if self.nodes is None:
            self.sampler = _Sampler(boxes, wave, sigmas() if sigma is None else sigma)
        else:
            self.sampler = _Sampler(boxes, self.nodes.wave, self.nodes.sigma)
            self.nodes = self.nodes.interpolation(self.sampler.index, wave, finite)
        tau = tau[:, self.sampler.points]  # the absorbing points the pixels reach
        order, box = self.sampler.order, self.sampler.box
        # In the sampler's order of boxes (its matrix's columns): each species' boxes together
        # (take: contiguous, not an indexed copy copied again, 0.6 -> 0.15 ms).
        self.tau = tau if order is None else np.take(tau.reshape(2, -1, box), order, 1)
        self.tau = self.tau.reshape(2, -1)
        self._reach = self.sampler.index if self.nodes is None else self.nodes.index
        # The last evaluation, (o2, h2o) and its changes (:meth:`_changes`): a fit ends where
        # the next one starts, and the reference grid and the fibers are evaluated at the
        # fitted columns again (T alone is the first of the derivatives' rows, the same sums).
        self._last = (None, None)

    def __call__(self, o2, h2o, derivatives=False, where=None):
        """T (rows, pixels), or the list of T, dT/do2 and dT/dh2o; with ``where``
        (:meth:`positions` of flat pixel indices), at those pixels only (k, pixels)."""
        columns, changes = self._last  # one read: threads may share the model
        if columns != (float(o2), float(h2o)) or (derivatives and len(changes) == 1):
            changes = self._changes(self._moments(float(o2), float(h2o), derivatives))
            self._last = ((float(o2), float(h2o)), changes)
        outside = (1.0, 0.0, 0.0)[:3 if derivatives else 1]
        # The values outside the absorption plus its changes where it reaches; a fit's ~1k
        # pixels without whole rows to gather them from (two stars' 8k: 60 -> 15 us).
        size, reach, source = (int(np.prod(self.shape)), self._reach, slice(None)) \
            if where is None else where
        out = np.empty((len(outside), size))
        for row, value, change in zip(out, outside, changes, strict=False):
            row.fill(value)
            row[reach] += change[source]
        return out if where is not None else out.reshape((len(outside),) + self.shape)

    def positions(self, flat):
        """The pixels ``flat`` (indices into the rows) as :meth:`__call__`'s ``where``: their
        number, those the absorption reaches (among them) and their places among its."""
        reach = self._reach
        place = np.minimum(np.searchsorted(reach, flat), max(reach.size - 1, 0))
        hit = np.flatnonzero(reach[place] == flat) if reach.size else np.zeros(0, np.intp)
        return flat.size, hit, place[hit]

    def _moments(self, o2, h2o, derivatives):
        """The boxes' moments (k, boxes + 1, 3) of the deficits (outside - values) of T, and
        of dT/do2 and dT/dh2o with ``derivatives``, at columns (o2, h2o)."""
        # In the order of operations of exp(-o2 tau_O2 - h2o tau_H2O), in float32, whose exp
        # numpy vectorises (5x faster than float64's): errors ~1e-7 move no T by 1e-7. A box
        # of one species (all but a few) has the other's terms zero: -o2 tau_O2 (- 0) and (-0
        # -) h2o tau_H2O are its exponent to the bit, and its other derivative's moments zero
        # (columns >= 0: T finite): 7 passes over a row's 57k absorbing points, not 11 (-25 %).
        tau, box, n = self.tau, self.sampler.box, self.tau.shape[1]
        split = self.sampler.split is not None and 0 <= o2 < np.inf and 0 <= h2o < np.inf
        start, end = self.sampler.split if split else (0, n)  # (the boxes of both species)
        # One buffer for the exponent, T's deficit and the derivatives' terms (1.8 -> 0.7 MB).
        work = np.empty(n + end - start if derivatives else n)
        np.multiply(tau[0, :end], -o2, dtype=np.float64, out=work[:end])
        work[start:end] -= np.multiply(tau[1, start:end], h2o, dtype=np.float64)
        np.multiply(tau[1, end:], -h2o, dtype=np.float64, out=work[end:n])
        hr = work[:n].astype(np.float32)
        np.exp(hr, out=hr)
        boxed = np.zeros((3 if derivatives else 1, n // box + 1, 3))
        np.subtract(1.0, hr, out=work[:n])
        np.matmul(work[:n].reshape(-1, box), self.sampler.moments, out=boxed[0, :-1])
        if derivatives:  # tau_O2 T up to the H2O-only boxes, tau_H2O T from the mixed ones on
            np.multiply(tau[0, :end], hr[:end], out=work[:end])
            np.multiply(tau[1, start:], hr[start:], out=work[end:])
            sums = work.reshape(-1, box) @ self.sampler.moments
            boxed[1, :end // box], boxed[2, start // box:-1] = sums[:end // box], sums[end // box:]
        return boxed

    def _changes(self, boxed):
        """The changes (k, reach) to the values outside the absorption at the pixels it
        reaches (``_reach``), from the deficits' (outside - values) moments ``boxed``."""
        if self.nodes is None:  # outside + (-sum) is outside - sum to the bit
            return [np.negative(self.sampler.matrix @ vector)
                    for vector in boxed.reshape(len(boxed), -1)]
        # Minus the deficits' sums at the nodes, interpolated: pixels beyond the absorption's
        # reach keep the outside value.
        at_nodes = self.sampler.sample_moments(boxed, np.zeros(len(boxed)))
        return [self.nodes.matrix @ values for values in at_nodes]


#: Rows on one line spread (their scales equal) are sampled at uniform nodes, this many per
#: narrowest sigma, and interpolated to their pixels by Lagrange polynomials on _LAGRANGE
#: nodes (T within 3e-6 of the pixels' own kernels on the lake's fibers; 4 per sigma and 6
#: nodes: 4e-6; 3 and 6: 2e-5), when the nodes number at most _NODE_SHARE of the pixels (on
#: 4096-pixel rows: 6 rows or more; 14 fibers' own solutions take half the time so).
_NODES_PER_SIGMA, _LAGRANGE, _NODE_SHARE = 3.0, 8, 0.7


class _Nodes(NamedTuple):
    """Uniform nodes ``wave`` (line spreads ``sigma``) of rows on one line spread, and
    ``matrix``, the interpolation from them to the pixels (flat ``index``) they reach."""

    wave: np.ndarray
    sigma: np.ndarray
    index: np.ndarray = None
    matrix: scipy.sparse.csr_matrix = None

    @classmethod
    def of(cls, wave, finite, narrowest, lsf, scale):
        """The nodes of rows ``wave`` (R, P; ``finite`` where they have wavelengths) whose
        sigmas (``lsf``'s times ``scale``, one per row) are at least ``narrowest``, or None
        when the scales differ or the nodes would be too many."""
        if not finite.any() or not np.all(scale == scale[0]):
            return None  # (else the sigmas are NaN only where ``wave`` is)
        step, count = narrowest / _NODES_PER_SIGMA, np.count_nonzero(finite)
        lo = float(np.min(wave, where=finite, initial=np.inf))
        hi = float(np.max(wave, where=finite, initial=-np.inf))
        if not (step > 0 and (hi - lo) / step + _LAGRANGE + 2 < _NODE_SHARE * count):
            return None
        # A node to spare at both ends: a pixel at lo or hi may round to either side of one.
        nodes = lo + (np.arange(int((hi - lo) / step) + _LAGRANGE + 3) - _LAGRANGE // 2) * step
        return cls(nodes, lsf.fwhm(nodes) * scale[0] / FWHM_PER_SIGMA)

    def interpolation(self, reached, wave, finite):
        """These nodes with the interpolation to the pixels of ``wave`` (``finite`` where
        they have wavelengths) whose nodes include ``reached`` ones (indices): the others
        keep the value outside the absorption."""
        index = np.flatnonzero(finite)
        flat = wave.ravel()  # (every pixel has a wavelength, mostly: no gather then)
        where = flat if index.size == flat.size else flat[index]
        where = (where - self.wave[0]) / (self.wave[1] - self.wave[0])
        first = np.floor(where).astype(np.intp) - (_LAGRANGE // 2 - 1)
        before = np.bincount(reached + 1, minlength=self.wave.size + 1).cumsum()  # reached
        # Whether a pixel's first node is followed by reached ones, per node: one gather per
        # pixel, not two (57k pixels of 14 fibers' own solutions).
        near = (before[_LAGRANGE:] > before[:-_LAGRANGE])[first]
        return self._replace(index=index[near], matrix=lagrange_matrix(
            where[near], self.wave.size, _LAGRANGE))


_MODELS = collections.OrderedDict()
_MODELS_KEPT = 3  # an exposure's stars, reference grid and fibers (up to ~10 MB each)
_MODELS_LOCK = threading.Lock()  # workers' threads share the cache


def _model(wavelength, lsf, scale, source):
    """The telluric model at these pixels and line spreads: a function of (o2, h2o,
    derivatives, pixels) shaped like ``wavelength`` (``pixels``: only these flat indices),
    its arrays new ones, the caller's to change. The :class:`_Model` of
    their distinct rows is reused while the same ones come back (a fit's iterations, an
    exposure's stars, reference grid and fibers on a shared solution)."""
    shape = np.shape(wavelength)
    rows, inverse = distinct_rows(wavelength, scale)
    # Keyed by the sums of the rows' bits (14 fibers' bytes hashed: 0.14 ms), a hit compared.
    bits = rows.view(np.int64)
    key = (tuple(bits.sum(axis=1).tolist()), rows.shape, tuple(lsf.coeffs), source)
    with _MODELS_LOCK:
        kept = _MODELS.get(key)
        if kept is not None:
            _MODELS.move_to_end(key)
    model = kept[1] if kept is not None and np.array_equal(kept[0], bits) else None
    if model is None:
        model = _Model(rows, lsf, source)
        with _MODELS_LOCK:
            _MODELS[key] = (bits, model)
            while len(_MODELS) > _MODELS_KEPT:
                _MODELS.popitem(last=False)

    gather = [None, None]  # the last ``pixels`` and theirs in the model (a fit's, each time)
    identity = np.array_equal(inverse, np.arange(inverse.size))

    def sample(o2, h2o, derivatives=False, pixels=None):
        if pixels is None:
            out = model(o2, h2o, derivatives)
            # Every row its own (14 fibers' own solutions): the model's rows, not a 1.4 MB copy.
            out = (out if identity else out[:, inverse]).reshape((len(out),) + shape)
        else:  # flat indices into ``wavelength``: those pixels only
            if gather[0] is not pixels:
                row, pixel = np.divmod(pixels, shape[-1])
                gather[:] = pixels, model.positions(inverse[row] * shape[-1] + pixel)
            out = model(o2, h2o, derivatives, where=gather[1])
        return list(out) if derivatives else out[0]

    return sample


def transmission(wavelength, lsf, o2, h2o, *, scale=None, source="telluric_lines",
                 derivatives=False):
    """Telluric transmission seen at pixels through a line spread.

    Parameters
    ----------
    wavelength : array_like, shape (..., P)
        Pixel wavelengths, Angstrom (air); NaN pixels get 1.
    lsf : LineSpread
        The exposure's line spread (the fitted width correction included).
    o2, h2o : float
        Columns: O2 in airmasses, H2O in airmasses x reference water columns.
    scale : array_like, shape (...), optional
        Each row's own line-spread scale (a fiber's FWHM over the exposure's).
    source : str
        Line list (see :func:`telluric_lines`).
    derivatives : bool
        Also return dT/do2 and dT/dh2o.

    Returns
    -------
    numpy.ndarray, shaped like ``wavelength`` (or a list of three).
    """
    return _model(wavelength, lsf, scale, source)(o2, h2o, derivatives)


def divide_transmission(values, wavelength, lsf, columns, errors, *, scale=None,
                        source="telluric_lines"):
    """Divide a factor and its variance by the telluric transmission at their pixels, in place.

    Parameters
    ----------
    values : numpy.ndarray, shape (2,) + wavelength's
        A factor F and its variance V; they become F / T and V / T^2 + F^2 var(T) / T^4,
        var(T) from the columns' errors through dT/do2 and dT/dh2o.
    wavelength, lsf, scale, source
        As for :func:`transmission`.
    columns, errors : (float, float)
        (o2, h2o) and their errors.
    """
    trans, d_o2, d_h2o = _model(wavelength, lsf, scale, source)(*columns, derivatives=True)
    # In place, the formulas' operations in their order (T^4 as (T^2)^2: pow(T, 4) is 100x
    # slower), in the derivatives' own arrays: on 14 fibers' own solutions each fresh
    # temporary is 0.5 MB of new pages.
    factor, variance = values
    var_t = np.multiply(d_o2, errors[0], out=d_o2)
    term = np.multiply(d_h2o, errors[1], out=d_h2o)
    var_t *= var_t
    var_t += np.square(term, out=term)
    trans2 = np.square(trans, out=term)
    variance /= trans2
    var_t *= np.square(factor)
    var_t /= np.square(trans2, out=trans2)
    variance += var_t
    factor /= trans


def fit_telluric(wavelength, observed, weight, lsf, *, start=(1.0, 1.0), scale=None,
                 source="telluric_lines"):
    """The columns (o2, h2o) that best explain observed transmissions, all stars at once.

    Parameters
    ----------
    wavelength : numpy.ndarray, shape (S, P)
        Each star's own pixel wavelengths.
    observed : numpy.ndarray, shape (S, P)
        Observed transmission (star / its model, divided by the smooth response).
    weight : numpy.ndarray, shape (S, P)
        Inverse variances of ``observed``; 0 outside the bands and for bad pixels.
    lsf : LineSpread
    start : (float, float)
        Starting columns (e.g. the airmass for both).
    scale : numpy.ndarray, shape (S,), optional
        Each star's own line-spread scale.

    Returns
    -------
    dict
        ``o2``, ``h2o`` (NaN when the pixels do not constrain them: no band in range),
        ``o2_err``, ``h2o_err`` (inflated by sqrt(chi^2/dof) when above 1), ``chi2_dof``,
        ``model`` (S, P): the fitted transmission at every pixel, and ``outliers`` (S, P):
        pixels left out of the fit, beyond ``PIXEL_OUTLIER_SIGMA`` robust sigmas of it
        (cosmic rays).
    """
    sample = _model(wavelength, lsf, scale, source)
    y = nan_to_num(observed, nan=1.0).ravel()
    w = np.where(np.isfinite(observed), weight, 0.0).ravel()
    params = np.array(start, dtype=np.float64)
    rejected = np.zeros(w.shape, bool)
    for _ in range(_REJECTION_PASSES):
        params, fit = _gauss_newton(sample, y, w, params)
        # A pixel beyond PIXEL_OUTLIER_SIGMA robust sigmas (a cosmic ray in a band: one
        # pixel at 3 times the star's counts in the B band took O2 from 1.13 to 1.36 and
        # the A band's calibration 16 % off) is left out, and the columns fitted again.
        if not fit.pixels.size:
            break
        z = np.abs(fit.residual) * np.sqrt(fit.weight)
        out = fit.pixels[z > PIXEL_OUTLIER_SIGMA * max(1.0, 1.4826 * float(np.median(z)))]
        if not out.size:
            break
        rejected[out] = True
        w = np.where(rejected, 0.0, w)
    else:
        params, fit = _gauss_newton(sample, y, w, params)
    dof = max(fit.pixels.size - int(fit.free.sum()), 1)
    chi2_dof = float(np.sum(fit.weight * fit.residual**2) / dof)
    errors = np.full(2, np.nan)
    if fit.free.any():
        j = fit.jac[:, fit.free]
        cov = np.linalg.inv(j.T @ (fit.weight[:, None] * j)) * max(chi2_dof, 1.0)
        errors[fit.free] = np.sqrt(np.diag(cov))
    values = np.where(fit.free, params, np.nan)
    return {"o2": values[0], "h2o": values[1], "o2_err": errors[0], "h2o_err": errors[1],
            "chi2_dof": chi2_dof, "model": sample(*params), "outliers": rejected.reshape(
                np.shape(observed))}


class _Fitted(NamedTuple):
    """The weighted pixels of a Gauss-Newton fit (flat indices) at its columns."""

    pixels: np.ndarray
    weight: np.ndarray
    residual: np.ndarray  # observed - model
    jac: np.ndarray  # (pixels, 2): dT/do2, dT/dh2o
    free: np.ndarray  # (2,) the columns the pixels constrain


def _gauss_newton(sample, y, w, params):
    """Gauss-Newton iterations of :func:`fit_telluric` from ``params`` (``y`` and ``w``
    flat): the columns and the :class:`_Fitted` at them. Only the weighted pixels (the
    stars' pixels in the bands: ~15 %) enter the sums, and only they are sampled."""
    params = np.array(params, dtype=np.float64)
    free = np.ones(2, bool)
    weighted = np.flatnonzero(w > 0)
    yw, ww = y[weighted], w[weighted]
    for _ in range(_ITERATIONS):
        model, d_o2, d_h2o = sample(*params, derivatives=True, pixels=weighted)
        jac = np.stack([d_o2, d_h2o], axis=1)
        # Each column's sum of w jac^2 as a running sum, the former's value: which columns
        # are free is decided as before.
        sens = np.cumsum(jac**2 * ww[:, None], axis=0)[-1] if weighted.size else np.zeros(2)
        free = sens > 1e-8 * max(sens.max(), 1e-300)
        if not free.any():
            break
        j = jac[:, free]
        normal = j.T @ (ww[:, None] * j)
        step = np.linalg.solve(normal, j.T @ (ww * (yw - model)))
        if np.all(np.abs(step) < _TOLERANCE):
            return params, _Fitted(weighted, ww, yw - model, jac, free)  # converged
        params[free] = np.maximum(params[free] + step, 0.0)
    model, d_o2, d_h2o = sample(*params, derivatives=True, pixels=weighted)
    return params, _Fitted(weighted, ww, yw - model, np.stack([d_o2, d_h2o], axis=1), free)
