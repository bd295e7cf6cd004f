"""Pixel widths over the reference grid's, with and without the caller's logarithms; pixel steps."""

import numpy as np

from kspec_fluxcal.wavelength import central_steps, width_ratio


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


def test_distinct_rows_are_the_rows_equal_in_every_byte_in_order_of_appearance():
    """Rows (with their scale) are one when all their bytes are: NaN pixels alike, -0 and +0
    not, rows whose bits sum alike (two pixels swapped) not; numbered as they first appear."""
    from kspec_fluxcal.wavelength import distinct_rows

    rng = np.random.default_rng(2)
    base = np.sort(rng.uniform(3500.0, 9000.0, (4, 50)), axis=1)
    base[1, 3] = np.nan
    swapped = base[0].copy()
    swapped[[10, 11]] = swapped[[11, 10]]
    zero = base[2].copy()
    zero[0] = 0.0
    negative = zero.copy()
    negative[0] = -0.0
    wave = np.stack([base[1], base[0], swapped, base[1], zero, negative, base[0], base[0]])
    scale = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.1])
    rows, inverse = distinct_rows(wave.reshape(2, 4, 50), scale.reshape(2, 4))
    np.testing.assert_array_equal(inverse, [0, 1, 2, 0, 3, 4, 1, 5])
    np.testing.assert_array_equal(rows[:, 1:], wave[[0, 1, 2, 4, 5, 7]])
    np.testing.assert_array_equal(rows[:, 0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.1])
    rows, inverse = distinct_rows(base[0], None)
    assert rows.shape == (1, 51) and inverse.tolist() == [0]


def test_pixel_widths_are_the_mean_of_the_two_steps_or_the_one_there_is():
    """Interior pixels: the mean of their two steps; the ends (and a pixel beside a NaN) the
    one step they have; along any axis, with and without NaN pixels (which have none)."""
    from kspec_fluxcal.wavelength import pixel_widths

    rng = np.random.default_rng(4)
    centres = np.cumsum(rng.uniform(0.5, 1.5, (3, 40)), axis=1) + 4000.0
    step = np.diff(centres, axis=1)
    want = np.concatenate([step[:, :1], 0.5 * (step[:, :-1] + step[:, 1:]), step[:, -1:]], 1)
    np.testing.assert_array_equal(pixel_widths(centres), want)
    np.testing.assert_array_equal(pixel_widths(centres.T, axis=0), want.T)
    holed = centres.copy()
    holed[1, 10] = np.nan
    got = pixel_widths(holed)
    np.testing.assert_array_equal(got[[0, 2]], want[[0, 2]])
    assert np.isnan(got[1, 10])
    assert got[1, 9] == step[1, 8] and got[1, 11] == step[1, 11]
    np.testing.assert_array_equal(got[1, 12:], want[1, 12:])
    assert pixel_widths(np.array([5000.0, 5001.5])).tolist() == [1.5, 1.5]


def test_wavelength_keys_are_the_rounded_and_the_exact_pixels_bytes():
    """wavelength_key: the bytes of the pixels rounded to 1e-6 A (exposures of one setup,
    1e-11 A apart, one key; the same key object for pixels seen before); pixels_key: their
    own bytes (float64, whatever the dtype and layout given)."""
    from kspec_fluxcal.wavelength import keyed_wavelengths, pixels_key, wavelength_key

    wave = np.linspace(4000.0, 5000.0, 257) + 1e-9
    key = wavelength_key(wave)
    assert key == np.round(wave, 6).tobytes() == keyed_wavelengths(wave).tobytes()
    assert wavelength_key(wave.copy()) is key and wavelength_key(wave + 1e-11) == key
    exact = pixels_key(wave)
    assert exact == wave.tobytes() and pixels_key(list(wave)) is exact
    assert pixels_key(wave + 1e-11) == (wave + 1e-11).tobytes() != exact
    assert pixels_key(wave.astype(np.float32)) == wave.astype(np.float32).astype(
        np.float64).tobytes()


def test_central_steps_are_numpys_gradient_to_the_last_bit():
    rng = np.random.default_rng(4)
    rows = np.cumsum(rng.random((3, 500)) * 3.7, axis=1) + 3600.0
    for values in (rows, rows[0], rows[:, :2], np.broadcast_to(rows[1], (2, 500))):
        expected = np.gradient(values, axis=-1)
        got = central_steps(values)
        assert got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()
