"""The survey-wide calibration model: per-night throughput and extinction, a grey factor per
exposure and chromatic seeing/refraction terms, fitted from the archive of per-exposure
calibrations as sums of per-exposure normal equations.

Model
-----
For exposure e of night n (a *session*: one instrument setup on one night), with its own
standards' smooth response ``own_smooth`` (per Angstrom, no telluric absorption) on the fit
grid (the archive's ln-lambda grid, every ``stride``-th point, inside the setup's range)::

    y_e(l) = ln(1 / (own_smooth_e(l) exptime_e))
           = g_e + S_n(l) - 0.4 ln(10) k_n(l) X_e + s_e C_s(l) + d_e C_d(l) + noise

``S_n`` is the throughput of the night (counts/s/A per flux unit, in ln), ``k_n`` its
extinction curve (mag/airmass), ``X_e`` the airmass, ``s_e`` the seeing (header SEEING, arcsec
FWHM) minus :data:`SEEING_REFERENCE`, ``d_e = X_e^2 - 1 = tan^2 z`` (differential refraction
moves the star in the fiber by ~tan z, and a small offset loses light as its square), ``C_s``
and ``C_d`` survey-wide chromatic terms; ``g_e`` the grey factor of the exposure (aperture,
clouds) is a free nuisance parameter, eliminated per exposure, so that each exposure's
contribution to the normal equations is a small matrix that sums. Every curve is a cubic
B-spline in ln(lambda) (:class:`ModelSpec`), except ``C_d``: a star positioned on its fiber at
the guide wavelength loses light to differential refraction as the square of its
displacement, whose shape in wavelength is that of the refractive index of air
(:func:`kspec_fluxcal.refraction.refraction_loss_shape`), so ``C_d`` is that shape times one
fitted amplitude. Refraction (~X^2 - 1) and extinction (~X) differ only in their curvature
over the survey's airmasses: a free curve for ``C_d`` trades with ``k_n`` (the extinction's
error grew from 0.008 to 0.012 mag/airmass in ``benchmarks/survey_model.py``), the physical
shape does not. Nights deviate from the survey means (``S_n = S
+ dS_n``, ``k_n = k + dk_n``) with Gaussian priors of widths ``throughput_sigma`` and
``extinction_sigma``: a night with few exposures or a small airmass range borrows from the
others, a night without standards gets the means.

Grey
----
A constant added to S, to k (times X) or to the chromatic terms is absorbed by ``g_e``: every
curve is pinned to zero mean over :data:`REFERENCE_RANGE` (``S`` is reported with the nights'
grey added back, :func:`kspec_fluxcal.survey.levels.fit_levels`). The grey part of the
extinction is the slope of ``g_e`` against airmass within a night (Bouguer's line),
regularised towards the survey's slope: on photometric nights it is the grey extinction;
clouds make it noisy.

Errors
------
Each point is weighted by its formal variance, the shape error of one standard and the
exposures' scatter about the model, each exposure by its residual
(:mod:`kspec_fluxcal.survey.weights`); the grey factors give each night's Bouguer line
(:mod:`kspec_fluxcal.survey.levels`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import numpy as np

from .._bspline import design_matrix
from ..constants import GUIDE_WAVELENGTH
from ..refraction import refraction_loss_shape
from .archive import ARCHIVE_GRID, archive_grid

__all__ = ["ModelSpec", "Statistics", "SurveyModel", "exposure_statistics", "solve",
           "residuals", "REFERENCE_RANGE", "SEEING_REFERENCE", "TERMS", "MAG_TO_LN"]

#: Curves are pinned to zero mean over this range (Angstrom, clipped to the setup's range): the
#: grey constant is the exposures' (issue 13: k is compared after removing one).
REFERENCE_RANGE = (4000.0, 9000.0)
#: Seeing the chromatic seeing term is centred on, arcsec FWHM (a typical site median).
SEEING_REFERENCE = 1.5
#: The chromatic terms the model can carry.
TERMS = ("seeing", "refraction")
#: ln(10) / 2.5: magnitudes to natural log of a flux ratio.
MAG_TO_LN = 0.4 * np.log(10.0)
#: Pin of the grey direction of each curve (inverse variance of its mean, natural units): far
#: stronger than any data term, which is blind to it.
_GREY_PIN = 1e10
#: Second-difference penalty relative to the data's mean diagonal: bridges knot intervals
#: without data, invisible elsewhere (as in smoothing._smooth).
_SMOOTHING = 1e-6
#: Weak priors of the survey means: the extinction curve (mag/airmass; only degenerate surveys,
#: all at one airmass, feel it) and the seeing term (ln per arcsec).
_EXTINCTION_MEAN_SIGMA = 1.0
_CHROMATIC_SIGMA = 0.1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model's bases and priors for one instrument configuration.

    Parameters
    ----------
    setup : str
        Configuration key (:func:`kspec_fluxcal.exposure.configuration_key`).
    wave_range : (float, float)
        Angstrom (air): the setup's range; the fit grid is the archive grid inside it.
    throughput_knots, extinction_knots, chromatic_knots : float
        Knot spacings of S, k and the seeing term, Angstrom at the range's median wavelength
        (uniform in ln lambda).
    terms : tuple of str
        Chromatic terms (:data:`TERMS`).
    stride : int
        Fit grid = every ``stride``-th archive grid point.
    smooth_scale : float
        Smoothing scale of the exposures' own responses, Angstrom ([combine] smooth_scale).
    throughput_sigma, extinction_sigma : float
        Prior widths of a night's deviation from the survey mean: ln throughput, mag/airmass.
    guide_wavelength : float
        Wavelength the fibers are positioned at, Angstrom: the refraction term's shape.
    refraction_sigma : float
        Prior width of the refraction term's amplitude (ln flux at 4000 A per unit tan^2 z).
    """

    setup: str
    wave_range: tuple
    throughput_knots: float = 100.0
    extinction_knots: float = 500.0
    chromatic_knots: float = 1000.0
    terms: tuple = TERMS
    stride: int = 5
    smooth_scale: float = 100.0
    throughput_sigma: float = 0.05
    extinction_sigma: float = 0.05
    guide_wavelength: float = GUIDE_WAVELENGTH
    refraction_sigma: float = 0.02

    @functools.cached_property
    def loglam(self):
        """ln(lambda) of the fit grid."""
        return np.log(archive_grid()[self.grid_index])

    @functools.cached_property
    def grid_index(self):
        """Indices of the fit grid's points in the archive grid."""
        grid = archive_grid()
        lo, hi = self.wave_range
        idx = np.arange(0, grid.size, self.stride)
        return idx[(grid[idx] >= lo) & (grid[idx] <= hi)]

    @functools.cached_property
    def _knots(self):
        x0, x1 = np.log(self.wave_range[0]), np.log(self.wave_range[1])
        mid = np.exp(0.5 * (x0 + x1))
        out = []
        for spacing in (self.throughput_knots, self.extinction_knots, self.chromatic_knots):
            nseg = max(1, int(np.ceil((x1 - x0) / (spacing / mid))))
            out.append(np.concatenate([[x0] * 3, np.linspace(x0, x1, nseg + 1), [x1] * 3]))
        return out

    @functools.cached_property
    def blocks(self):
        """Parameter blocks of a session's vector: name -> slice (S, k, then the terms)."""
        sizes = [len(t) - 4 for t in self._knots]
        names = ["throughput", "extinction", *self.terms]
        # Refraction has one column: its shape in wavelength is physics, its amplitude data.
        widths = sizes[:2] + [1 if t == "refraction" else sizes[2] for t in self.terms]
        edges = np.concatenate([[0], np.cumsum(widths)])
        return {n: slice(int(a), int(b)) for n, a, b in zip(names, edges[:-1], edges[1:],
                                                            strict=True)}

    @property
    def size(self):
        """Parameters of a session (``q``)."""
        return max(s.stop for s in self.blocks.values())

    @property
    def night_size(self):
        """Parameters a night may deviate in (``p``: throughput and extinction)."""
        return self.blocks["extinction"].stop

    def basis(self, loglam=None):
        """(points, q) design columns at ``loglam`` (default the fit grid), before each
        exposure's scales (:meth:`scales`)."""
        x = self.loglam if loglam is None else np.asarray(loglam, dtype=np.float64)
        x = np.clip(x, np.log(self.wave_range[0]), np.log(self.wave_range[1]))
        mats = [design_matrix(x, t, 3).toarray() for t in self._knots]
        terms = [self._refraction_column(x) if t == "refraction" else mats[2]
                 for t in self.terms]
        return np.concatenate(mats[:2] + terms, axis=1)

    @functools.cached_property
    def design(self):
        """:meth:`basis` on the fit grid (cached: every exposure of the setup shares it)."""
        return self.basis()

    @functools.cached_property
    def archive_design(self):
        """:meth:`basis` at every archive grid point (cached: each exposure recalibrated
        with the model takes the rows of its own range; its rows are those :meth:`basis`
        gives at the same points, which it evaluates one by one)."""
        return self.basis(np.log(archive_grid()))

    def scales(self, airmass, seeing):
        """(E, q) column scales of each exposure: 1 for S, -0.4 ln10 X for k, the terms'."""
        airmass = np.asarray(airmass, dtype=np.float64)
        seeing = np.nan_to_num(np.asarray(seeing, dtype=np.float64) - SEEING_REFERENCE)
        factors = {"throughput": np.ones_like(airmass), "extinction": -MAG_TO_LN * airmass,
                   "seeing": seeing, "refraction": airmass**2 - 1.0}
        out = np.empty((airmass.size, self.size))
        for name, block in self.blocks.items():  # a handful of blocks
            out[:, block] = factors[name][:, None]
        return out

    @functools.cached_property
    def independence(self):
        """Fit-grid step over the own responses' smoothing scale: the weight of one point."""
        step = self.stride * ARCHIVE_GRID["dlnlambda"]
        return min(1.0, step / (self.smooth_scale / float(np.exp(np.median(self.loglam)))))

    @functools.cached_property
    def _reference_loglam(self):
        lo, hi = REFERENCE_RANGE
        x = self.loglam[(self.loglam >= np.log(lo)) & (self.loglam <= np.log(hi))]
        return x if x.size else self.loglam

    def _refraction_column(self, loglam):
        """The refraction loss's shape (:func:`refraction_loss_shape`) less its mean over the
        reference range: a curve without a grey direction, so nothing to pin."""
        def shape(x):
            return refraction_loss_shape(np.exp(x), self.guide_wavelength)
        return (shape(loglam) - shape(self._reference_loglam).mean())[:, None]

    @functools.cached_property
    def pins(self):
        """(blocks, q) rows whose products with a session vector are each curve's mean over
        :data:`REFERENCE_RANGE`: the grey directions pinned to zero."""
        mean = self.basis(self._reference_loglam).mean(axis=0)
        rows = np.zeros((len(self.blocks), self.size))
        for k, (name, block) in enumerate(self.blocks.items()):
            if name != "refraction":  # mean-free by construction
                rows[k, block] = mean[block]
        return rows

    def prior(self, scale):
        """Priors of the survey means (q, q) and of a night's deviations (p, p).

        ``scale`` is the data's mean diagonal, for the smoothing penalty."""
        q, p = self.size, self.night_size
        smooth = np.zeros((q, q))
        ridge_mean = np.zeros(q)
        for name, block in self.blocks.items():
            n = block.stop - block.start
            d = np.diff(np.eye(n), n=2, axis=0)
            smooth[block, block] = _SMOOTHING * scale * d.T @ d
            ridge_mean[block] = {"throughput": 0.0,
                                 "extinction": _EXTINCTION_MEAN_SIGMA**-2,
                                 "refraction": self.refraction_sigma**-2}.get(
                name, _CHROMATIC_SIGMA**-2)
        pin = _GREY_PIN * self.pins.T @ self.pins
        mean = smooth + np.diag(ridge_mean) + pin
        ridge_night = np.zeros(p)
        ridge_night[self.blocks["throughput"]] = self.throughput_sigma**-2
        ridge_night[self.blocks["extinction"]] = self.extinction_sigma**-2
        night = smooth[:p, :p] + np.diag(ridge_night) + pin[:p, :p]
        return mean, night

    def to_dict(self):
        """The spec as plain values (stored with the model)."""
        out = dataclasses.asdict(self)
        out["wave_range"] = [float(v) for v in self.wave_range]
        out["terms"] = list(self.terms)
        return out


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class Statistics:
    """Sums of the grey-eliminated normal equations of exposures, per session (night).

    ``labels`` (sorted), ``normal`` (S, q, q), ``rhs`` (S, q), ``chi2`` (S,) (weighted sum of
    squares after the grey, for diagnostics), ``exposures`` (S,) and ``weight`` (S,) (sum of
    the exposures' Huber weights). Sums of two are :meth:`merge`; the order of a tree of
    merges fixes the rounding, so a fixed tree gives bit-identical models."""

    labels: tuple
    normal: np.ndarray
    rhs: np.ndarray
    chi2: np.ndarray
    exposures: np.ndarray
    weight: np.ndarray

    def merge(self, other):
        """The sum of two sets of statistics (sessions matched by label)."""
        labels = tuple(sorted(set(self.labels) | set(other.labels)))
        q = self.normal.shape[-1] if self.labels else other.normal.shape[-1]
        out = Statistics(labels, np.zeros((len(labels), q, q)), np.zeros((len(labels), q)),
                         np.zeros(len(labels)), np.zeros(len(labels), np.int64),
                         np.zeros(len(labels)))
        for part in (self, other):
            idx = np.searchsorted(labels, part.labels)
            for name in ("normal", "rhs", "chi2", "exposures", "weight"):
                np.add.at(getattr(out, name), idx, getattr(part, name))
        return out

    @classmethod
    def empty(cls, q):
        return cls((), np.zeros((0, q, q)), np.zeros((0, q)), np.zeros(0),
                   np.zeros(0, np.int64), np.zeros(0))


def exposure_statistics(spec, y, w, airmass, seeing, sessions):
    """Grey-eliminated normal equations of exposures, summed per session.

    Parameters
    ----------
    spec : ModelSpec
    y, w : numpy.ndarray, shape (E, J)
        ln(1 / (own_smooth exptime)) on the fit grid and the points' weights (0: no data).
    airmass, seeing : numpy.ndarray, shape (E,)
    sessions : array_like of str, shape (E,)

    Returns
    -------
    Statistics
    """
    w = np.where(np.isfinite(y), w, 0.0)
    y = np.where(w > 0, y, 0.0)
    keep = w.sum(axis=1) > 0
    if not keep.any():
        return Statistics.empty(spec.size)
    y, w = y[keep], w[keep]
    t = spec.scales(np.asarray(airmass)[keep], np.asarray(seeing)[keep])
    basis = spec.design
    total = w.sum(axis=1)
    gram = np.matmul(np.swapaxes(w[:, :, None] * basis[None], 1, 2), basis)  # (E, q, q)
    z = (w @ basis) * t
    wy = (w * y).sum(axis=1)
    normal = gram * t[:, :, None] * t[:, None, :] - z[:, :, None] * z[:, None, :] / total[
        :, None, None]
    rhs = ((w * y) @ basis) * t - z * (wy / total)[:, None]
    chi2 = (w * y * y).sum(axis=1) - wy**2 / total
    labels, inverse = np.unique(np.asarray(sessions)[keep].astype(str), return_inverse=True)
    out = Statistics(tuple(labels), np.zeros((labels.size, spec.size, spec.size)),
                     np.zeros((labels.size, spec.size)), np.zeros(labels.size),
                     np.bincount(inverse, minlength=labels.size).astype(np.int64),
                     np.zeros(labels.size))
    np.add.at(out.normal, inverse, normal)
    np.add.at(out.rhs, inverse, rhs)
    np.add.at(out.chi2, inverse, chi2)
    return out


# ----------------------------------------------------------------------------- solution


@dataclasses.dataclass
class SurveyModel:
    """A solved model: the session vectors and covariances, the survey means.

    Attributes
    ----------
    spec : ModelSpec
    labels : tuple of str
        Sessions (nights) with data.
    theta, cov : numpy.ndarray
        (S, q), (S, q, q): each session's vector (S_n, k_n, terms) and covariance.
    mean, mean_cov : numpy.ndarray
        (q,), (q, q): the survey means (a session without data), with the spread of nights.
    exposures : numpy.ndarray
        (S,) exposures fitted per session.
    tau2, star_var : numpy.ndarray
        The error model (J,): variances per fit-grid point (see the module docstring).
    """

    spec: ModelSpec
    labels: tuple
    theta: np.ndarray
    cov: np.ndarray
    mean: np.ndarray
    mean_cov: np.ndarray
    exposures: np.ndarray
    tau2: float
    star_var: float

    def session(self, labels):
        """(E, q) vectors and (E, q, q) covariances of sessions (the means where no data)."""
        labels = np.asarray(labels).astype(str)
        idx = np.searchsorted(self.labels, labels) if self.labels else np.zeros(labels.size,
                                                                                int)
        found = np.zeros(labels.size, bool)
        if self.labels:
            idx = np.clip(idx, 0, len(self.labels) - 1)
            found = np.asarray(self.labels)[idx] == labels
        theta = np.where(found[:, None], self.theta[idx] if self.labels else 0.0, self.mean)
        cov = np.where(found[:, None, None], self.cov[idx] if self.labels else 0.0,
                       self.mean_cov)
        return theta, cov

    def predict(self, sessions, airmass, seeing, loglam=None, variance=True, grid_index=None):
        """ln throughput shape (grey-free) of exposures: (E, J) mean and variance, at
        ``loglam``, or at the archive grid's points ``grid_index`` (positions or a mask), or
        (neither) on the fit grid."""
        basis = (self.spec.archive_design[grid_index] if grid_index is not None
                 else self.spec.design if loglam is None else self.spec.basis(loglam))
        theta, cov = self.session(np.atleast_1d(sessions))
        t = self.spec.scales(np.atleast_1d(airmass), np.atleast_1d(seeing))
        mean = (theta * t) @ basis.T
        if not variance:
            return mean, None
        scaled = cov * t[:, :, None] * t[:, None, :]
        # diag(B C B^T) per exposure, through one BLAS product.
        var = np.einsum("ejq,jq->ej", np.matmul(basis[None], scaled), basis)
        return mean, var

    def curve(self, name, loglam, sessions=None):
        """One block's curve (e.g. 'extinction', mag/airmass; 'throughput', ln) per session
        (default: every session with data) and its standard error: (S, J) each."""
        block = self.spec.blocks[name]
        basis = self.spec.basis(loglam)[:, block]
        theta, cov = self.session(self.labels if sessions is None else sessions)
        values = theta[:, block] @ basis.T
        var = np.einsum("ejq,jq->ej", np.matmul(basis[None], cov[:, block, block]), basis)
        return values, np.sqrt(np.maximum(var, 0.0))

    def errors(self, loglam):
        """The error model (tau^2, sigma_star^2) at ``loglam`` (interpolated)."""
        x = self.spec.loglam
        return tuple(np.interp(loglam, x, np.broadcast_to(v, x.shape))
                     for v in (self.tau2, self.star_var))

    def identity(self):
        """A short hash of the solution (bit-identical fits give the same)."""
        h = hashlib.sha1(json.dumps(self.spec.to_dict(), sort_keys=True).encode())
        for array in (self.theta, self.mean):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:12]


def solve(spec, stats, *, tau2, star_var):
    """The model from summed statistics: survey means and night deviations by a Schur
    complement over the nights (cost linear in their number), with covariances.

    Parameters
    ----------
    spec : ModelSpec
    stats : Statistics
    tau2, star_var : numpy.ndarray or float
        The error model the statistics were weighted with (recorded).

    Returns
    -------
    SurveyModel
    """
    q, p = spec.size, spec.night_size
    normal, rhs = stats.normal, stats.rhs
    scale = float(np.trace(normal.sum(axis=0))) / q if len(stats.labels) else 1.0
    prior_mean, prior_night = spec.prior(max(scale, 1.0))
    h_gg = prior_mean + normal.sum(axis=0)
    h_ng = normal[:, :p, :]  # (S, p, q): a night's deviation enters its session like the mean
    h_nn = normal[:, :p, :p] + prior_night
    inv_nn = np.linalg.inv(h_nn)
    a = inv_nn @ h_ng  # (S, p, q)
    b = inv_nn @ rhs[:, :p, None]  # (S, p, 1)
    schur = h_gg - np.einsum("spq,spr->qr", h_ng, a)
    r = rhs.sum(axis=0) - np.einsum("spq,sp->q", h_ng, b[..., 0])
    cov_g = np.linalg.inv(_symmetric(schur))
    mean = cov_g @ r
    delta = b[..., 0] - a @ mean  # (S, p)
    cov_nn = inv_nn + a @ cov_g @ np.swapaxes(a, 1, 2)
    cov_gn = -cov_g @ np.swapaxes(a, 1, 2)  # (S, q, p)
    theta = np.broadcast_to(mean, (len(stats.labels), q)).copy()
    theta[:, :p] += delta
    cov = np.broadcast_to(cov_g, (len(stats.labels), q, q)).copy()
    cov[:, :, :p] += cov_gn
    cov[:, :p, :] += np.swapaxes(cov_gn, 1, 2)
    cov[:, :p, :p] += cov_nn
    spread = np.zeros((q, q))
    spread[:p, :p] = np.diag(np.concatenate([
        np.full(spec.blocks["throughput"].stop, spec.throughput_sigma**2),
        np.full(p - spec.blocks["throughput"].stop, spec.extinction_sigma**2)]))
    shape = spec.loglam.shape
    return SurveyModel(spec, tuple(stats.labels), theta, _symmetric(cov), mean,
                       _symmetric(cov_g + spread), stats.exposures.copy(),
                       np.broadcast_to(tau2, shape).copy(),
                       np.broadcast_to(star_var, shape).copy())


def _symmetric(m):
    return 0.5 * (m + np.swapaxes(m, -1, -2))


# ----------------------------------------------------------------------------- residuals


def residuals(model, y, w, airmass, seeing, sessions):
    """Each exposure's grey and shape residual from the model.

    Parameters
    ----------
    model : SurveyModel
    y, w : numpy.ndarray, shape (E, J)
        As for :func:`exposure_statistics` (``w`` sets the grey's weights).
    airmass, seeing, sessions : array_like, shape (E,)

    Returns
    -------
    dict
        ``grey`` (E,): g_e (ln, per second); ``residual`` (E, J): y - model - g_e (NaN where
        no data); ``mean_square`` (E,): its mean square over the exposure's points.
    """
    pred, _ = model.predict(sessions, airmass, seeing, variance=False)
    w = np.where(np.isfinite(y), w, 0.0)
    r = np.where(w > 0, y - pred, 0.0)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        grey = (w * r).sum(axis=1) / total
        resid = np.where(w > 0, r - grey[:, None], np.nan)
        mean_square = np.nanmean(resid**2, axis=1) if resid.size else np.zeros(0)
    return {"grey": grey, "residual": resid, "mean_square": mean_square}
