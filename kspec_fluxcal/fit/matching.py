"""Template matching: scores of templates against the standards' spectra, each template
fitted with a smooth multiplicative correction, over the whole prepared cube in one
vectorised pass (templates moved to each star's velocity by :mod:`kspec_fluxcal.fit.shifts`).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse
import xarray as xr

from .._nan import nan_to_num
from ..constants import SPEED_OF_LIGHT_KMS
from ..wavelength import pixels_key
from .shifts import (
    keyed_velocity,
    keyed_wavelengths,
    position_margin,
    rest_positions,
    sample_moments,
    sample_rows,
    shift_operator,
    shift_spectra,
)

__all__ = ["score_templates", "score_star", "fit_corrected", "corrected_chi2", "star_correction",
           "star_corrections", "stars_corrections", "correction_parameters", "fast_mode",
           "rest_frame_star", "rest_frame_stars", "RestFrame", "score_rest_frame",
           "score_rest_frames", "score_own_templates", "ScoringTemplates",
           "sampled_rest_frames"]



def _correction_basis(wavelength, knot_spacing):
    """Basis of the smooth multiplicative correction (a constant when no knot spacing)."""
    # Looked up by the pixels' bytes: an exposure fits ~15 corrections on a few wavelength
    # solutions, and spline_basis' own look-up (pixels normalised and rounded first) took
    # 4x as long.
    return _correction_basis_cached(pixels_key(wavelength), knot_spacing or None)


# Entries: an exposure's wavelength solutions (one or a few; ~1 MB each, shared with
# spline_basis' own cache).
@functools.lru_cache(maxsize=8)
def _correction_basis_cached(wave_bytes, knot_spacing):
    from ..continuum import spline_basis

    wavelength = np.frombuffer(wave_bytes, dtype=np.float64)
    if knot_spacing:
        return spline_basis(wavelength, knot_spacing)
    basis = scipy.sparse.csr_matrix(np.ones((len(wavelength), 1)))
    return basis, basis.T.tocsr(), basis.T.tocsr(), np.zeros((1, 1))


def _corrections(flux, weights, templates, wavelength, knot_spacing):
    """Least-squares smooth corrections c such that ``flux ~ c * templates`` (N, P)."""
    return _basis_corrections(_correction_basis(wavelength, knot_spacing), flux, weights,
                              templates)


def _grouped_corrections(flux, weights, templates, wavelengths, counts, knot_spacing):
    """:func:`_corrections` of consecutive groups of rows (``counts`` rows each, on their
    own ``wavelengths``), those of groups on one basis (a set of normalised pixels: an
    exposure's stars share it) in one call; (N, P) arrays. Each row as its own call gives it,
    to the last bit: the rows' sums are their own whatever their number
    (:func:`~kspec_fluxcal.continuum.sparse_products`) and each system is solved alone; a
    call's bookkeeping (~70 us) once per basis, not per star."""
    bases = [_correction_basis(wave, knot_spacing) for wave in wavelengths]
    first = {}  # each basis' first group, which stands for it
    owner = np.repeat([first.setdefault(id(b), g) for g, b in enumerate(bases)], counts)
    out = np.empty(np.shape(templates))
    for g in first.values():
        rows = np.flatnonzero(owner == g)
        if rows.size == owner.size:
            rows = slice(None)  # all of them (the usual case): no copies
        out[rows] = _basis_corrections(bases[g], flux[rows], weights[rows], templates[rows])
    return out


def _basis_corrections(basis, flux, weights, templates):
    """:func:`_corrections` on a basis as :func:`_correction_basis` gives it."""
    coef = _coefficients(basis, flux, weights, templates)[0]
    return np.asarray((basis[0] @ coef.T).T)


def _coefficients(basis, flux, weights, templates):
    """The corrections' coefficients (N, nb) on a basis as :func:`_correction_basis` gives
    it, with the normal matrices (N, nb, nb; without the penalty) and right-hand sides
    (N, nb) they solve."""
    from ..continuum import normal_matrices, sparse_products

    _, outer_t, basis_t, penalty = basis
    nb = basis_t.shape[0]
    weights = np.broadcast_to(weights, templates.shape)
    normal = normal_matrices(outer_t, (weights * templates**2).T)
    rhs = sparse_products(basis_t, weights * flux * templates)
    scale = np.trace(normal, axis1=1, axis2=2) / nb
    scale = np.where(scale > 0, scale, 1.0)
    # A light smoothness penalty (and a tiny ridge) keeps empty knot intervals determined.
    penalised = normal + 1e-6 * scale[:, None, None] * penalty[None]
    diagonal = penalised.reshape(-1, nb * nb)[:, ::nb + 1]  # a view (ranges: ~10 us)
    diagonal += 1e-12 * scale[:, None]
    return np.linalg.solve(penalised, rhs[..., None])[..., 0], normal, rhs


def corrected_chi2(flux, weights, templates, wavelength, knot_spacing):
    """sum w (f - m)^2 of each fit of :func:`fit_corrected` (N,), from its normal equations:
    sum w f^2 - 2 c.r + c.(N c) (coefficients c, right-hand side r, normal matrix N), without
    the models (a velocity scan's 5 per star: their products with the basis and the
    residuals' passes over N x P points). Equal to the residuals' sum within rounding:
    relative to sum w f^2, ~1e-16 of it (a chi^2 of thousands, ~1e-8)."""
    coef, normal, rhs = _coefficients(_correction_basis(wavelength, knot_spacing), flux,
                                      weights, templates)
    wff = np.einsum("np,np->n", np.broadcast_to(weights, templates.shape),
                    np.square(np.broadcast_to(flux, templates.shape)))
    quad = np.einsum("na,nab,nb->n", coef, normal, coef)
    return wff - 2.0 * np.einsum("na,na->n", coef, rhs) + quad


def correction_parameters(wavelength, knot_spacing):
    """Free parameters of the smooth multiplicative correction fitted with each template (1:
    a single amplitude without knots): what a template's fit takes from a star's degrees of
    freedom."""
    from ..continuum import spline_basis

    return spline_basis(wavelength, knot_spacing)[0].shape[1] if knot_spacing else 1


def fit_corrected(flux, weights, templates, wavelength, knot_spacing):
    """Least-squares fits ``flux ~ templates * correction`` for many templates at once.

    Parameters
    ----------
    flux : numpy.ndarray, shape (P,) or (N, P)
        The spectrum, shared or per template (several spectra on one wavelength solution).
    weights : numpy.ndarray, shape (P,) or (N, P)
        Inverse variances (0 = masked), shared or per template.
    templates : numpy.ndarray, shape (N, P)
        Templates on the spectrum's pixels (already shifted).
    knot_spacing : float or None
        Knot spacing of the cubic B-spline correction (None: a constant amplitude).

    Returns
    -------
    numpy.ndarray, shape (N, P)
        The fitted models.
    """
    return _corrections(flux, weights, templates, wavelength, knot_spacing) * templates


def _to_rest_frame(flux, weight, wavelength, rv, star_wavelength=None):
    """A star's spectrum and weights moved to the rest frame (velocity ``rv`` removed) and
    onto the templates' pixels ``wavelength`` (from its own, ``star_wavelength``).

    Pixels fed by a masked or off-range pixel get zero weight; the weights follow the
    interpolation (squared kernel) so that noise stays correctly weighted to first order.
    """
    op = shift_operator(wavelength, _back_velocity(rv), star_wavelength)
    f, var, bad = _rest_inputs(flux, weight)
    return _rest_weighted(op.matrix @ f, op.squared @ var, op.absolute @ bad, op.empty,
                          op.margin)


def _back_velocity(rv):
    """The velocity that undoes ``rv`` (km/s)."""
    return SPEED_OF_LIGHT_KMS * (1.0 / (1.0 + rv / SPEED_OF_LIGHT_KMS) - 1.0)


def _rest_inputs(flux, weight):
    """What :func:`_to_rest_frame` shifts: the flux (masked pixels zeroed), the variances and
    the masked pixels (1.0)."""
    var = np.where(weight > 0, 1.0 / np.where(weight > 0, weight, 1.0), 0.0)
    return np.where(weight > 0, flux, 0.0), var, (weight <= 0).astype(float)


def _rest_weighted(f, v, touched, empty, margin):
    """:func:`_to_rest_frame`'s result from the shifted flux ``f``, variances ``v`` and masked
    pixels ``touched`` (P,), the pixels without a source (``empty``) and the ``margin``."""
    w = np.where((touched < 1e-3) & ~empty & (v > 0), 1.0 / np.where(v > 0, v, 1.0), 0.0)
    w[:margin] = 0
    w[-margin:] = 0
    return np.where(w > 0, f, 0.0), w


def sampled_rest_frames(obs, ivar, templates, rv, wavelength, knot_spacing, star_wavelength):
    """Each star (S, P) as :func:`rest_frame_star` gives it divided by the
    :func:`star_correction` of its template (S, P) at its velocity ``rv`` (S,), within
    rounding, the shifts sampled (:func:`~kspec_fluxcal.fit.shifts.sample_rows`,
    :func:`~kspec_fluxcal.fit.shifts.sample_moments`) instead of made into operators: for
    velocities used once (an operator and its derived weights took ~0.45 ms each way).
    Returns a list of ``(flux, weights)``, one per star."""
    star_wavelength = np.broadcast_to(star_wavelength, np.shape(obs))
    wave, star_wave = keyed_wavelengths(wavelength), keyed_wavelengths(star_wavelength)
    pos = rest_positions(star_wave, keyed_velocity(rv), wave)  # the templates at the stars
    shifted = sample_rows(nan_to_num(templates), pos)
    shifted[~np.isfinite(pos)] = np.nan
    w = np.where(np.isfinite(obs) & np.isfinite(shifted) & (ivar > 0), ivar, 0.0)
    flux, shifted = nan_to_num(obs), nan_to_num(shifted)
    corr = _grouped_corrections(flux, w, shifted, star_wavelength, np.ones(len(obs), int),
                                knot_spacing)
    inputs = [_rest_inputs(*_star_arrays(obs[s], ivar[s], np.where(c > 0, c, np.nan)))
              for s, c in enumerate(corr)]
    back = keyed_velocity(_back_velocity(np.asarray(rv, dtype=np.float64)))
    pos = np.stack([rest_positions(wave, b, row) for b, row in zip(back, star_wave, strict=True)])
    f, v, touched = sample_moments(*(np.stack(a) for a in zip(*inputs, strict=True)), pos)
    return [_rest_weighted(f[s], v[s], touched[s], ~np.isfinite(pos[s]),
                           position_margin(pos[s])) for s in range(len(obs))]


def star_correction(obs, ivar, template, rv, wavelength, knot_spacing, star_wavelength=None):
    """The smooth correction of one template (P,) at velocity ``rv`` fitted to a star (on its
    own pixels ``star_wavelength``, default ``wavelength``).

    Templates close to this one need nearly the same correction: dividing the star by it and
    scoring them with a single amplitude is much cheaper than a correction per template.
    """
    return star_corrections(obs, ivar, np.asarray(template)[None], rv, wavelength, knot_spacing,
                            star_wavelength)[0]


def star_corrections(obs, ivar, templates, rv, wavelength, knot_spacing, star_wavelength=None):
    """:func:`star_correction` of several templates (N, P) against one star: (N, P), each
    row as the template's own call gives it, to the last bit (the shift and the
    corrections' sparse products sum each template's terms in the same order; the normal
    equations are solved one by one)."""
    star_wave = wavelength if star_wavelength is None else star_wavelength
    return stars_corrections(np.asarray(obs)[None], np.asarray(ivar)[None],
                             [templates], np.atleast_1d(rv), wavelength, knot_spacing,
                             np.asarray(star_wave)[None])


def stars_corrections(obs, ivar, templates, rv, wavelength, knot_spacing, star_wavelength):
    """:func:`star_corrections` of several stars at once, each row as the star's own call
    gives it, to the last bit (the stars on one basis fitted in one call).

    Parameters
    ----------
    obs, ivar, star_wavelength : numpy.ndarray, shape (S, P)
        The stars, their inverse variances and their pixels' wavelengths.
    templates : sequence of S numpy.ndarray, shape (N_s, P)
        Each star's rest-frame templates on ``wavelength``.
    rv : numpy.ndarray, shape (S,)
        The stars' velocities, km/s.
    wavelength : numpy.ndarray, shape (P,)
        The templates' pixels.
    knot_spacing : float
        Knot spacing of the corrections' cubic B-spline (Angstrom).

    Returns
    -------
    numpy.ndarray, shape (sum N_s, P)
        The corrections, star after star; NaN where not positive.
    """
    shifted = [shift_spectra(nan_to_num(mine), star_wave, v, wavelength)
               for mine, v, star_wave in zip(templates, rv, star_wavelength, strict=True)]
    if not shifted:
        return np.empty((0, np.size(wavelength)))
    counts = [len(mine) for mine in shifted]
    shifted = np.concatenate(shifted)
    good = np.repeat(np.isfinite(obs) & (ivar > 0), counts, axis=0) & np.isfinite(shifted)
    w = np.where(good, np.repeat(ivar, counts, axis=0), 0.0)
    corr = _grouped_corrections(np.repeat(nan_to_num(obs), counts, axis=0), w,
                                nan_to_num(shifted), star_wavelength, counts, knot_spacing)
    return np.where(corr > 0, corr, np.nan)


def score_star(obs, ivar, templates, rv, wavelength, metric="chi2", delta=3.0, knot_spacing=None,
               correction=None, star_wavelength=None, alone=False):
    """Scores of many rest-frame templates (N, P) against one star (P,) at velocity ``rv``.

    Each template is fitted to the star times a smooth multiplicative correction (a cubic
    B-spline with knots every ``knot_spacing`` Angstrom; None: a single free amplitude). The
    correction absorbs what independent continuum normalisations of star and template leave
    (most at the ends of the spectrum and around strong blends) without touching line
    profiles. chi^2 is exact linear least squares for all templates at once; Huber uses
    iteratively reweighted least squares and is scaled to equal chi^2 for small residuals.
    With a fixed ``correction`` (P,) (see :func:`star_correction`), the star is divided by it
    and each template gets a single amplitude: the fast mode used to scan many templates.
    The templates are on ``wavelength``, the star on its own pixels ``star_wavelength``
    (default: the same). Rows of ``templates`` with a NaN score NaN. float64 throughout.
    With ``alone``, each template's chi^2 is the one it gets scored alone, to the last bit
    (one call for templates that are each judged on their own, e.g. one model at several
    line-spread widths: the star's shift and arrays prepared once).
    """
    if fast_mode(metric, knot_spacing, correction):
        rest = rest_frame_star(obs, ivar, rv, wavelength, correction, star_wavelength)
        if alone:  # BLAS sums one template's products as a dot, several's as a matrix's
            return np.concatenate([score_rest_frame(rest, row[None])
                                   for row in np.asarray(templates)])
        return score_rest_frame(rest, templates)
    tmpl, missing = _clean_templates(templates)
    f, w = _star_arrays(obs, ivar, correction)
    if correction is not None:
        knot_spacing = None
    star_wave = wavelength if star_wavelength is None else star_wavelength
    op = shift_operator(star_wave, rv, wavelength)
    shifted = (op.matrix @ tmpl.T).T  # (N, P)
    margin = op.margin
    w[:margin] = 0
    w[-margin:] = 0
    usable = (shifted**2) @ w > 0
    model = fit_corrected(f, w, shifted, star_wave, knot_spacing)
    if metric == "chi2":
        terms = w * (f - model) ** 2  # (N, P), laid out by columns as the model is
        # numpy sums a lone row (or rows laid out as rows) pairwise, but these terms pixel by
        # pixel down the columns: ``alone`` lays them out as rows first
        score = np.sum(np.ascontiguousarray(terms) if alone else terms, axis=1)
    else:
        sw = np.sqrt(w)
        for _ in range(3):  # iteratively reweighted least squares
            r = (f - model) * sw
            hw = w * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-12))
            model = fit_corrected(f, hw, shifted, star_wave, knot_spacing)
        r = np.abs((f - model) * sw)
        score = 2.0 * np.sum(np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)), axis=1)
    return np.where(missing | ~usable, np.nan, score)


def fast_mode(metric, knot_spacing, correction):
    """Whether :func:`score_star` scores in its fast mode (chi^2 with a single amplitude
    against the star in its rest frame: :func:`rest_frame_star`, :func:`score_rest_frame`)."""
    return metric == "chi2" and (correction is not None or knot_spacing is None)


def rest_frame_star(obs, ivar, rv, wavelength, correction=None, star_wavelength=None):
    """A star (P,) as :func:`score_star`'s fast mode compares templates with it: divided by
    its fixed ``correction`` (None: none), moved to the rest frame (velocity ``rv``) and onto
    the templates' pixels ``wavelength`` from its own, ``star_wavelength``.

    Returns ``(flux, weights)``, each (P,): computed once, it serves every set of templates
    scored against the same star, velocity and correction (:func:`score_rest_frame`).
    """
    f, w = _star_arrays(obs, ivar, correction)
    return _to_rest_frame(f, w, wavelength, rv, star_wavelength)


def rest_frame_stars(obs, ivar, rv, wavelength, correction=None, star_wavelength=None):
    """:func:`rest_frame_star` of each star (S, P) (``rv`` (S,), ``correction`` and
    ``star_wavelength`` (S, P) or None): a list of :class:`RestFrame`, each star's to the
    last bit.

    The pixel by pixel steps are taken for all stars at once and a star at the velocity and
    on the pixels of the one before it (a star's refinement starts, each with its own
    correction) reuses its shift operator (~25 numpy calls and a cache key of 2 x 32 kB
    fewer a star: ~6 % of star_rest_frames' time on 15 captured calls).
    """
    f, var, bad = _rest_inputs(*_star_arrays(obs, ivar, correction))
    star_wave = [None] * len(obs) if star_wavelength is None else star_wavelength
    rests, op = [], None
    for s in range(len(obs)):
        if not (s and rv[s] == rv[s - 1] and (star_wavelength is None or np.array_equal(
                star_wave[s], star_wave[s - 1]))):
            op = shift_operator(wavelength, _back_velocity(rv[s]), star_wave[s])
        rests.append(RestFrame(_rest_weighted(op.matrix @ f[s], op.squared @ var[s],
                                              op.absolute @ bad[s], op.empty, op.margin)))
    return rests


def score_rest_frame(rest, templates, wanted=None):
    """:func:`score_star`'s fast-mode scores of rest-frame ``templates`` against stars in
    their rest frames.

    Parameters
    ----------
    rest : (numpy.ndarray, numpy.ndarray)
        A star's ``(flux, weights)`` (P,) from :func:`rest_frame_star`, or several stars'
        stacked (S, P).
    templates : numpy.ndarray (N, P) or ScoringTemplates
        The templates; prepared once when scored against several sets of stars.
    wanted : numpy.ndarray of bool, shape (N,) or (S, N), optional
        The scores needed (default: all); others may be NaN (blocks of templates with none
        wanted are not scored).

    Returns
    -------
    numpy.ndarray, shape (N,) or (S, N)
    """
    prepared = templates if isinstance(templates, ScoringTemplates) else ScoringTemplates(
        templates)
    return _fast_chi2(*rest, prepared.tmpl, prepared.missing, wanted)


def score_rest_frames(rests, templates, wanted=None):
    """:func:`score_rest_frame` of several stars' ``rests`` (a list of
    :func:`rest_frame_star`) at once: scores (S, N)."""
    return score_rest_frame((np.stack([f for f, _ in rests]), np.stack([w for _, w in rests])),
                            templates, wanted)


def score_own_templates(rests, templates):
    """:func:`score_rest_frame` of each star against its own templates: ``rests`` (a list
    of S :func:`rest_frame_star`) and ``templates`` (S, K, P) give scores (S, K), each row
    the star's own call gives, to the last bit (the same blocks of :data:`_SCORE_BLOCK`
    templates, converted to float64 and scored by the same matrix-vector products).

    The lattices' models of all stars at once: their missing (NaN) rows found by their
    sums and their blocks converted into one buffer (with a fresh float64 copy of each
    star's models, ~0.9 MB, and a NaN test star by star, the lattices' scores took ~3.0,
    then ~2.3 ms an exposure).
    """
    nstar, k, npix = templates.shape
    sft, stt = np.zeros((nstar, k)), np.zeros((nstar, k))
    buffer = np.empty((min(k, _SCORE_BLOCK), npix))
    rests = [rest if isinstance(rest, RestFrame) else RestFrame(rest) for rest in rests]
    with np.errstate(invalid="ignore"):  # a missing model's sums (inf - inf, 0 * inf)
        for s, rest in enumerate(rests):
            weighted, weight = rest.weighted, rest[1]
            for start in range(0, k, _SCORE_BLOCK):
                block = slice(start, start + _SCORE_BLOCK)
                rows = buffer[:min(k - start, _SCORE_BLOCK)]
                np.copyto(rows, templates[s, block])
                sft[s, block] = weighted @ rows.T
                rows *= rows
                stt[s, block] = weight @ rows.T
    # A model with a NaN or an infinity has a NaN or infinite sum of squares (the weights are
    # finite and >= 0; a finite model's squares, float32 in float64, cannot overflow): found
    # by its sums, not by a pass over every model (~0.15 ms for 2 stars' 125), and given the
    # sums of _clean_templates' zeroed row. Each sum is its row's own dot product.
    missing = ~np.isfinite(stt)
    sft[missing] = stt[missing] = 0.0
    ff = np.array([rest.flux_norm for rest in rests])
    return _chi2_of_sums(ff, sft, stt, missing)


class RestFrame(tuple):
    """A star's ``(flux, weights)`` in its rest frame (:func:`rest_frame_star`) with what
    :func:`score_own_templates` takes of them computed once, however many lattices are
    scored against it (three products and a sum a star and lattice)."""

    @functools.cached_property
    def weighted(self):
        """weights * flux (P,)."""
        return self[1] * self[0]

    @functools.cached_property
    def flux_norm(self):
        """The sum of weights * flux^2."""
        return np.sum(self[1] * self[0] ** 2)


class ScoringTemplates:
    """Templates (N, P) as the fast mode scores them (NaN rows zeroed: ``tmpl``,
    ``missing``), prepared once for any number of scorings (the scan scores its candidates
    twice). They keep their dtype (float32 rows of the exposure's templates are not copied to
    float64): :func:`_fast_chi2` converts them a block at a time."""

    def __init__(self, templates):
        self.tmpl, self.missing = _clean_templates(templates, keep_float=True)


def _clean_templates(templates, keep_float=False):
    """Templates as float64 (N, P) (or their own floating dtype with ``keep_float``), NaN rows
    zeroed, and which rows were NaN."""
    tmpl = np.asarray(templates)
    if not (keep_float and tmpl.dtype.kind == "f"):
        tmpl = tmpl.astype(np.float64, copy=False)
    tmpl = tmpl.reshape(-1, tmpl.shape[-1])
    if tmpl.itemsize < 8:
        # A row of float32 values has a finite float64 sum unless one is not finite: the
        # rows the sum finds, by a test 3-4x faster than the sum with its conversion.
        missing = ~np.isfinite(tmpl).all(axis=1)
    else:  # one pass; a NaN anywhere (or an overflow) makes the sum NaN
        missing = ~np.isfinite(tmpl.sum(axis=1, dtype=np.float64))
    if missing.any():
        tmpl = np.where(missing[:, None], 0.0, tmpl)
    return tmpl, missing


def _star_arrays(obs, ivar, correction=None):
    """A star's flux and weights with masked pixels zeroed, divided by a fixed correction."""
    w = np.where(np.isfinite(obs) & (ivar > 0), ivar, 0.0)
    f = nan_to_num(obs)
    if correction is not None:
        ok = np.isfinite(correction)
        f = np.where(ok, f / np.where(ok, correction, 1.0), 0.0)
        w = np.where(ok, w * np.where(ok, correction, 0.0) ** 2, 0.0)
    return f, w


#: Templates converted to float64 at a time by :func:`_fast_chi2` (~1 MB at 4096 pixels:
#: the block, its squares and the products stay in the cache).
_SCORE_BLOCK = 32


def _fast_chi2(flux, weight, tmpl, missing, wanted=None):
    """chi^2 with a free amplitude of every template against rest-frame stars, in two
    matrix-vector products per star: flux, weight (..., P) and tmpl (N, P) give (..., N).
    With ``wanted`` (..., N), a star's blocks of templates with no score wanted are not
    scored (NaN); the others' scores are those it gets without ``wanted``.

    The stars go to the rest frame once (one spectrum shifted each instead of N templates);
    their pixels' noise correlation, the same for every template, does not change the ranking.
    The sums are float64 whatever the templates' dtype: chi^2 is the difference of two sums
    ~(S/N)^2 P times larger, and float32 sums moved it by up to 44 and picked another best
    template for 3-4 % of stars (benchmarks/HISTORY.md). float32 templates are converted
    (exactly) a block at a time into one buffer, not copied whole.
    """
    weighted = weight * flux
    stt = np.zeros(weight.shape[:-1] + tmpl.shape[:1])  # zero: not scored, not usable
    sft = np.zeros_like(stt)
    # Star by star (a few): OpenBLAS packs a block for a matrix product of 2-3 stars in
    # about the time a matrix-vector product per star takes to read it (the stars' scores
    # took 1.5-2x as long); each star's scores are then the ones it gets alone.
    stars = list(np.ndindex(weight.shape[:-1]))
    # The blocks converted into one buffer (a new 1 MB array per block cost its allocation)
    # and multiplied as rows @ star (as star @ rows.T: the same sums, ~20 % more time):
    # ~2.0 -> ~1.1 ms a scan's scoring of 2 stars, 153-225 templates, alone (fit: -10 %).
    buffer = np.empty((min(tmpl.shape[0], _SCORE_BLOCK), tmpl.shape[-1]))
    for start in range(0, tmpl.shape[0], _SCORE_BLOCK):
        block = slice(start, start + _SCORE_BLOCK)
        # A star's Teff window holds 55-100 % of an exposure's candidates (the scan's
        # windows, 73 % of its scores on 10 lake exposures): blocks outside it are skipped.
        mine = stars if wanted is None else [star for star in stars
                                             if wanted[star + (block,)].any()]
        if not mine:
            continue
        rows = buffer[:min(tmpl.shape[0] - start, _SCORE_BLOCK)]
        np.copyto(rows, tmpl[block])
        for star in mine:
            sft[star + (block,)] = rows @ weighted[star]
        rows *= rows
        for star in mine:
            stt[star + (block,)] = rows @ weight[star]
    return _chi2_of_sums(np.sum(weight * flux**2, axis=-1), sft, stt, missing)


def _chi2_of_sums(ff, sft, stt, missing):
    """chi^2 with a free amplitude (..., N) from the sums of w f^2 (...), w f t and w t^2
    (..., N); NaN for ``missing`` templates and those the star's weights do not see."""
    usable = stt > 0
    score = ff[..., None] - sft**2 / np.where(usable, stt, np.inf)
    return np.where(missing | ~usable, np.nan, score)


def _score_block(obs, ivar, templates, rv, star_wave, *correction, wavelength, metric, delta,
                 knot_spacing):
    """Scores of every (star, template): obs, ivar, star_wave (S,1,P), templates ([1,]N,P),
    rv (S,1), optional correction (S,1,P)."""
    obs, ivar, rv, star_wave = obs[:, 0, :], ivar[:, 0, :], rv[:, 0], star_wave[:, 0, :]
    corr = correction[0][:, 0, :] if correction else [None] * obs.shape[0]
    if correction and metric == "chi2":
        # Fast mode: every star in its rest frame, then all stars x all templates at once.
        return score_rest_frames(
            [rest_frame_star(obs[s], ivar[s], rv[s], wavelength, corr[s], star_wave[s])
             for s in range(obs.shape[0])], templates)  # one spectrum per star
    tmpl = np.asarray(templates, dtype=np.float64).reshape(-1, templates.shape[-1])
    # Stars with their own fitted corrections: each star's velocity shifts the templates.
    return np.stack([score_star(obs[s], ivar[s], tmpl, rv[s], wavelength, metric, delta,
                                knot_spacing, corr[s], star_wave[s])
                     for s in range(obs.shape[0])]).reshape(obs.shape[0], tmpl.shape[0])


def score_templates(obs_norm, obs_ivar, templates_norm, rv, *, metric="chi2", huber_delta=3.0,
                    knot_spacing=None, correction=None, star_wavelength=None, dim="wavelength",
                    template_dim="template"):
    """Score every template against every star in one vectorised pass (lazy with Dask).

    Parameters
    ----------
    obs_norm, obs_ivar : xarray.DataArray
        Normalised observed spectra (``star``, ``dim``) and inverse variances (0 = masked).
    templates_norm : xarray.DataArray
        Normalised rest-frame templates (``template_dim``, ``dim``), NaN for missing grid
        points; may be Dask-chunked along ``template_dim`` (``dim`` in one chunk).
    rv : xarray.DataArray
        Radial velocity of each star, km/s.
    metric : {'chi2', 'huber'}
        chi^2 with a free amplitude, or the Huber loss (threshold ``huber_delta`` sigma;
        robust to sky-subtraction residual spikes), scaled to equal chi^2 for small residuals.
    knot_spacing : float, optional
        Knot spacing (Angstrom) of the smooth multiplicative correction fitted with each
        template (see :func:`score_star`); None for a single amplitude.
    correction : xarray.DataArray, optional
        Fixed smooth corrections (``star``, ``dim``): the fast mode of :func:`score_star`.
    star_wavelength : xarray.DataArray, optional
        Each star's own pixel wavelengths (``star``, ``dim``); default: the ``dim``
        coordinate, on which the templates are.

    Returns
    -------
    xarray.DataArray
        Scores (``star``, ``template_dim``), float64; NaN for missing templates.
    """
    if metric not in ("chi2", "huber"):
        raise ValueError(f"metric must be 'chi2' or 'huber', not {metric!r}")
    wave = obs_norm[dim].values
    # What xr.align(join="exact") checks, without building two pandas indexes per call.
    if dim in templates_norm.coords and not np.array_equal(wave, templates_norm[dim].values):
        raise ValueError(f"the templates' {dim!r} coordinate differs from the stars'")
    if star_wavelength is None:
        star_wavelength = obs_norm[dim].broadcast_like(obs_norm).drop_vars(dim)
    args = [obs_norm, obs_ivar, templates_norm, rv, star_wavelength]
    if correction is not None:
        args.append(correction)
    out = xr.apply_ufunc(
        _score_block, *args,
        kwargs={"wavelength": wave, "metric": metric, "delta": huber_delta,
                "knot_spacing": knot_spacing},
        input_core_dims=[[dim], [dim], [dim], [], [dim]] + [[dim]] * (correction is not None),
        dask="parallelized", output_dtypes=[np.float64],
    )
    out.attrs = {"metric": metric, "description": f"{metric} of the normalised spectra"}
    return out.transpose("star", ...)
