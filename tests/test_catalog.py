import gc
import re

import numpy as np
import pytest
import xarray as xr
from conftest import CATALOG_HEADER, catalog_row

from kspec_fluxcal import catalog as catalog_module
from kspec_fluxcal.catalog import match_standards, read_catalog
from kspec_fluxcal.errors import CatalogError, FluxCalWarning
from kspec_fluxcal.exposure import open_exposure


def test_vega_to_ab_offsets_of_the_contract(catalog_file):
    cat = read_catalog(catalog_file([catalog_row(1, 10.0, 20.0, Gaia=15.0, RP=15.0, BP=15.0,
                                                 J=12.0, H=12.0, K=12.0, g=16.0)]))
    mag = cat["mag"].sel(objid=1)
    assert mag.sel(band="gaiadr2-G") == pytest.approx(15.1020, abs=1e-9)
    assert mag.sel(band="gaiadr2-RP") == pytest.approx(15.3542, abs=1e-9)
    assert mag.sel(band="gaiadr2-BP") == pytest.approx(15.0292, abs=1e-9)
    assert mag.sel(band="twomass-J") == pytest.approx(12.91)
    assert mag.sel(band="twomass-H") == pytest.approx(13.39)
    assert mag.sel(band="twomass-Ks") == pytest.approx(13.85)
    assert mag.sel(band="panstarrs-g") == pytest.approx(16.0)  # PS1 is AB already
    assert cat["mag"].dims == ("star", "band")


def test_bands_asked_for_are_checked(catalog_file):
    """An unknown band was dropped without a word (all unknown: numpy's 'need at least one
    array to stack'); one band given as a string is that band."""
    path = catalog_file([catalog_row(1, 10.0, 20.0, g=16.0)])
    one = read_catalog(path, bands="panstarrs-g")
    assert list(one["band"].values) == ["panstarrs-g"]
    for bands, problem in ((["panstarrs-g", "sdss-u"], "unknown band(s) sdss-u"),
                           (["sdss-u"], "unknown band(s) sdss-u"), ([], "no band asked for"),
                           (["panstarrs-g", "panstarrs-g"],
                            "band(s) asked for twice: panstarrs-g")):
        with pytest.raises(CatalogError, match=re.escape(f"bands: {problem}; the catalog has ")):
            read_catalog(path, bands=bands)


def test_sentinels_become_nan(catalog_file):
    rows = [catalog_row(1, 10, 20, g=99.9), catalog_row(2, 10, 21, dr=9.99),
            catalog_row(3, 10, 22, i="", Teff=0, AGaia="")]
    cat = read_catalog(catalog_file(rows))
    assert np.isnan(cat["mag"].sel(objid=1, band="panstarrs-g"))
    assert np.isnan(cat["mag"].sel(objid=2, band="panstarrs-r"))
    assert np.isnan(cat["mag_err"].sel(objid=2, band="panstarrs-r"))
    assert np.isnan(cat["mag"].sel(objid=3, band="panstarrs-i"))
    assert np.isnan(cat["teff_catalog"].sel(objid=3)) and np.isnan(cat["a_gaia"].sel(objid=3))
    assert cat["teff_catalog"].sel(objid=1) == 5900
    assert int(np.isfinite(cat["mag"]).sum()) == 3 * 10 - 3


def test_missing_columns(catalog_file):
    header = [c for c in CATALOG_HEADER if c not in ("dRP", "objid")]
    with pytest.raises(CatalogError, match=r"header line: missing required column\(s\) objid, dRP"):
        read_catalog(catalog_file([catalog_row(1, 1, 1)], header=header))


@pytest.mark.parametrize("rename, match", [
    (str.lower, r"missing required column\(s\) RA, Dec, BP, .* \(column names are "
                r"case-sensitive: the header has 'ra', 'dec', 'bp' and \d+ more in another case\)"),
    ({"objid": "ObjID", "RA": "Ra", "Dec": "DEC"}.get,
     r"missing required column\(s\) objid, RA, Dec \(column names are case-sensitive: the "
     r"header has 'ObjID', 'Ra', 'DEC' in another case\)"),
], ids=["database-export", "required-only"])
def test_columns_in_another_case(catalog_file, rename, match):
    """Column names written in another case (a database's lower-case export): listed as
    missing without a word on why, or, for objid, RA and Dec, 'is not a line of
    comma-separated column names'."""
    path = catalog_file([catalog_row(1, 1, 1)])
    lines = path.read_text().split("\n")
    lines[0] = ",".join(rename(c) or c for c in lines[0].split(","))
    path.write_text("\n".join(lines))
    with pytest.raises(CatalogError, match=rf"header line: {match}"):
        read_catalog(path)


def test_non_numeric_value_named(catalog_file):
    path = catalog_file([catalog_row(1, 1, 1), catalog_row(2, 1, 2, r="bright")])
    with pytest.raises(CatalogError, match=r"column r row 3: value 'bright' is not a number"):
        read_catalog(path)


def test_negative_magnitude_error_named(catalog_file):
    path = catalog_file([catalog_row(1, 1, 1), catalog_row(2, 1, 2, dr=-0.01)])
    with pytest.raises(CatalogError, match=r"column dr row 3: error -0\.01 mag is negative"):
        read_catalog(path)
    # 0 is a rounded small error: kept (the photometric fit's error floor applies)
    zero = read_catalog(catalog_file([catalog_row(1, 1, 1, dr=0.0)], name="zero.csv"))
    assert zero["mag_err"].sel(band="panstarrs-r").values[0] == 0.0


def test_duplicate_objid(catalog_file):
    path = catalog_file([catalog_row(7, 1, 1), catalog_row(8, 1, 2), catalog_row(7, 1, 3)])
    with pytest.raises(CatalogError, match=r"objid 7 appears more than once \(rows 2, 4\)"):
        read_catalog(path)


def test_unreadable(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        read_catalog(tmp_path / "none.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CatalogError, match="empty file"):
        read_catalog(empty)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 50)
    with pytest.raises(CatalogError, match=str(binary.name)):
        read_catalog(binary)


def test_match_by_objid_and_position(red_file, catalog_file):
    # Fibers 0 and 1 are standards: fiber 0 by OBJID, fiber 1 (OBJID -1) by position.
    ds = open_exposure(red_file(fibres={"OBJID": np.array([55, -1, 3, 4, 5, 6])}))
    ra1, dec1 = ds["ra"].values[1], ds["dec"].values[1]
    rows = [catalog_row(55, 0.0, 0.0, Gaia=14.0),  # far away: only the OBJID matches it
            catalog_row(77, ra1 + 1.0 / 3600 / np.cos(np.radians(dec1)), dec1, Gaia=13.0),
            catalog_row(88, ra1 + 10.0 / 3600, dec1)]
    matched = match_standards(ds, read_catalog(catalog_file(rows)))
    assert matched.sizes["star"] == 2
    assert list(matched["fiber"].values) == [0, 1]
    assert list(matched["objid"].values) == [55, 77]
    assert list(matched["match"].values) == ["objid", "position"]
    assert matched["separation"].values[1] == pytest.approx(1.0, abs=0.01)
    assert matched["mag"].sel(band="gaiadr2-G").values == pytest.approx([14.102, 13.102])


def test_unmatched_standard_reported_not_guessed(red_file, catalog_file):
    ds = open_exposure(red_file(fibres={"OBJID": np.array([999, -1, 3, 4, 5, 6])}))
    # Star 1000 sits exactly at fiber 0's position but fiber 0 asks for OBJID 999: no guess.
    rows = [catalog_row(1000, ds["ra"].values[0], ds["dec"].values[0])]
    with pytest.warns(FluxCalWarning,
                      match=r"no catalog entry for standard\(s\) fiber 0 .*OBJID 999"):
        matched = match_standards(ds, read_catalog(catalog_file(rows)))
    assert list(matched["match"].values) == ["none", "none"]
    assert np.isnan(matched["mag"].values).all()
    assert list(matched["objid"].values) == [999, -1]  # what each fiber asked for


def test_matched_rows_are_the_catalog_rows(red_file, catalog_file):
    """The result, built from the catalog's variables directly: each matched standard has its
    catalog row (photometry, per-star coordinates), an unmatched one NaN and -1, the bands keep
    their index and the per-star columns the catalog's dtypes."""
    ds = open_exposure(red_file(fibres={"OBJID": np.array([88, 999, 3, 4, 5, 6])}))
    rows = [catalog_row(77, 10.0, 5.0, Gaia=13.0, plx=1.5, dplx=0.1, source_id=7001),
            catalog_row(88, 20.0, 6.0, Gaia=14.0, Teff=6100, Ag=0.3, plx=2.5, dplx=0.2,
                        source_id=7002)]
    cat = read_catalog(catalog_file(rows, header=[*CATALOG_HEADER, "source_id"]))
    with pytest.warns(FluxCalWarning, match="OBJID 999"):
        matched = match_standards(ds, cat)
    assert list(matched["objid"].values) == [88, 999]
    np.testing.assert_array_equal(matched["mag"].values[0], cat["mag"].sel(objid=88).values)
    assert np.isnan(matched["mag"].values[1]).all() and np.isnan(matched["mag_err"][1]).all()
    for name, value in (("teff_catalog", 6100.0), ("a_g", 0.3), ("parallax", 2.5),
                        ("parallax_err", 0.2), ("source_id", 7002)):
        assert matched[name].values[0] == value, name
        assert matched[name].dtype == cat[name].dtype, name
    assert np.isnan(matched["teff_catalog"].values[1]) and matched["source_id"].values[1] == -1
    assert matched["mag"].sel(band="gaiadr2-G").values[0] == pytest.approx(14.102)
    assert set(matched.xindexes) == {"band"} and "star" not in matched.variables
    assert matched["parallax"].attrs == {"units": "mas"} and matched.attrs == cat.attrs
    assert list(matched["vega_to_ab"].values) == list(cat["vega_to_ab"].values)


def test_two_fibers_on_one_star_keep_the_higher_snr(red_file, catalog_file):
    """Issue 16 (one star, one vote): fibers 0 and 1 both point at catalog star 55 (fiber 1
    by position); fiber 1 has the higher S/N and is the one kept."""
    variance = np.full((6, 200), 100.0)
    variance[0] *= 4.0  # half the S/N of fiber 1 (~100)
    ds = open_exposure(red_file(variance=variance, fibres={
        "OBJID": np.array([55, -1, 3, 4, 5, 6]),
        "RA": np.array([150.0, 150.0, 151, 152, 153, 154]),
        "DEC": np.array([2.0, 2.0, 3, 4, 5, 6])}))
    rows = [catalog_row(55, 150.0, 2.0)]
    note = (r"E0001: fibers 0 and 1 are the same catalog star \(objid 55, matched by OBJID and "
            r"by position\): kept fiber 1 \(the highest median S/N, S/N 9\d\.\d\)")
    with pytest.warns(FluxCalWarning, match=note):
        matched = match_standards(ds, read_catalog(catalog_file(rows)))
    assert list(matched["fiber"].values) == [1]
    assert list(matched["objid"].values) == [55]


def test_catalog_indexed_once_for_every_exposure(red_file, catalog_file, monkeypatch):
    """Issue 14: a job matches each of its exposures against one catalog; sorting it by
    objid and building the tree of its positions once (not per file) is what keeps a large
    catalog cheap. The look-up goes with the catalog."""
    built = []
    original = catalog_module._CatalogIndex.__init__

    def counting(self, catalog):
        built.append(id(catalog))
        original(self, catalog)

    monkeypatch.setattr(catalog_module._CatalogIndex, "__init__", counting)
    ds = open_exposure(red_file(fibres={"OBJID": np.array([55, -1, 3, 4, 5, 6])}))
    ra1, dec1 = ds["ra"].values[1], ds["dec"].values[1]
    catalog = read_catalog(catalog_file([catalog_row(55, 0.0, 0.0),
                                         catalog_row(77, ra1, dec1 + 1.0 / 3600)]))
    first = match_standards(ds, catalog)
    second = match_standards(ds, catalog)
    assert len(built) == 1
    xr.testing.assert_identical(first, second)
    assert list(second["match"].values) == ["objid", "position"]
    assert second["separation"].values[1] == pytest.approx(1.0, abs=1e-6)
    key = id(catalog)
    del catalog, first, second
    gc.collect()
    assert key not in catalog_module._INDEXES


def test_position_matches_with_and_without_a_tree_agree(monkeypatch):
    """Small catalogs are matched by comparing every pair (no scipy.spatial at start-up),
    large ones with a tree: the same rows and separations either way."""
    rng = np.random.default_rng(4)
    n = 3000
    ra, dec = rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    ra[5], dec[5] = np.nan, np.nan  # unplaced: matched by objid only
    catalog = xr.Dataset({"objid": ("row", np.arange(n)), "ra": ("row", ra),
                          "dec": ("row", dec)})
    q_ra, q_dec = ra[:40] + rng.normal(0, 3e-4, 40), dec[:40] + rng.normal(0, 3e-4, 40)
    q_ra[5], q_dec[5] = 10.0, 20.0
    pairs = catalog_module._CatalogIndex(catalog).nearest(q_ra, q_dec)
    monkeypatch.setattr(catalog_module, "_BRUTE_FORCE_PAIRS", 0)
    index = catalog_module._CatalogIndex(catalog)
    tree = index.nearest(q_ra, q_dec)
    assert index._tree is not None
    np.testing.assert_array_equal(pairs[0], tree[0])
    np.testing.assert_array_equal(pairs[1], tree[1])
    sep = np.delete(pairs[1], 5)
    assert np.all(np.delete(pairs[0], 5) == np.delete(np.arange(40), 5)) and sep.max() < 3.0


def test_a_column_read_twice_is_refused(catalog_file):
    """Two g columns (a merged table): the last was read silently (here: all 99, the g band
    lost); columns the reader ignores may repeat."""
    path = catalog_file([catalog_row(1, 10.0, 20.0, g=16.0), catalog_row(2, 11.0, 20.0, g=16.5)])
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",g,note,note"] + [ln + ",99,a,b" for ln in lines[1:]])
                    + "\n")
    column = CATALOG_HEADER.index("g") + 1
    with pytest.raises(CatalogError, match=re.escape(
            f"catalog.csv: header line: column g appears 2 times (columns {column}, "
            f"{len(CATALOG_HEADER) + 1})")):
        read_catalog(path)
    path.write_text("\n".join([lines[0] + ",note,note"] + [ln + ",a,b" for ln in lines[1:]])
                    + "\n")
    assert list(read_catalog(path)["mag"].sel(band="panstarrs-g").values) == [16.0, 16.5]


def test_rows_named_by_their_line_with_blank_lines_and_a_header_that_is_none(catalog_file):
    """A blank line before the header was 'header line: empty file'; after a blank line
    every row was named one line too early; a comment line or semicolons instead of the
    header listed the two dozen columns it lacked."""
    path = catalog_file([catalog_row(1, 10.0, 20.0, g=16.0), catalog_row(2, 11.0, 20.0, g=16.5),
                         catalog_row(3, 12.0, 20.0, g=16.5)])
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace(",16.5,", ",abc,", 1)  # star 2's g
    path.write_text("\n".join(["", lines[0], lines[1], "", lines[2], lines[3]]) + "\n")
    with pytest.raises(CatalogError, match=r"catalog\.csv: column g row 6: value 'abc' is not "):
        read_catalog(path)
    path.write_text("\n".join(["", lines[0], lines[1], "", lines[2]]) + "\n")
    assert list(read_catalog(path)["objid"].values) == [1, 2]
    for first in ("# Refcat2 extract", lines[0].replace(",", ";")):
        path.write_text("\n".join([first, *lines[1:]]) + "\n")
        with pytest.raises(CatalogError, match=r"catalog\.csv: header line: '.{10}.*' is not a "
                           r"line of comma-separated column names with objid, RA, Dec \(the "
                           r"first non-blank line must be the header: no comment lines, commas "
                           r"between columns\)$"):
            read_catalog(path)
