"""Property-based robustness (issue 8): whatever is done to a valid RED file or catalog, the
calibration either succeeds (output written, readable, finite wherever the input was valid)
or raises one of the package's errors and writes nothing. Never another exception, never a
hang.

Hypothesis draws lists of mutations of one small valid exposure (headers, pixel blocks,
shapes, extensions, FIBRES values, truncation) and of its catalog (cells, columns, rows).
The runs are derandomized, so CI sees the same examples every time; the number of examples
and the outcomes are reported at the end of the run (with -v).
"""

from __future__ import annotations

import collections
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import build_base, write_catalog

from kspec_fluxcal.errors import FluxCalError
from kspec_fluxcal.exposure import open_exposure
from kspec_fluxcal.pipeline import calibrate_exposure
from kspec_fluxcal.sim import CATALOG_HEADER

#: Outcomes by test: 'ok' or the exception class name, counted over all examples.
TALLY = collections.defaultdict(collections.Counter)
#: Seconds one example may take before it counts as a hang.
EXAMPLE_TIMEOUT = 60

SETTINGS = settings(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, report_line):
    built = build_base(tmp_path_factory.mktemp("base"))
    yield built
    # In the run's summary with -v (CI logs show how many examples ran and how they ended).
    for name, counts in TALLY.items():
        report_line(f"{Path(__file__).name}::{name}: {sum(counts.values())} examples: "
                    + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


def check_outcome(base, red, catalog, tally):
    """Calibrate; assert the outcome is a valid product or a package error with no output."""
    out = red.parent / "out"
    try:
        with time_limit(EXAMPLE_TIMEOUT):
            result = calibrate_exposure(red, catalog, base.grid, out)
    except FluxCalError as err:
        tally[type(err).__name__] += 1
        assert not out.exists() or not any(out.iterdir()), f"output written, yet {err}"
        assert str(err)
        return
    tally["ok"] += 1
    assert result.path is not None and result.path.is_file()
    back = open_exposure(result.path)
    assert "cal" in back and np.all(np.isfinite(back["cal"].values))
    good_in = open_exposure(red)["good"].values
    assert np.all(np.isfinite(back["flux"].values[good_in]))
    assert np.all(np.isfinite(back["variance"].values[good_in]))
    # Nothing lost, nothing invented: the same pixels are good before and after.
    np.testing.assert_array_equal(back["good"].values, good_in)


# ----------------------------------------------------------------------------- RED mutations

HEADER_KEYS = ("EXPTIME", "EXPOSED", "MJD-OBS", "UTMJD", "EXPID", "AIRMASS", "SPECFWHM",
               "FWHMPC0", "FWHMPC1", "FWHMPC2", "FWHMPC3", "BUNIT", "AIRORVAC", "CRVAL1",
               "CDELT1", "CD1_1", "CRPIX1", "CUNIT1", "CTYPE1")
WAVE_KEYS = ("BUNIT", "AIRORVAC")
ODD_WORDS = ("", " ", "nm", "Angstrom", "um", "air", "vac", "water", "counts", "Wavelength",
             "RA---TAN", "T", "NaN", "inf", "-1", "1e5")
header_values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e-30, 1e30, -1.0]),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.booleans(),
    st.sampled_from(ODD_WORDS),
    st.text(alphabet=string.ascii_letters + string.digits + " .-+", max_size=10),
)
block_values = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0, -1e4, 1e6])
EXT_NAMES = ("VARIANCE", "WAVELA", "FIBRES", "FIBRES_IFU", "FLUXCAL", "SCI", "")
FIBRES_VALUES = {
    "TYPE": st.sampled_from(["C", "P", "S", "U", "N", "F", "D", "X", "", "c", " "]),
    "OBJID": st.one_of(st.sampled_from([-1, 0, 2**62]), st.integers(-(2**40), 2**40)),
    "RA": st.one_of(st.sampled_from([np.nan, np.inf, -1.0, 360.0, 400.0, 0.0]),
                    st.floats(0.0, 360.0)),
    "DEC": st.one_of(st.sampled_from([np.nan, -np.inf, 95.0, -90.0, 90.0]),
                     st.floats(-90.0, 90.0)),
    "NAME": st.text(alphabet=string.ascii_letters, max_size=10),
}


def _header_set(h, key, value):
    h[0].header[key] = value


def _header_remove(h, key):
    h[0].header.remove(key, ignore_missing=True)


def _wave_header(h, key, value):
    if "WAVELA" in h:
        h["WAVELA"].header[key] = value


def _block(h, index, value, rows, cols):
    if index < len(h) and isinstance(h[index], fits.ImageHDU | fits.PrimaryHDU):
        data = h[index].data
        if data is not None and data.ndim >= 1:
            data = np.array(data, dtype=np.float64 if index == 2 else np.float32)
            if data.ndim == 1:
                data[slice(*cols)] = value
            else:
                data[slice(*rows), slice(*cols)] = value
            h[index].data = data


def _reshape(h, index, how):
    if index >= len(h) or not isinstance(h[index], fits.ImageHDU | fits.PrimaryHDU):
        return
    data = h[index].data
    if data is None:
        return
    if how == "drop-row" and data.ndim == 2:
        data = data[:-1]
    elif how == "drop-column":
        data = data[..., :-1]
    elif how == "flatten":
        data = data.reshape(-1)
    elif how == "add-axis":
        data = data[None]
    elif how == "transpose":
        data = data.T
    elif how == "nodata":
        data = None
    h[index].data = data


def _rename(h, index, name):
    if 1 <= index < len(h):
        h[index].name = name


def _remove(h, index):
    if 1 <= index < len(h):
        del h[index]


def _fibres_value(h, column, row, value):
    for hdu in h[1:]:
        if isinstance(hdu, fits.BinTableHDU) and column in hdu.columns.names:
            if row < len(hdu.data):
                hdu.data[column][row] = value
            return


def _fibres_drop_row(h):
    for k, hdu in enumerate(h):
        if k and isinstance(hdu, fits.BinTableHDU) and len(hdu.data):
            h[k] = fits.BinTableHDU(hdu.data[:-1], header=hdu.header, name=hdu.name)
            return


def _fibres_retype(h, column, kind):
    """Replace a FIBRES column by a float one with a NaN, or by its text."""
    for k, hdu in enumerate(h):
        if not (k and isinstance(hdu, fits.BinTableHDU) and column in hdu.columns.names):
            continue
        values = np.asarray(hdu.data[column])
        cols = [c for c in hdu.columns if c.name != column]
        if kind == "float" and values.dtype.kind in "iuf":
            new = values.astype(np.float64)
            new[0] = np.nan
            cols.append(fits.Column(column, "D", array=new))
        else:
            text = np.array([str(v) for v in values])
            cols.append(fits.Column(column, f"{max(1, max(len(t) for t in text))}A", array=text))
        h[k] = fits.BinTableHDU.from_columns(cols, name=hdu.name)
        return


rows = st.tuples(st.integers(0, 8), st.integers(0, 8)).map(sorted)
cols = st.tuples(st.integers(0, 1000), st.integers(0, 1000)).map(sorted)
# Pixel blocks and FIBRES values usually leave a calibratable file: they are drawn more often
# (listed twice), so that successes are checked too, not only the readers' refusals.
pixel_block = st.tuples(st.just(_block), st.integers(0, 2), block_values, rows, cols)
fibres_value = st.sampled_from(list(FIBRES_VALUES)).flatmap(
    lambda c: st.tuples(st.just(_fibres_value), st.just(c), st.integers(0, 7), FIBRES_VALUES[c]))
red_mutation = st.one_of(
    pixel_block, pixel_block, fibres_value, fibres_value,
    st.tuples(st.just(_header_set), st.sampled_from(HEADER_KEYS), header_values),
    st.tuples(st.just(_header_remove), st.sampled_from(HEADER_KEYS)),
    st.tuples(st.just(_wave_header), st.sampled_from(WAVE_KEYS), header_values),
    st.tuples(st.just(_reshape), st.integers(0, 2),
              st.sampled_from(["drop-row", "drop-column", "flatten", "add-axis", "transpose",
                               "nodata"])),
    st.tuples(st.just(_rename), st.integers(1, 3), st.sampled_from(EXT_NAMES)),
    st.tuples(st.just(_remove), st.integers(1, 3)),
    st.tuples(st.just(_fibres_drop_row)),
    st.tuples(st.just(_fibres_retype), st.sampled_from(["OBJID", "RA", "DEC", "TYPE"]),
              st.sampled_from(["float", "text"])),
)


@settings(SETTINGS, max_examples=160)
@given(mutations=st.lists(red_mutation, min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.none(), st.floats(0.0, 1.0)))
def test_mutated_red_files(base, mutations, cut):
    hdus = base.hdus(2)
    for op, *args in mutations:
        op(hdus, *args)
    with tempfile.TemporaryDirectory() as tmp:
        red = Path(tmp) / "red.fits"
        hdus.writeto(red, output_verify="ignore")
        if cut is not None:
            data = red.read_bytes()
            red.write_bytes(data[: int(cut * len(data))])
        catalog = write_catalog(Path(tmp) / "catalog.csv", base.rows[2])
        check_outcome(base, red, catalog, TALLY["test_mutated_red_files"])


# ----------------------------------------------------------------------------- catalog mutations

GARBAGE = ("", " ", "nan", "NaN", "inf", "-inf", "99", "99.999", "9.9", "abc", "1e400", "-1",
           "0", "1,2", '"', "0x10", "١٢", "12.5", "1.0407521271197121e16", "+7", " 3 ")
cell_values = st.one_of(st.sampled_from(GARBAGE),
                        st.floats(-100.0, 100.0).map(lambda v: f"{v:.3f}"),
                        st.text(alphabet=string.printable, max_size=6))


def _cell(rows, header, row, column, value):
    rows[row % len(rows)][header[column % len(header)]] = value


def _standard_cell(rows, header, which, column, value, objids):
    objid = objids[which % len(objids)]
    for r in rows:
        if r.get("objid") == str(objid):
            r[header[column % len(header)]] = value


def _drop_column(rows, header, column):
    if len(header) > 1:
        del header[column % len(header)]


def _duplicate_row(rows, header, row):
    rows.append(dict(rows[row % len(rows)]))


def _delete_row(rows, header, row):
    if rows:
        del rows[row % len(rows)]


PHOTOMETRY = [CATALOG_HEADER.index(c) for c in ("Gaia", "dGaia", "BP", "dBP", "RP", "dRP",
                                                 "g", "dg", "r", "dr", "i", "di", "z", "dz",
                                                 "J", "dJ", "H", "dH", "K", "dK", "Teff",
                                                 "AGaia", "Ag")]
catalog_mutation = st.one_of(
    st.tuples(st.just(_cell), st.integers(0, 50), st.integers(0, 45), cell_values),
    st.tuples(st.just(_standard_cell), st.integers(0, 1), st.integers(0, 45), cell_values),
    # The standards' photometry, where garbage reaches the fit instead of the reader.
    st.tuples(st.just(_standard_cell), st.integers(0, 1), st.sampled_from(PHOTOMETRY),
              st.one_of(st.sampled_from(("", "99", "9.9", "nan", "inf", "0", "-1", "30")),
                        st.floats(5.0, 25.0).map(lambda v: f"{v:.3f}"))),
    st.tuples(st.just(_standard_cell), st.integers(0, 1), st.sampled_from(PHOTOMETRY),
              st.floats(5.0, 25.0).map(lambda v: f"{v:.3f}")),
    st.tuples(st.just(_drop_column), st.integers(0, 45)),
    st.tuples(st.just(_duplicate_row), st.integers(0, 50)),
    st.tuples(st.just(_delete_row), st.integers(0, 50)),
)


@settings(SETTINGS, max_examples=80)
@given(mutations=st.lists(catalog_mutation, min_size=1, max_size=4))
def test_mutated_catalogs(base, mutations):
    rows = base.catalog_rows(2)
    header = list(CATALOG_HEADER)
    for op, *args in mutations:
        if op is _standard_cell:
            args = [*args, base.std_objid[2]]
        if rows:
            op(rows, header, *args)
    with tempfile.TemporaryDirectory() as tmp:
        red = Path(tmp) / "red.fits"
        red.write_bytes(base.red[2])
        catalog = write_catalog(Path(tmp) / "catalog.csv", rows, header)
        check_outcome(base, red, catalog, TALLY["test_mutated_catalogs"])


def test_outcomes_were_mixed():
    """The strategies reach both outcomes (runs after the property tests, in file order)."""
    if not TALLY:
        pytest.skip("run with the property tests")
    for name, counts in TALLY.items():
        assert counts["ok"] > 0, f"{name}: no example calibrated: {dict(counts)}"
        assert sum(counts.values()) > counts["ok"], f"{name}: no example failed: {dict(counts)}"
