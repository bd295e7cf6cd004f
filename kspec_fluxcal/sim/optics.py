"""The light's path to the pixels: each fiber's wavelengths and true line-spread function.

The header's FWHMPCk is the nominal LSF (Gaussian). The light meets a true one that can
differ, as the fitter must cope with: FWHM x ``lsf_scale`` (per exposure, unknown to the
pipeline), x each fiber's own scale (``fiber_lsf_scatter``), of another profile than a
Gaussian (``lsf_shape``: 'fiber', the round fiber's image blurred by the optics, with the
same FWHM), and optionally integrated over the pixel (``pixel_integration``: a one-pixel box
on top). A source's native spectra are convolved to it with the source's own resolution
removed in quadrature from each Gaussian (where the source is the broader, they are only
sampled).

Wavelength solutions: each fiber's pixels are where its light falls (``rows``); what is
written (``written``) is the same, unless ``arc_error`` gives every fiber an error of its own
(a shift and a tilt across the detector, as an arc solution's is), which the pipeline cannot
know.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.sparse

from ..constants import FWHM_PER_SIGMA
from ..errors import FluxCalWarning, GridError
from ..lsf import LineSpread
from ..second_order import second_order_problem, second_order_ratio
from ..templates import convolution_matrix
from .setups import Setup

#: Sub-pixel shifts of per-fiber wavelength solutions (2-D WAVELA), pixels.
_FIBER_SHIFT_PIXELS = 0.35
#: Sub-pixel samples of the box integral over a pixel (``pixel_integration``): the midpoint
#: rule on a box convolved with a Gaussian of FWHM >= 2 pixels is exact to 2e-3 of an
#: unresolved line's peak (1.2e-3 at 2.7 pixels); the box's variance comes out 0.96 of
#: pixel^2 / 12 (an unresolved line 0.1-0.15 % narrower in sigma).
_PIXEL_SUBSAMPLES = 5
#: Bounds of a fiber's FWHM scale (``fiber_lsf_scatter``): a few % scatter, never a fiber twice
#: as sharp or blurred.
_FIBER_LSF_CLIP = (0.8, 1.25)
#: ``lsf_shape='fiber'``: the diameter of the fiber's image on the detector over the line
#: spread's FWHM. The image of a uniformly lit round fiber face, projected on the dispersion
#: axis, is the semicircle sqrt(1 - (2x / D)^2); the camera blurs it with its own point
#: spread (a Gaussian here), as instrument models of fiber spectrographs build their line
#: spread (e.g. MOONS': the optics' PSF convolved with the fiber core's image; Li Causi et
#: al. 2016, Proc. SPIE 9908). At 1.1 the image dominates (the semicircle alone has a FWHM of
#: 0.95 of the profile's; the camera's Gaussian 0.67): a flat-topped profile with an rms
#: width 0.93 of the Gaussian's of the same FWHM (second moment 0.87) and 2.5 % more peak.
_FIBER_IMAGE_DIAMETER = 1.1
#: Nodes of the semicircle's quadrature (Gauss-Chebyshev of the second kind): with the
#: camera's Gaussian on top, 8 reproduce the profile to 1e-6 of its peak.
_FIBER_NODES = 8
#: Shapes of the true line spread (``lsf_shape``).
LSF_SHAPES = ("gaussian", "fiber")


class _Pixels(NamedTuple):
    setup: Setup
    base: np.ndarray  # the common grid (npix,), air
    rows: np.ndarray  # every fiber's true air wavelengths (nfib, npix): where its light falls
    per_fiber: bool  # rows differ from base (2-D WAVELA, or arc errors)
    written: np.ndarray  # the solutions written (nfib, npix), air: ``rows`` without arc errors
    written_2d: bool  # written per fiber (2-D WAVELA)


def _pixels(rng, setup, wavelength_format, arc_error=0.0, aux=None):
    """Every fiber's air wavelengths, true and written; the median of the written ones is the
    common grid. ``arc_error`` > 0: each fiber's true wavelengths differ from its written
    ones by a shift and a tilt of their own (:func:`_arc_errors`, drawn from a child of
    ``aux``)."""
    base = setup.wavelength
    shifts = np.zeros(setup.fibers)
    if wavelength_format == "wavela2d":
        shifts = rng.uniform(-_FIBER_SHIFT_PIXELS, _FIBER_SHIFT_PIXELS, setup.fibers)
        shifts -= np.median(shifts)
    written = base[None, :] + shifts[:, None] * setup.dispersion
    two_d = wavelength_format == "wavela2d"
    if not arc_error > 0:
        if arc_error != 0:
            raise ValueError(f"arc_error={arc_error!r}: need an rms >= 0 (pixels)")
        return _Pixels(setup, base, written, two_d, written, two_d)
    # A stream of the auxiliary one's own: every other draw stays as without arc errors.
    error = _arc_errors(aux.spawn(1)[0], setup, arc_error)
    return _Pixels(setup, base, written - error * setup.dispersion, True, written, two_d)


def _arc_errors(rng, setup, rms):
    """Per fiber and pixel, written minus true wavelength in pixels: a shift and a tilt
    across the detector (x from -1 to 1), each with half the variance of ``rms`` over the
    detector (shift sigma rms / sqrt 2, centre-to-edge tilt sigma rms sqrt(3 / 2))."""
    x = np.linspace(-1.0, 1.0, setup.pixels)
    shift = rng.normal(0.0, rms / np.sqrt(2.0), setup.fibers)
    tilt = rng.normal(0.0, rms * np.sqrt(1.5), setup.fibers)
    return shift[:, None] + tilt[:, None] * x[None, :]


@functools.cache
def _fiber_profile(diameter=_FIBER_IMAGE_DIAMETER, nodes=_FIBER_NODES):
    """The 'fiber' line spread as Gaussians: ((offset, width, weight), ...) in units of the
    profile's FWHM. The semicircle of ``diameter`` by Gauss-Chebyshev quadrature (second
    kind: weights sin^2), each node a Gaussian of the camera's width, solved so that the
    sum's FWHM is 1."""
    # The semicircle's own FWHM is sqrt(3) / 2 of its diameter; beyond 1.12 the camera's
    # Gaussian would be narrower than the nodes' spacing.
    if not 0 < diameter <= 1.12:
        raise ValueError(f"fiber image diameter {diameter!r}: need 0-1.12 of the FWHM")
    t = np.arange(1, nodes + 1) * np.pi / (nodes + 1)
    offsets, weights = 0.5 * diameter * np.cos(t), np.sin(t) ** 2 / np.sum(np.sin(t) ** 2)
    x = np.linspace(0.0, 1.0, 20001)  # the profile is symmetric and peaks at 0

    def half_width(width):
        s = width / FWHM_PER_SIGMA
        p = weights @ np.exp(-0.5 * ((x[None, :] - offsets[:, None]) / s) ** 2)
        return x[np.argmax(p < 0.5 * p[0])] - 0.5

    width = scipy.optimize.brentq(half_width, 0.2, 1.0, xtol=1e-7)
    return tuple((float(o), float(width), float(w)) for o, w in zip(offsets, weights,
                                                                     strict=True))


class _TrueLSF(NamedTuple):
    """The line-spread function the light meets: a Gaussian ``core`` (the header's, scaled)
    or, with a ``profile``, a sum of Gaussians ((offset, width, weight), ...; offset and width in
    units of the core's FWHM, offsets of the light to the red) of that FWHM; and, when
    ``pixel`` > 0, a box of that width (Angstrom) for the integration over a pixel."""

    core: LineSpread
    pixel: float = 0.0
    profile: tuple | None = None

    def sigma(self, wavelength):
        """Gaussian-equivalent (rms) sigma, Angstrom (the reach of the wings)."""
        core = self.core.sigma(wavelength)
        if self.profile is not None:
            core = core * np.sqrt(sum(w * (width**2 + (FWHM_PER_SIGMA * o) ** 2)
                                      for o, width, w in self.profile))
        return np.sqrt(core**2 + self.pixel**2 / 12.0) if self.pixel else core

    def parts(self, wavelength):
        """[(weight, offset, sigma)]: the profile at ``wavelength`` as Gaussians (Angstrom;
        the pixel box in quadrature), for unresolved sky and telluric lines."""
        if self.profile is None:
            return [(1.0, 0.0, self.sigma(wavelength))]
        fwhm = self.core.fwhm(wavelength)
        return [(w, o * fwhm, np.sqrt((width * fwhm / FWHM_PER_SIGMA) ** 2
                                      + self.pixel**2 / 12.0)) for o, width, w in self.profile]

    def gaussians(self):
        """[(weight, offset in units of the FWHM, LineSpread)] of the profile."""
        if self.profile is None:
            return [(1.0, 0.0, self.core)]
        return [(w, o, LineSpread(tuple(c * width for c in self.core.coeffs), "true"))
                for o, width, w in self.profile]


class _Optics(NamedTuple):
    scale: float  # exposure's true FWHM / header FWHM
    fiber_scale: np.ndarray  # per fiber FWHM / header FWHM (FIBRES LSF_SCALE)
    exposure: _TrueLSF  # the exposure's true LSF (every fiber's, without per-fiber scatter)
    fibers: list | None  # per-fiber true LSFs, or None when they all equal ``exposure``

    def all(self):
        return [self.exposure] if self.fibers is None else [self.exposure, *self.fibers]

    def fiber(self, f):
        return self.exposure if self.fibers is None else self.fibers[f]


def _true_lsfs(aux, setup, lsf_scale, pixel_integration, fiber_lsf_scatter,
               lsf_shape="gaussian"):
    """The true line-spread functions of an exposure (its own and per fiber)."""
    if lsf_shape not in LSF_SHAPES:
        raise ValueError(f"lsf_shape={lsf_shape!r}: use one of {', '.join(LSF_SHAPES)}")
    profile = _fiber_profile() if lsf_shape == "fiber" else None
    if np.ndim(lsf_scale) == 0:
        scale = float(lsf_scale)
    else:
        scale = float(aux.uniform(*lsf_scale))
    if not scale > 0 or fiber_lsf_scatter < 0:
        raise ValueError(f"lsf_scale={lsf_scale!r}, fiber_lsf_scatter={fiber_lsf_scatter!r}: "
                         "need a positive scale and a scatter >= 0")
    nominal = setup.lsf
    pixel = setup.dispersion if pixel_integration else 0.0

    def true(s):  # the header's own object when unchanged: the default stays bit-identical
        core = nominal if s == 1.0 else LineSpread(tuple(c * s for c in nominal.coeffs), "true")
        return _TrueLSF(core, pixel, profile)

    fiber_scale = np.ones(setup.fibers)
    fibers = None
    if fiber_lsf_scatter > 0:
        # Rounded as written in FIBRES LSF_SCALE, so the file states the truth exactly.
        fiber_scale = np.round(np.clip(aux.normal(1.0, fiber_lsf_scatter, setup.fibers),
                                       _FIBER_LSF_CLIP[0], _FIBER_LSF_CLIP[1]), 4)
        fibers = [true(scale * s) for s in fiber_scale]
    return _Optics(scale, fiber_scale, true(scale), fibers)


class _ExcessLSF(NamedTuple):
    """The instrument's FWHM with a source's own resolution removed in quadrature (zero where
    the source is the broader: the spectrum is then only sampled)."""

    core: LineSpread
    source_fwhm: object

    def fwhm(self, wavelength):
        excess = self.core.fwhm(wavelength) ** 2 - self.source_fwhm(wavelength) ** 2
        return np.sqrt(np.maximum(excess, 0.0))


def _source_matrix(source, wave_in, wave_out, lsf):
    """Operator from a source's native spectra on ``wave_in`` to the light seen through the
    true ``lsf`` at the pixel centres ``wave_out``; and the fraction of pixels where the
    instrument is sharper than the source (those are sampled, not convolved)."""
    n = wave_out.size
    if lsf.pixel:
        offsets = (np.arange(_PIXEL_SUBSAMPLES) + 0.5) / _PIXEL_SUBSAMPLES - 0.5
        wave_out = (wave_out[:, None] + offsets[None, :] * np.gradient(wave_out)[:, None]).ravel()
    if lsf.profile is None:
        matrix, sharper = _gaussian_matrix(source, wave_in, wave_out, lsf.core)
    else:  # light shifted by +offset reaches the pixel at wave from wave - offset
        matrix, sharper = None, 0.0
        fwhm = lsf.core.fwhm(wave_out)
        for weight, offset, gaussian in lsf.gaussians():
            part, frac = _gaussian_matrix(source, wave_in, wave_out - offset * fwhm, gaussian)
            matrix = weight * part if matrix is None else matrix + weight * part
            sharper = max(sharper, frac)
    if lsf.pixel:
        # Mean over the sub-pixel samples: the box integral (midpoint rule).
        box = np.full((1, _PIXEL_SUBSAMPLES), 1.0 / _PIXEL_SUBSAMPLES)
        matrix = scipy.sparse.kron(scipy.sparse.eye(n), box, format="csr") @ matrix
    return matrix, sharper


def _gaussian_matrix(source, wave_in, wave_out, core):
    """:func:`convolution_matrix` to the Gaussian ``core`` with the source's own resolution
    removed in quadrature."""
    if source.resolving_power is not None:
        return convolution_matrix(wave_in, wave_out, core, source.resolving_power)
    return convolution_matrix(wave_in, wave_out, _ExcessLSF(core, source.native_fwhm))


def _convolve(source, wave_in, native, fibers, pixels, optics):
    """The native spectra of ``fibers`` (rows of ``native``) seen through each fiber's true LSF:
    on the common grid, on each fiber's own pixels, and the source's sharper fraction."""
    if optics.fibers is None:
        matrix, sharper = _source_matrix(source, wave_in, pixels.base, optics.exposure)
        true = (matrix @ native.T).T
        if not pixels.per_fiber:
            return true, true.copy(), sharper
        rows = np.stack([_source_matrix(source, wave_in, pixels.rows[f], optics.exposure)[0]
                         @ native[k] for k, f in enumerate(fibers)])
        return true, rows, sharper
    true = np.empty((len(fibers), pixels.base.size))
    rows = np.empty_like(true)
    sharper = 0.0
    for k, f in enumerate(fibers):  # one operator per fiber: a few dozen fibers
        matrix, frac = _source_matrix(source, wave_in, pixels.base, optics.fibers[f])
        true[k] = matrix @ native[k]
        rows[k] = (_source_matrix(source, wave_in, pixels.rows[f], optics.fibers[f])[0]
                   @ native[k]) if pixels.per_fiber else true[k]
        sharper = max(sharper, frac)
    return true, rows, sharper


def _window(source, pixels, optics):
    """The part of a source's native grid under the pixels plus the LSF wings."""
    wave = source.wavelength
    sigma_max = max(float(np.max(lsf.sigma(pixels.base))) for lsf in optics.all())
    need = (pixels.rows.min() - 6.0 * sigma_max - 10.0, pixels.rows.max() + 6.0 * sigma_max + 10.0)
    if wave[0] > need[0] or wave[-1] < need[1]:
        raise GridError(getattr(source, "path", source.label), "wavelength",
                        f"the source covers {wave[0]:.0f}-{wave[-1]:.0f} A; the setup needs "
                        f"{need[0]:.0f}-{need[1]:.0f} A")
    first = max(int(np.searchsorted(wave, need[0])) - 1, 0)
    return slice(first, int(np.searchsorted(wave, need[1])) + 1)


class _SecondOrder(NamedTuple):
    """Where the second order's light falls: the first order's pixels at half their
    wavelengths (``pixels``, below the setup's blue end clipped to it), the line spreads
    there (``optics``) and each pixel's weight (fiber, pixel): the second- to first-order
    efficiency ratio at lambda / 2 (``ratio``, or ``ratio`` x the scalar theory's with a
    first-order ``blaze``), 0 where lambda / 2 is bluer than the setup's blue end."""

    pixels: _Pixels
    optics: _Optics
    weight: np.ndarray
    ratio: float
    blaze: float | None = None


def _second_order(pixels, optics, ratio, blaze=None):
    """The second order's pixels and line spreads (:class:`_SecondOrder`), or None when
    ``ratio`` is 0. A pixel of first-order wavelength lambda and width d lambda sees, in
    second order, lambda / 2 over d lambda / 2, through the same line spread in pixels: a
    FWHM(lambda) / 2 in Angstrom at lambda / 2. Without ``blaze`` the weight is the
    constant ``ratio`` in [0, 1); with a first-order blaze wavelength it is ``ratio`` (a
    scale in (0, 1], 1: scalar theory) x E_2(lambda / 2) / E_1(lambda / 2)
    (:func:`kspec_fluxcal.second_order.second_order_ratio`)."""
    ratio = float(ratio)
    blue = pixels.setup.wave_min
    if blaze is not None:
        blaze = float(blaze)
    problem = second_order_problem(ratio, blaze, blue)
    if problem is not None:
        raise ValueError(problem[1])
    if blaze is None and ratio == 0.0:
        return None
    half = _Pixels(pixels.setup, np.maximum(0.5 * pixels.base, blue),
                   np.maximum(0.5 * pixels.rows, blue), pixels.per_fiber,
                   np.maximum(0.5 * pixels.written, blue), pixels.written_2d)
    fibers = None if optics.fibers is None else [_half_lsf(lsf) for lsf in optics.fibers]
    halved = _Optics(optics.scale, optics.fiber_scale, _half_lsf(optics.exposure), fibers)
    scale = second_order_ratio(half.rows, ratio, blaze)
    weight = np.where(0.5 * pixels.rows >= blue, scale, 0.0)
    if not weight.any():
        warnings.warn(f"second_order={ratio:g} adds nothing: the setup {pixels.setup.name!r} "
                      f"({blue:.0f}-{pixels.setup.wave_max:.0f} A) is less than an octave "
                      "wide", FluxCalWarning, stacklevel=3)
    return _SecondOrder(half, halved, weight, ratio, blaze)


def _half_lsf(lsf):
    """A true line spread as the second order sees it at lambda / 2: FWHM2(mu) =
    FWHM(2 mu) / 2 (coefficients c_k 2^(k-1)), the pixel box half as wide; the same
    profile in units of the FWHM."""
    core = LineSpread(tuple(c * 2.0 ** (k - 1) for k, c in enumerate(lsf.core.coeffs)), "true")
    return _TrueLSF(core, 0.5 * lsf.pixel, lsf.profile)
