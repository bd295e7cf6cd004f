"""Pixel widths over the reference grid's, with and without the caller's logarithms."""

import numpy as np

from kspec_fluxcal.wavelength import width_ratio


def test_width_ratio_with_the_callers_logarithms_is_the_same():
    """1 on the reference pixels, the widths over the reference's there on a compressed grid,
    1 at a NaN pixel; the caller's logarithms (any value where a pixel has no wavelength)
    give the same, to the bit."""
    reference = np.geomspace(4000.0, 8000.0, 500)
    wave = np.stack([reference, 4000.0 + 2.0 * (reference - 4000.0) / 2.5, reference + 0.3])
    wave[2, 100] = np.nan
    got = width_ratio(reference, wave)
    np.testing.assert_array_equal(got[0], 1.0)
    width = np.gradient(wave[1])
    np.testing.assert_allclose(got[1, 1:-1], width[1:-1] / np.interp(
        wave[1, 1:-1], reference, np.gradient(reference)), rtol=2e-3)
    assert got[2, 100] == 1.0 and np.isfinite(got).all()
    ln_wave = np.log(np.where(np.isfinite(wave), wave, 1.0))
    np.testing.assert_array_equal(width_ratio(reference, wave, ln=(np.log(reference), ln_wave)),
                                  got)
