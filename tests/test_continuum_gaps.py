"""Bridging unusable pixels: fill_gaps at the unusable pixels only is fill_gaps along whole
rows, value for value."""

import numpy as np

from kspec_fluxcal.continuum import _fill_at_gaps, _fill_rows, fill_gaps


def test_few_gaps_filled_as_fill_gaps_fills_them():
    """Any rows and masks (none usable, all usable, gaps at the ends, float32 values; finite
    values, fill_gaps warns on others): the same values, signs and type."""
    rng = np.random.default_rng(7)
    cases = [(np.ones((2, 5)), np.zeros((2, 5), bool)), (np.ones((2, 5)), np.ones((2, 5), bool)),
             (np.arange(6.0).reshape(1, 6), np.array([[0, 1, 0, 0, 1, 0]], bool))]
    for trial in range(500):
        rows, pixels = rng.integers(1, 5), rng.integers(1, 40)
        values = rng.normal(size=(rows, pixels))
        cases.append((values.astype(np.float32) if trial % 3 == 0 else values,
                      rng.random((rows, pixels)) < rng.random()))
    for values, use in cases:
        expected, filled = _fill_rows(values, use), _fill_at_gaps(values, use)
        assert filled.dtype == expected.dtype and filled.shape == expected.shape
        assert np.array_equal(filled, expected) and np.array_equal(np.signbit(filled),
                                                                   np.signbit(expected))
        assert np.array_equal(fill_gaps(values, use), expected)  # whichever path it takes
    values = np.array([[1.0, 2.0, 3.0, 4.0]])
    assert _fill_at_gaps(values, np.array([[True, False, False, True]])).tolist() == [
        [1.0, 2.0, 3.0, 4.0]]  # a linear ramp bridged
