"""A template library pre-blurred for the line spreads it serves: its spectra convolved once to
a rung of a short ladder of widths and sampled more coarsely, so that an exposure's operator
only convolves with what is left of its line spread (issue 14).

Method
------
The library's range is cut into segments of :data:`SEGMENT` Angstrom. Segment k gets a rung,
a Gaussian width in ln(lambda) sigma_k = sigma_R * RUNG**n_k (sigma_R: the library's own
resolution, FWHM = lambda / R), the widest of the ladder not above :data:`MARGIN` times the
narrowest line spread served in the segment. Its spectra are the library's convolved with
sqrt(sigma_k^2 - sigma_R^2) and sampled uniformly in ln(lambda), :data:`SAMPLES_PER_FWHM`
per FWHM of sigma_k, over the segment and beyond it the 5-sigma wings of the widest ask
served (the library range's allowance, ``LIBRARY_MAX_LSF_SCALE`` times the narrowest line
spread), so that a pixel of the segment finds its whole kernel among them. An exposure's
operator convolves a pixel of segment k with sqrt(sigma^2 - sigma_k^2) on these samples:
Gaussians compose, so the total width is the unblurred operator's; only the sampling
differs (templates within 4e-5 of the unblurred library's at 0.9 x the line spread served,
3e-6 at 1.0-1.25 x; the tests allow 1e-4).

A library is pre-blurred only where that pays: every segment's pre-blur must be a Gaussian
on the library's samples (wider than their step) and the samples at most half the
library's. On the IsoPlane-320 setup (line spread ~10 A, ~6 x the demo grid's lambda / R)
they are a fifth; at 4096 pixels (line spread 1.7 x the demo grid's at the red end) or with
the CK04 grid (sampled every 20 A) nothing is gained and the library stays as it is. An ask
wider than a rung by less than 1 / :data:`NARROWEST` somewhere (a width fitted below 0.9 x
the narrowest line spread served), or whose wings leave a segment's samples, is served by
the unblurred library, exactly as without pre-blur (:func:`blurred_entries`).
"""

from __future__ import annotations

import types

import numpy as np
import scipy.sparse

from ._recent import Recent, per_library, read_only
from .constants import FWHM_PER_SIGMA
from .convolution import NSIGMA, gaussian_rows, log_sampling

__all__ = ["blur_plan", "with_blurred", "blurred_entries", "RUNG", "SEGMENT", "MARGIN"]

#: Ratio of consecutive rungs of the ladder (widths sigma_R * RUNG**n).
RUNG = 2.0**0.25
#: Width of the segments, Angstrom (each has its own rung; edges at its multiples).
SEGMENT = 500.0
#: The narrowest width the standards' fit asks of the line spread served: its width fit's
#: narrowest trial (``kspec_fluxcal.fit.line_spread._LSF_TRIALS``).
SERVED_SCALE = 0.9
#: An ask is served by the pre-blurred samples where the rung is at most this times its
#: width (the residual kernel at least 0.75 of the rung, 1.3 of the samples' step): below,
#: the samples misplace the narrow residual's centre by up to 2e-2 of the templates.
NARROWEST = 0.8
#: Rungs are at most this times the narrowest line spread served (its narrowest trial, with
#: :data:`NARROWEST`'s margin).
MARGIN = NARROWEST * SERVED_SCALE
#: Samples per FWHM of a segment's rung (band-limited sampling, with margin).
SAMPLES_PER_FWHM = 2.5
#: Pre-blurred only when the samples are at most this fraction of the library's.
MAX_FRACTION = 0.5
#: Templates pre-blurred at once (bounds the temporary float64 copies).
_BLOCK = 64


def blur_plan(library, line_spreads, max_scale):
    """How ``library`` is pre-blurred for ``line_spreads``, or None when that does not pay.

    Parameters
    ----------
    library : xarray.Dataset
        From :func:`kspec_fluxcal.templates.prepare_library`, unblurred.
    line_spreads : list of LineSpread
        The line spreads the library will serve (an exposure's, or every exposure's of a
        configuration): the rungs are chosen from the narrowest.
    max_scale : float
        The widest ask served, relative to the narrowest line spread served (a segment's
        samples reach 5 sigma of it beyond the segment).

    Returns
    -------
    types.SimpleNamespace or None
        ``edges`` of the segments (Angstrom), ``rungs`` (n_k, tuple of int), ``sigma_r``
        (the library's resolution, ln(lambda)), ``widest`` (asks served, in units of a
        rung) and ``key``: the library's ``library_key`` followed by the rungs.
    """
    wave = library["wavelength"].values
    sigma_r = 1.0 / (float(library.attrs["resolving_power"]) * FWHM_PER_SIGMA)
    edges, coarsest = per_library(_SEGMENTS, _segments, library)
    x = np.linspace(edges[:-1], edges[1:], 50, axis=1)  # (segment, point)
    narrowest = np.min([np.min(lsf.fwhm(x) / x, axis=1) for lsf in line_spreads],
                       axis=0) / FWHM_PER_SIGMA
    with np.errstate(divide="ignore", invalid="ignore"):
        rungs = np.floor(np.log(MARGIN * narrowest / sigma_r) / np.log(RUNG))
    if not np.all(rungs >= 1):
        return None
    rungs = tuple(int(n) for n in rungs)
    sigma = sigma_r * RUNG ** np.array(rungs)
    if np.any(np.sqrt(sigma**2 - sigma_r**2) < coarsest):
        return None  # a pre-blur narrower than the library's step is not a Gaussian on it
    plan = types.SimpleNamespace(
        edges=edges, rungs=rungs, sigma_r=sigma_r, widest=max_scale / MARGIN,
        key=f"{library.attrs['library_key']}-blur{'.'.join(str(n) for n in rungs)}")
    if sum(_samples(wave, plan, k).size for k in range(len(rungs))) > MAX_FRACTION * wave.size:
        return None
    return plan


#: The libraries' segment edges and largest ln(lambda) step in each segment (_segments).
_SEGMENTS = Recent(3)


def _segments(library):
    """The segments' edges (the library's ends and the multiples of SEGMENT between them)
    and the library's largest ln(lambda) step in each (looked up once per library: an
    exposure's plan, ~13 segments, takes ~0.2 ms)."""
    wave = library["wavelength"].values
    inner = np.arange((np.floor(wave[0] / SEGMENT) + 1) * SEGMENT, wave[-1], SEGMENT)
    edges = np.concatenate([[wave[0]], inner, [wave[-1]]])
    coarsest = np.zeros(edges.size - 1)
    np.maximum.at(coarsest, np.searchsorted(inner, wave, side="right"),
                  np.gradient(np.log(wave)))
    return read_only(edges), read_only(coarsest)


def _samples(wave, plan, k):
    """ln(lambda) of the pre-blurred samples of segment ``k``: uniform, over the segment and
    its wings, each sample's pre-blur kernel (5 sigma) inside the library."""
    sigma = plan.sigma_r * RUNG ** plan.rungs[k]
    pre = np.sqrt(sigma**2 - plan.sigma_r**2)
    wing = NSIGMA * plan.widest * sigma
    start = max(np.log(plan.edges[k]) - wing, np.log(wave[0]) + NSIGMA * pre)
    stop = min(np.log(plan.edges[k + 1]) + wing, np.log(wave[-1]) - NSIGMA * pre)
    return np.arange(start, stop, sigma * FWHM_PER_SIGMA / SAMPLES_PER_FWHM)


def with_blurred(library, plan):
    """The library (its arrays shared) plus its spectra pre-blurred as ``plan``
    (:func:`blur_plan`) says, in one sparse product: ``blurred_flux`` and ``blurred_norm``
    (``template``, ``blurred_wavelength``), ``blurred_segment`` (each sample's segment) and
    attrs ``blur_edges``, ``blur_rungs``, ``library_key`` the plan's."""
    wave = library["wavelength"].values
    log_in = log_sampling(wave)
    parts, samples, segment = [], [], []
    for k, n in enumerate(plan.rungs):
        ln_out = _samples(wave, plan, k)
        excess = np.full(ln_out.size, (plan.sigma_r * RUNG**n) ** 2 - plan.sigma_r**2)
        vals, cols, indptr, _ = gaussian_rows(log_in, ln_out, excess)
        parts.append(scipy.sparse.csr_matrix((vals, cols, indptr),
                                             shape=(ln_out.size, wave.size)))
        samples.append(ln_out)
        segment.append(np.full(ln_out.size, k))
    matrix = scipy.sparse.vstack(parts, format="csr")
    out = {}
    for kind in ("flux", "norm"):
        data = library[kind].values
        blurred = np.empty((data.shape[0], matrix.shape[0]), dtype=data.dtype)
        for start in range(0, data.shape[0], _BLOCK):
            block = data[start:start + _BLOCK].astype(np.float64)
            blurred[start:start + _BLOCK] = (matrix @ block.T).T
        out[f"blurred_{kind}"] = (("template", "blurred_wavelength"), blurred,
                                  {**library[kind].attrs, "blurred": "to its segment's rung "
                                   "(blur_rungs), see kspec_fluxcal.preblur"})
    return library.assign(out).assign_coords(
        blurred_wavelength=("blurred_wavelength", np.exp(np.concatenate(samples)),
                            {"units": "Angstrom", "medium": "air"}),
        blurred_segment=("blurred_wavelength", np.concatenate(segment))).assign_attrs(
        library_key=plan.key, blur_edges=[float(e) for e in plan.edges],
        blur_rungs=list(plan.rungs))


#: The pre-blurred libraries' samplings for operators (_sampling), a few KB each.
_SAMPLINGS = Recent(3)


def _sampling(library):
    """The pre-blurred samples as one increasing coordinate, each segment's ln(lambda)
    shifted past the one before (one search finds a pixel's samples in its own segment), with
    the samples' ln steps, the segments' rungs, shifts and coordinate ranges."""
    sigma_r = 1.0 / (float(library.attrs["resolving_power"]) * FWHM_PER_SIGMA)
    edges = np.asarray(library.attrs["blur_edges"], dtype=np.float64)
    rungs = np.asarray(library.attrs["blur_rungs"])
    segment = library["blurred_segment"].values
    ln = np.log(library["blurred_wavelength"].values)
    shift = (np.log(edges[-1]) - np.log(edges[0]) + 1.0) * np.arange(rungs.size)
    coord = ln + shift[segment]
    step = np.empty_like(ln)
    first, last = np.empty(rungs.size), np.empty(rungs.size)
    for k in range(rungs.size):
        inside = np.flatnonzero(segment == k)
        step[inside] = np.gradient(ln[inside])
        first[k], last[k] = coord[inside[0]], coord[inside[-1]]
    return types.SimpleNamespace(
        log_in=(read_only(coord), read_only(step)), inner_edges=read_only(edges[1:-1]),
        sigma=read_only(sigma_r * RUNG**rungs), shift=read_only(shift), first=read_only(first),
        last=read_only(last))


def blurred_entries(library, wave_out, lsf):
    """The CSR arrays of the operator from the library's pre-blurred samples to pixels
    ``wave_out`` at line spread ``lsf`` (as ``templates.convolution_entries``), or None
    when the library has none, or they cannot serve this ask: it is narrower than a rung
    allows (1 / NARROWEST of it) or its wings leave a segment's samples somewhere."""
    if "blurred_norm" not in library:
        return None
    s = per_library(_SAMPLINGS, _sampling, library)
    segment = np.searchsorted(s.inner_edges, wave_out, side="right")
    sigma = lsf.fwhm(wave_out) / wave_out / FWHM_PER_SIGMA
    rung = s.sigma[segment]
    if not np.all(rung <= NARROWEST * sigma):
        return None
    excess = sigma**2 - rung**2
    centre = np.log(wave_out) + s.shift[segment]
    reach = NSIGMA * np.sqrt(excess)
    if np.any(centre - reach < s.first[segment]) or np.any(centre + reach > s.last[segment]):
        return None
    return gaussian_rows(s.log_in, centre, excess)
