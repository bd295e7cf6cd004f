import numpy as np
import pytest

from kspec_fluxcal._nan import nan_to_num


def _inputs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 50))
    x[0, 3] = x[2, 7] = np.nan
    with_inf = x.copy()
    with_inf[1, 4], with_inf[2, 9] = np.inf, -np.inf
    return [x, with_inf, x.astype(np.float32), with_inf.astype(np.float32),
            np.asfortranarray(with_inf), with_inf[:, ::3], np.array([np.nan]), np.array([]),
            np.array(np.nan), np.float64(np.inf), [np.nan, 1.0, np.inf], np.arange(5),
            np.array([1 + 1j, np.nan + 0j]), rng.normal(size=50),
            np.ma.masked_array(with_inf[0], mask=np.arange(50) % 2 == 0)]


@pytest.mark.parametrize("values", _inputs())
@pytest.mark.parametrize("nan", [None, 0.0, 1.0, 0.05])
def test_nan_to_num_is_numpys(values, nan):
    given = {} if nan is None else {"nan": nan}
    made, expected = nan_to_num(values, **given), np.nan_to_num(values, **given)
    assert type(made) is type(expected)
    made, expected = np.asarray(made), np.asarray(expected)
    assert made.dtype == expected.dtype and made.shape == expected.shape
    assert made.tobytes() == expected.tobytes()
    assert made.flags.c_contiguous == expected.flags.c_contiguous
    assert made.flags.f_contiguous == expected.flags.f_contiguous


def test_nan_to_num_copies():
    values = np.array([np.nan, 2.0])
    made = nan_to_num(values)
    assert made is not values and np.isnan(values[0]) and made[0] == 0.0


def test_nan_to_num_of_a_dask_array_stays_lazy():
    da = pytest.importorskip("dask.array")
    values = np.array([[np.nan, 1.0], [np.inf, 2.0]])
    made = nan_to_num(da.from_array(values, chunks=1))
    assert isinstance(made, da.Array)
    np.testing.assert_array_equal(made.compute(), np.nan_to_num(values))
