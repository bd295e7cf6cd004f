import gzip

import numpy as np
from astropy.io import fits

from kspec_fluxcal.fits_bytes import header_text, read_plain

#: Value and commentary cards read from the bytes: odd spacing, D exponents, leading zeros
#: and signs, quotes, slashes and leading blanks in strings, a repeated keyword (its first
#: value is astropy's), commentary and blank cards.
PLAIN_CARDS = (
    "EXPTIME =                1.0E3 / odd but valid spacing",
    "A       = 1.5D-2",
    "B       = -007",
    "C       = +.5/no space before the comment",
    "D       = 'it''s  '  / quoted",
    "E       = ''",
    "F       = T",
    "G       =                    F / no",
    "H       = 'a/b' / a slash in a string",
    "J       = '  lead'",
    "K       = 12345678901234567890",
    "EXTNAME = 'sci'",
    "COMMENT   indented commentary",
    "HISTORY reduced",
    "",
    "I       = 1",
    "I       = 2",
    "",
)
#: Cards astropy reads otherwise (or rewrites when verifying): their files are astropy's.
OTHER_CARDS = {
    "hierarch": "HIERARCH ESO DET CHIP TEMP = 170.5",
    "record-valued": "DP1     = 'AXIS.1: 1'",
    "long string": "LONG    = 'abc&'",
    "continue": "CONTINUE  'def'",
    "lower-case exponent": "L       = 1.0e5",
    "undefined": "M       =",
    "complex": "N       = (1, 2)",
    "lower-case keyword": "lower   = 1",
    "lone quote": "O       = 'a' b'",
    "equal sign early": "Q      = 1",
    "not ASCII": "P       = 'Jos\xe9'",
}


def _primary_file(path, cards, data=None):
    """A file of one primary HDU (float32 (2, 3) data) with ``cards`` (text) added."""
    data = np.arange(6, dtype=">f4").reshape(2, 3) if data is None else data
    structure = [fits.Card("SIMPLE", True).image, fits.Card("BITPIX", -32).image,
                 fits.Card("NAXIS", 2).image, fits.Card("NAXIS1", 3).image,
                 fits.Card("NAXIS2", 2).image]
    header = "".join(c.ljust(80) for c in [*structure, *cards, "END"])
    header += " " * (-len(header) % 2880)
    raw = data.tobytes()
    path.write_bytes(header.encode("latin-1") + raw + bytes(-len(raw) % 2880))
    return path


def test_plain_header_values_and_text_are_astropys(tmp_path):
    """Each value is astropy's (type too), the header's text its tostring, the name its."""
    path = _primary_file(tmp_path / "p.fits", PLAIN_CARDS)
    hdus = read_plain(path)
    with fits.open(path) as hdul:
        header = hdul[0].header
        [hdu] = hdus
        assert hdu.name == hdul[0].name == "sci" and hdu.is_image
        keys = [k for k in header if k not in ("COMMENT", "HISTORY", "")]
        assert list(hdu.header) == list(dict.fromkeys(keys))
        for key in keys:
            assert type(hdu.header[key]) is type(header[key]), key
            assert hdu.header[key] == header[key], key
        for sep in ("", "\n"):
            assert hdu.header.tostring(sep=sep) == header.tostring(sep=sep)
        assert hdu.data.dtype == hdul[0].data.dtype and hdu.data.flags.writeable
        assert hdu.data.tobytes() == hdul[0].data.tobytes()


def test_other_cards_are_left_to_astropy(tmp_path):
    """A card outside the plain forms makes the file astropy's to read."""
    assert read_plain(_primary_file(tmp_path / "p.fits", ["A       = 1"])) is not None
    for name, card in OTHER_CARDS.items():
        path = _primary_file(tmp_path / "p.fits", ["A       = 1", card])
        assert read_plain(path) is None, name


def test_header_text_is_read_as_astropy_reads_it(tmp_path):
    """A Dataset's ``fits_header`` (astropy's tostring with newlines) gives astropy's values;
    another form, or another card, is astropy's to read."""
    with fits.open(_primary_file(tmp_path / "p.fits", PLAIN_CARDS)) as hdul:
        text = hdul[0].header.tostring(sep="\n")
    header, theirs = header_text(text), fits.Header.fromstring(text, sep="\n")
    assert header.tostring(sep="\n") == text
    for key in header:
        assert type(header[key]) is type(theirs[key]) and header[key] == theirs[key], key
    assert header_text(text.replace("\n", "")) is None  # not separated by newlines
    assert header_text(text.rstrip()) is None and header_text("") is None  # no END
    for name, card in OTHER_CARDS.items():
        assert header_text(text.replace("F       = T".ljust(80), card.ljust(80))) is None, name


def _file(path, tables=True, **changes):
    """A RED-like file: primary float32 image, an int16 image, a 1-D float64 WAVELA and a
    FIBRES binary table; ``changes`` replace HDUs by position (None drops one)."""
    hdus = [fits.PrimaryHDU(np.arange(12, dtype=np.float32).reshape(3, 4)),
            fits.ImageHDU(np.arange(12, dtype=np.int16).reshape(3, 4), name="variance"),
            fits.ImageHDU(np.linspace(4000.0, 5000.0, 4), name="WAVELA"),
            fits.BinTableHDU.from_columns([fits.Column("NAME", "5A", array=["a", "b", "c"]),
                                           fits.Column("RA", "D", unit="deg",
                                                       array=[1.0, 2.0, 3.0])],
                                          name="FIBRES")]
    for k, hdu in changes.items():
        hdus[int(k[1:])] = hdu
    fits.HDUList([h for h in hdus if h is not None]).writeto(path, overwrite=True)
    return path


def test_plain_file_is_what_astropy_reads(tmp_path):
    """Names, kinds, data (dtype, shape, bytes) and tables of a plain file are astropy's."""
    path = _file(tmp_path / "f.fits")
    hdus = read_plain(path, ("FIBRES",))
    with fits.open(path) as hdul:
        assert [h.name for h in hdus] == [h.name for h in hdul]
        assert [h.is_image for h in hdus] == [h.is_image for h in hdul]
        for ours, theirs in zip(hdus[:3], hdul[:3], strict=True):
            assert ours.data.dtype == theirs.data.dtype
            assert ours.data.shape == theirs.data.shape
            assert ours.data.tobytes() == theirs.data.tobytes()
            assert ours.header.tostring(sep="\n") == theirs.header.tostring(sep="\n")
        nrows, columns = hdus[3].table
        assert nrows == 3 and list(columns) == ["NAME", "RA"]
        assert columns["RA"][1] == "deg" and columns["NAME"][1] is None
        assert list(columns["NAME"][0]) == list(hdul[3].data["NAME"])
        assert columns["RA"][0].tobytes() == hdul[3].data["RA"].tobytes()


def test_unusual_files_are_left_to_astropy(tmp_path):
    """Compressed, cut, padded-out or scaled files, a table not among ``tables`` or an
    image among them, an ASCII table: astropy's to read, or refuse."""
    plain = _file(tmp_path / "f.fits").read_bytes()
    cases = {"gzip": gzip.compress(plain), "cut": plain[:-2880],
             "trailing": plain + plain[-2880:], "not FITS": b"x" * 2880}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        assert read_plain(tmp_path / name, ("FIBRES",)) is None, name
    assert read_plain(tmp_path / "f.fits", ()) is None  # FIBRES is not a table read here
    scaled = fits.ImageHDU(np.arange(4, dtype=np.uint16), name="VARIANCE")  # BZERO 32768
    ascii_table = fits.TableHDU.from_columns([fits.Column("NAME", "A5", array=["a"] * 3)],
                                             name="FIBRES")
    for name, change in {"scaled": {"h1": scaled}, "ascii table": {"h3": ascii_table},
                         "image named FIBRES": {"h3": fits.ImageHDU(np.zeros(3), name="FIBRES")},
                         }.items():
        assert read_plain(_file(tmp_path / "g.fits", **change), ("FIBRES",)) is None, name
    real = _primary_file(tmp_path / "real.fits", ()).read_bytes()
    (tmp_path / "real.fits").write_bytes(real.replace(b"BITPIX  =                  -32",
                                                      b"BITPIX  =                -32.0"))
    assert read_plain(tmp_path / "real.fits") is None  # a structure keyword not an integer
    assert read_plain(tmp_path / "missing.fits") is None
    assert read_plain(tmp_path) is None  # a directory


def test_bytes_read_once_are_read_as_the_file(tmp_path):
    """``read_bytes`` gives a regular file's bytes (writable), None for anything else;
    ``read_plain`` of them is the file's reading, without reading it again."""
    import os

    from kspec_fluxcal.fits_bytes import read_bytes

    path = _file(tmp_path / "f.fits")
    content = read_bytes(path)
    assert type(content) is bytearray and content == path.read_bytes()
    from_bytes = read_plain(tmp_path / "gone.fits", ("FIBRES",), content)  # not opened
    for ours, theirs in zip(from_bytes, read_plain(path, ("FIBRES",)), strict=True):
        assert ours.name == theirs.name and ours.header == theirs.header
        assert (ours.data is None) == (theirs.data is None)
        if ours.data is not None:
            assert ours.data.flags.writeable and ours.data.tobytes() == theirs.data.tobytes()
    assert read_plain(path, ("FIBRES",), bytearray(b"x" * 2880)) is None  # not FITS
    os.mkfifo(tmp_path / "fifo")
    for other in (tmp_path, tmp_path / "missing.fits", tmp_path / "fifo"):
        assert read_bytes(other) is None


def test_kept_extensions_are_the_files_while_it_is_unchanged(tmp_path):
    """The extensions kept from a plain file's reading are the walk's of the file, bytes
    and names (a lower-case EXTNAME, a table), as long as the file is unchanged: rewritten
    (same size), replaced or removed, it is read again; bytes given by the caller or another
    file's reading are not kept."""
    import os

    from kspec_fluxcal.fits_bytes import keep_extensions, kept_extensions, read_bytes
    from kspec_fluxcal.fits_file import _walk, extensions_raw

    path = _file(tmp_path / "f.fits")
    keep_extensions(path, read_plain(path, ("FIBRES",)))
    kept = extensions_raw(path, skip=("variance",))
    assert [(name, hdu if hdu is None else bytes(hdu)) for name, hdu in kept] == \
        _walk(path, skip=("VARIANCE",))
    assert [name for name, _ in kept] == ["VARIANCE", "WAVELA", "FIBRES"]
    assert kept[1][1].readonly and kept_extensions(tmp_path / "g.fits") is None
    # Rewritten in place with other data, the same size: read from the file again.
    raw = path.read_bytes().replace(np.linspace(4000.0, 5000.0, 4).astype(">f8").tobytes(),
                                    np.linspace(4000.0, 6000.0, 4).astype(">f8").tobytes())
    stat = os.stat(path)
    path.write_bytes(raw)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its time put back
    assert kept_extensions(path) is None
    assert bytes(extensions_raw(path)[1][1]) == _walk(path)[1][1]
    assert np.linspace(4000.0, 6000.0, 4).astype(">f8").tobytes() in extensions_raw(path)[1][1]
    keep_extensions(path, read_plain(path, ("FIBRES",), read_bytes(path)))  # caller's bytes
    assert kept_extensions(path) is None
    keep_extensions(path, read_plain(path, ("FIBRES",)))
    assert kept_extensions(path) is not None
    os.replace(_file(tmp_path / "h.fits"), path)
    assert kept_extensions(path) is None
    keep_extensions(path, read_plain(path, ("FIBRES",)))
    os.remove(path)
    assert kept_extensions(path) is None and extensions_raw(path) is None
