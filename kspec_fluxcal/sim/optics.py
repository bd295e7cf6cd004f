"""The light's path to the pixels: each fiber's wavelengths and true line-spread function.

The header's FWHMPCk is the nominal LSF (Gaussian). The light meets a true one that can
differ, as the fitter must cope with: FWHM x ``lsf_scale`` (per exposure, unknown to the
pipeline), x each fiber's own scale (``fiber_lsf_scatter``), and optionally integrated over
the pixel (``pixel_integration``: a one-pixel box on top of the Gaussian). A source's native
spectra are convolved to it with the source's own resolution removed in quadrature (where the
source is the broader, they are only sampled).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse

from ..errors import GridError
from ..lsf import LineSpread
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


class _Pixels(NamedTuple):
    setup: Setup
    base: np.ndarray  # the common grid (npix,), air
    rows: np.ndarray  # every fiber's air wavelengths (nfib, npix)
    per_fiber: bool  # rows differ from base (2-D WAVELA)


def _pixels(rng, setup, wavelength_format):
    """Every fiber's air wavelengths; their median is the common grid."""
    base = setup.wavelength
    shifts = np.zeros(setup.fibers)
    if wavelength_format == "wavela2d":
        shifts = rng.uniform(-_FIBER_SHIFT_PIXELS, _FIBER_SHIFT_PIXELS, setup.fibers)
        shifts -= np.median(shifts)
    rows = base[None, :] + shifts[:, None] * setup.dispersion
    return _Pixels(setup, base, rows, wavelength_format == "wavela2d")


class _TrueLSF(NamedTuple):
    """The line-spread function the light meets: a Gaussian ``core`` (the header's, scaled)
    and, when ``pixel`` > 0, a box of that width (Angstrom) for the integration over a pixel."""

    core: LineSpread
    pixel: float = 0.0

    def sigma(self, wavelength):
        """Gaussian-equivalent sigma, Angstrom (for unresolved sky and telluric lines)."""
        core = self.core.sigma(wavelength)
        return np.sqrt(core**2 + self.pixel**2 / 12.0) if self.pixel else core


class _Optics(NamedTuple):
    scale: float  # exposure's true FWHM / header FWHM
    fiber_scale: np.ndarray  # per fiber FWHM / header FWHM (FIBRES LSF_SCALE)
    exposure: _TrueLSF  # the exposure's true LSF (every fiber's, without per-fiber scatter)
    fibers: list | None  # per-fiber true LSFs, or None when they all equal ``exposure``

    def all(self):
        return [self.exposure] if self.fibers is None else [self.exposure, *self.fibers]

    def fiber(self, f):
        return self.exposure if self.fibers is None else self.fibers[f]


def _true_lsfs(aux, setup, lsf_scale, pixel_integration, fiber_lsf_scatter):
    """The true line-spread functions of an exposure (its own and per fiber)."""
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
        return _TrueLSF(core, pixel)

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
    if source.resolving_power is not None:
        matrix, sharper = convolution_matrix(wave_in, wave_out, lsf.core, source.resolving_power)
    else:
        matrix, sharper = convolution_matrix(wave_in, wave_out,
                                             _ExcessLSF(lsf.core, source.native_fwhm))
    if lsf.pixel:
        # Mean over the sub-pixel samples: the box integral (midpoint rule).
        box = np.full((1, _PIXEL_SUBSAMPLES), 1.0 / _PIXEL_SUBSAMPLES)
        matrix = scipy.sparse.kron(scipy.sparse.eye(n), box, format="csr") @ matrix
    return matrix, sharper


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
