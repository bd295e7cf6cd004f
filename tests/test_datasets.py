
import numpy as np
import pytest
import xarray as xr

from kspec_fluxcal._datasets import (
    applied,
    dataset,
    index_coordinate,
    string_variables,
    with_variables,
)


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


def test_variables_added_as_assign_adds_them():
    wave = np.linspace(4000.0, 5000.0, 7)
    ds = xr.Dataset({"cal": (("star", "wavelength"), np.ones((2, 7)), {"units": "x"}),
                     "mag": (("star", "band"), np.zeros((2, 3)))},
                    coords={"wavelength": ("wavelength", wave), "band": ["g", "r", "i"],
                            "fiber": ("star", np.array([4, 9]))}, attrs={"expid": "E"})
    ds["teff"] = ("star", np.array([5800.0, 6100.0]))  # after a coordinate: order kept
    new = {"status": ("star", np.array(["used", "outlier"])),
           "used": xr.Variable("star", np.array([True, False]), {"note": "n"})}
    built = with_variables(ds, new)
    _same(built, ds.assign(new))
    assert list(built.data_vars) == ["cal", "mag", "teff", "status", "used"]
    assert built.attrs is not ds.attrs and "status" not in ds
    assert built["mag"].sel(band="r").shape == (2,)  # the index kept


def _two(a, b):
    return a * b, (a + b).astype(np.float32)


def test_applied_is_apply_ufunc_on_variables_in_memory():
    dims = ("fiber", "wavelength")
    a = xr.Variable(dims, np.arange(12.0).reshape(3, 4), {"units": "count"})
    b = xr.Variable(dims, np.full((3, 4), 2.0), {"units": "other"})
    made = applied(_two, dims, a, b)
    expected = xr.apply_ufunc(_two, a, b, output_core_dims=[[], []], dask="parallelized",
                              output_dtypes=[np.float64, np.float32])
    assert len(made) == 2
    for m, e in zip(made, expected, strict=True):
        assert type(m) is xr.Variable and m.identical(e) and m.dtype == e.dtype


def test_applied_leaves_the_rest_to_apply_ufunc():
    dims = ("fiber", "wavelength")
    a = xr.Variable(dims, np.ones((3, 4)))
    assert applied(_two, dims, a, a.transpose()) is None  # other dims
    assert applied(_two, dims, xr.DataArray(a), a) is None
    assert applied(_two, dims, a.chunk(), a) is None  # Dask-backed: kept lazy


def test_index_coordinate_reuses_an_index_of_the_same_values():
    wave = np.linspace(4000.0, 5000.0, 7)
    source = xr.Dataset(coords={"wavelength": ("wavelength", wave.copy(), {"units": "nm"}),
                                "band": ["g", "r"]})
    source["wavelength"].encoding = {"dtype": "float32"}
    data = {"cal": (("star", "wavelength"), np.ones((2, 7)))}
    attrs = {"units": "Angstrom"}
    made = index_coordinate(source.variables["wavelength"], wave, attrs)
    assert isinstance(made, xr.IndexVariable) and made.attrs == attrs and not made.encoding
    built = dataset(data, {"wavelength": made, "band": index_coordinate(
        source.variables["band"], np.array(["g", "r"]))})
    _same(built, xr.Dataset(data, coords={"wavelength": ("wavelength", wave, attrs),
                                          "band": ("band", np.array(["g", "r"]))}))
    assert source.variables["wavelength"].attrs == {"units": "nm"}  # the source's untouched


def test_index_coordinate_of_other_values_is_a_new_one():
    source = xr.Coordinates({"band": np.array(["g", "r"])})
    for values in (np.array(["g", "i"]), np.array(["g", "rr"]), np.array(["g"])):
        assert index_coordinate(source.variables["band"], values) == (("band",), values)
    plain = xr.Variable("band", np.array(["g", "r"]))
    values = np.array(["g", "r"])
    assert index_coordinate(plain, values, {"a": 1}) == (("band",), values, {"a": 1})


def test_string_variables_are_the_constructors():
    columns = {"status": (["ok", "rejected: few pixels"], {"units": ""}),
               "flags": (np.array(["", "at the grid edge"], dtype=object), {}),
               "when": ([np.datetime64("2026-01-01T00:00"), None], {"note": "x"})}
    got = string_variables("star", columns)
    assert list(got) == list(columns)
    for name, (values, attrs) in columns.items():
        want = xr.Variable("star", np.asarray(values, dtype=object), attrs)
        assert type(got[name]) is xr.Variable and got[name].dims == ("star",)
        assert got[name].dtype == want.dtype  # object; datetime64 as xarray makes it
        xr.testing.assert_identical(got[name], want)
    assert got["status"].data.base is got["flags"].data.base is not None  # one conversion
    assert got["when"].dtype.kind == "M" and got["status"].dtype == object
    got["flags"].attrs["units"] = "1"  # each Variable has its own attrs
    assert got["status"].attrs == {"units": ""} and columns["flags"][1] == {}
    assert string_variables("star", {}) == {}
    empty = string_variables("star", {"a": ([], {}), "b": ([], {})})
    assert empty["a"].shape == (0,) and empty["b"].dtype == object
