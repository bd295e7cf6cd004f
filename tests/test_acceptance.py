"""Unit tests of the acceptance step's helpers (kspec_fluxcal.fit.acceptance)."""

import numpy as np
import pytest

from kspec_fluxcal.fit.acceptance import _percentile


@pytest.mark.parametrize("q", [0.0, 10.0, 50.0, 90.0, 99.9, 100.0, 37.3])
def test_percentile_is_numpys_to_the_last_bit(q):
    rng = np.random.default_rng(int(q * 10))
    for n in (1, 2, 3, 10, 11, 999, 1000, 1001, 3000):
        values = rng.lognormal(0.0, 3.0, n)
        values[rng.random(n) < 0.05] = np.inf  # a pixel of no photons kept, as numpy keeps it
        with np.errstate(invalid="ignore"):
            expected = np.percentile(values, q)
            got = _percentile(values.copy(), q)
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (n, q)
