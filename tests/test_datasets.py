import numpy as np
import pytest
import xarray as xr

from kspec_fluxcal._datasets import dataset


def _same(a, b):
    xr.testing.assert_identical(a, b)
    assert list(a.variables) == list(b.variables) and list(a.sizes) == list(b.sizes)
    assert set(a.coords) == set(b.coords) and set(a.xindexes) == set(b.xindexes)
    for name in a.variables:
        assert type(a.variables[name]) is type(b.variables[name]), name
        assert a.variables[name].dtype == b.variables[name].dtype, name


def test_the_constructors_dataset():
    wave = np.linspace(4000.0, 5000.0, 7)
    data = {"cal": (("star", "wavelength"), np.ones((2, 7)), {"units": "x"}),
            "mag": xr.Variable(("star", "band"), np.zeros((2, 3)), {"units": "mag"}),
            "ok": ("star", np.array([True, False]))}
    coords = {"wavelength": ("wavelength", wave, {"units": "Angstrom"}),
              "band": ("band", np.array(["g", "r", "i"])), "fiber": ("star", np.array([4, 9])),
              "star_wavelength": (("star", "wavelength"), np.zeros((2, 7))),
              "name": xr.Variable("star", np.array(["a", "b"]), {"note": "n"})}
    attrs = {"expid": "E", "coeffs": [1.0, 2.0]}
    built = dataset(data, coords, attrs)
    _same(built, xr.Dataset(data, coords=coords, attrs=attrs))
    assert built.attrs is not attrs
    assert built["mag"].sel(band="r").shape == (2,)  # the default index
    _same(dataset(data, coords), xr.Dataset(data, coords=coords))


def test_indexes_given_are_the_only_ones():
    band = xr.Coordinates({"band": ["g", "r"]})
    data = {"mag": (("star", "band"), np.zeros((3, 2)))}
    coords = {"band": band.variables["band"], "fiber": ("star", np.arange(3))}
    built = dataset(data, coords, indexes=dict(band.xindexes))
    assert set(built.xindexes) == {"band"} and built.xindexes["band"].equals(band.xindexes["band"])
    _same(built, xr.Dataset(data, coords=band).assign_coords(fiber=("star", np.arange(3))))


def test_a_data_variable_named_after_its_dimension_is_refused():
    with pytest.raises(ValueError):
        dataset({"star": ("star", np.arange(2))}, {})
