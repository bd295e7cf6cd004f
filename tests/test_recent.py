"""Tests of the package's in-memory caches (kspec_fluxcal._recent)."""

import numpy as np


def test_recent_keys_give_arrays_seen_before_the_same_key_object():
    """An array seen before (the same bytes, any dtype or layout that converts to them) gets
    the key object made for it; another of the same fingerprint (two values swapped: the same
    sum of bits) its own, in its place; the table is cleared when full, and keys are then
    made again."""
    from kspec_fluxcal._recent import RecentKeys

    made = []

    def make(array):
        made.append(array.copy())
        return array.tobytes()

    keys = RecentKeys(make, keep=2)
    wave = np.linspace(4000.0, 5000.0, 300)
    first = keys(wave)
    assert first == wave.tobytes() and len(made) == 1
    assert keys(wave.copy()) is first and keys(wave[::-1].copy()[::-1]) is first
    assert keys(list(wave)) is first and len(made) == 1
    assert made[0].dtype == np.float64 and made[0].flags.c_contiguous
    swapped = wave.copy()
    swapped[[3, 7]] = swapped[[7, 3]]
    assert keys(swapped) == swapped.tobytes() != first and len(made) == 2
    assert keys(swapped) is keys(swapped) and len(made) == 2
    first = keys(wave)  # made again: the swapped pixels took its place
    assert first == wave.tobytes() and keys(wave) is first and len(made) == 3
    assert keys(wave + 1.0) == (wave + 1.0).tobytes() and keys(wave) is first
    keys(wave + 2.0)  # a third: the table (two) is cleared first
    again = keys(wave)
    assert again == first and again is not first and len(made) == 6
