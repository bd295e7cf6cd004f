"""The template library serving an exposure, and its templates at the exposure's pixels and
line spread as the standard-star fit asks for them (prepared on demand, kept)."""

from __future__ import annotations

import numpy as np

from .._inputs import expect_dataset
from ..config import Config
from ..grid import PARAMS, alpha_response_weights
from ..lsf import exposure_lsf
from ..templates import (
    SPECTRA_DTYPE,
    check_coverage,
    is_library,
    library_arrays,
    library_bands,
    library_models,
    library_range,
    library_spectra,
    prepare_library,
)

__all__ = ["template_library", "ExposureTemplates", "reference_templates",
           "interpolated_corners", "corner_combination", "lattice"]


def template_library(grid, exposure, config=None, *, cache_dir=None):
    """The template library (:func:`kspec_fluxcal.templates.prepare_library`) serving an
    exposure, pre-blurred for its line spread where that pays (:mod:`kspec_fluxcal.preblur`):
    ``grid`` itself when it already is a library."""
    expect_dataset(grid, "grid", "template_library", "kspec_fluxcal.open_grid (or a "
                   "library from prepare_library)", ("wavelength",))
    expect_dataset(exposure, "exposure", "template_library", "kspec_fluxcal.open_exposure",
                   ("wavelength",))
    config = Config() if config is None else config
    if is_library(grid):
        return grid
    wave = exposure["wavelength"].values
    lsf = exposure_lsf(exposure, config)
    check_coverage(grid, wave, lsf)
    return prepare_library(grid, library_range(wave, lsf), config, cache_dir=cache_dir,
                           line_spreads=[lsf])


class ExposureTemplates:
    """Library templates at the exposure's pixels and line spread, prepared on demand (the
    candidates of the Teff windows at once, corners of interpolated models as needed).

    Kept in the library's dtype (:data:`~kspec_fluxcal.templates.SPECTRA_DTYPE`, float32:
    3.7 instead of 7.4 MB for 225 templates of 4096 pixels): :meth:`stored` gives them so,
    for the scores that sum them in float64 themselves and the interpolation between grid
    points; :meth:`fetch` as float64. Calling the object is :meth:`stored`.
    """

    def __init__(self, library, wave, lsf, candidates):
        self.library, self.wave, self.lsf = library, wave, lsf
        # One row per library template, filled as asked for (rows never asked for are not
        # touched, so take no memory, unless half the library or more is asked for at once:
        # then every row is prepared, see _prepare): a fetch is one gather, not a stack of rows.
        self._data = np.empty((library.sizes["template"], np.size(wave)), dtype=SPECTRA_DTYPE)
        self._have = np.zeros(library.sizes["template"], dtype=bool)
        self._prepare(np.asarray(candidates, dtype=np.int64))

    def _prepare(self, ids):
        """Compute the rows ``ids`` not yet prepared."""
        missing = ids[~self._have[ids]]
        if not missing.size:  # the usual case (~14 calls an exposure): no np.unique
            return
        missing = np.unique(missing)
        if 2 * missing.size >= self._have.size:
            # Most of the library: its whole product (each template's column the same) costs
            # less than gathering these columns first (8.3 against 10.3 ms for 153 of 225
            # templates, the copy into the rows included).
            missing = np.arange(self._have.size)
        index = _as_index(missing)
        # Each band of pixels copied into the rows while in the cache: a transposing copy of
        # the whole (P, N) at once read one value of each of the N columns' cache lines per
        # row written and evicted them before the next row came back to them (~1.3 ms after
        # the product of the library's 225 templates at 4096 pixels; identical rows).
        for pixels, columns in library_bands(self.library, self.wave, self.lsf, index,
                                             stacklevel=3):
            self._data[index, pixels] = columns.T
        self._have[missing] = True

    def fetch(self, ids):
        """Normalised templates (len(ids), P) at the exposure's pixels, float64."""
        return self.stored(ids).astype(np.float64)

    def stored(self, ids):
        """:meth:`fetch`'s templates as kept (``SPECTRA_DTYPE``); consecutive ``ids`` give a
        read-only view (no copy of what may be the whole library)."""
        ids = np.asarray(ids, dtype=np.int64)
        self._prepare(ids)
        index = _as_index(ids)
        if isinstance(index, slice):
            view = self._data[index]
            view.flags.writeable = False
            return view
        return self._data[ids]

    __call__ = stored

    def table(self, ids):
        """Every template's row as kept (read-only, ``SPECTRA_DTYPE``), those of ``ids``
        prepared (the others undefined): for products whose sparse weights read only the
        rows of ``ids`` in place, without gathering them first."""
        self._prepare(np.asarray(ids, dtype=np.int64))
        view = self._data.view()
        view.flags.writeable = False
        return view

    def models(self, ids, weights, kinds=("norm",)):
        """Models ``weights`` (M, len(ids)) ``@`` the templates ``ids`` of each of ``kinds``
        ('norm', 'flux') at the exposure's pixels and line spread: (len(kinds) * M, P),
        float64, the kinds' models in turn. Combined before they are convolved
        (:func:`~kspec_fluxcal.templates.library_models`): a few models' product, not every
        template's, and at a line spread whose operator is not kept, no operator built."""
        return library_models(self.library, self.wave, self.lsf, ids, weights, [1.0], kinds)[0]

    def flux(self, ids):
        """Surface fluxes (len(ids), P) at the exposure's pixels (erg/s/cm^2/A)."""
        return library_spectra(self.library, self.wave, self.lsf, np.asarray(ids), kind="flux")


def _as_index(ids):
    """A slice when the ids are consecutive and increasing (a view, no copy)."""
    if ids.size and np.all(np.diff(ids) == 1):
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return ids


def reference_templates(library, teff):
    """Per star, the template nearest (teff, logg 4.5, [M/H] 0, alpha 0); median Teff if NaN."""
    arrays = library_arrays(library)
    t, g, m, a = (arrays[f"template_{p}"] for p in PARAMS)
    finite = np.isfinite(teff)
    # The median only for a star without Teff (~90 of ~200 us a call, two calls an exposure)
    target = np.asarray(teff, dtype=np.float64) if finite.all() else np.where(
        finite, teff, np.median(t))
    dist = (((t[None, :] - target[:, None]) / 250.0) ** 2 + ((g - 4.5) / 0.5) ** 2
            + (m / 0.25) ** 2 + (a / 0.25) ** 2)
    return np.argmin(dist, axis=1)


def lattice(library):
    """The library's grid axes (a dict by parameter) and its template index (-1 where the
    grid has no model), read-only."""
    arrays = library_arrays(library)
    return {p: arrays[p] for p in PARAMS}, arrays["template_index"]


def corner_combination(corners, weight):
    """The distinct templates ``ids`` of ``corners`` (S, C) and each row's weights of them
    (S, len(ids)), a template's weights summed where a row names it more than once."""
    ids, inverse = np.unique(corners, return_inverse=True)
    combine = np.zeros((corners.shape[0], ids.size))
    np.add.at(combine, (np.arange(corners.shape[0])[:, None], inverse.reshape(corners.shape)),
              weight)
    return ids, combine


def interpolated_corners(library, params):
    """Corners (S, C) of the models at ``params`` and their weights
    (:func:`~kspec_fluxcal.grid.alpha_response_weights`)."""
    axes, template_index = lattice(library)
    index, weight = alpha_response_weights(axes, template_index >= 0,
                                           *(params[p] for p in PARAMS))
    corners = template_index[tuple(index[..., k] for k in range(4))]
    # NaN (a point without corners) as 0, as np.nan_to_num (the weights are never infinite)
    weight = np.where((corners >= 0) & ~np.isnan(weight), weight, 0.0)
    # Corners of zero weight name one the row uses: callers fetch (and convolve) only the
    # templates that count, half of the 16 (or 48) corners or fewer.
    used = corners[np.arange(corners.shape[0]), np.argmax(weight != 0, axis=1)]
    return np.maximum(np.where(weight != 0, corners, used[:, None]), 0), weight
