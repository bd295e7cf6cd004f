"""FITS files read for the formats contract: opening a file whole and complete, finding an
extension by name, reading its data and header keywords, with every failure an
:class:`~kspec_fluxcal.errors.ExposureError` naming the file, the HDU or the keyword; and
written: binary-table columns made from NumPy arrays, extensions rendered as FITS bytes."""

from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import io
import os
import re
import warnings

import numpy as np

from ._astropy import fits, loaded_fits, verify_error
from ._atomic import check_regular_file
from .errors import ExposureError, FluxCalWarning
from .fits_bytes import BLOCK, END_CARD, PlainHDU, kept_extensions, plain_table
from .fits_cards import IMAGE_KEYWORDS, card_image

__all__ = ["open_fits", "find_hdu", "hdu_data", "table_columns", "header_value",
           "check_header_cards", "check_non_ascii", "READ_KEYWORDS", "cards_named",
           "fits_column", "column_format", "card_image", "table_bytes", "table_hdu",
           "image_bytes", "image_header", "image_data_bytes", "primary_bytes", "extension_bytes",
           "extension_header", "extension_raw", "extensions_raw"]

#: Big-endian NumPy types of the binary-table formats written (A: bytes of its width).
_FIELD_TYPES = {"L": "S1", "I": ">i2", "K": ">i8", "D": ">f8"}
_BITPIX = {"f4": -32, "f8": -64}


def open_fits(path, notes=True):
    """Open a FITS file whole (no memory map, every HDU read), checked complete; a file
    that is missing, not FITS or cut short is an :class:`ExposureError`.

    A header byte beyond ASCII (which astropy reads as '?') is refused where the readers
    use it, and noted (a :class:`~kspec_fluxcal.errors.FluxCalWarning`, with ``notes``)
    where they do not: see :func:`check_non_ascii`.
    """
    check_regular_file(path, ExposureError)
    from astropy.utils.exceptions import AstropyUserWarning

    try:
        # Astropy's truncation warnings are replaced by the check below, which is an error;
        # its note that header bytes beyond ASCII were read as '?' is kept to say which.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", AstropyUserWarning)
            warnings.filterwarnings("always", _NON_ASCII_NOTE, AstropyUserWarning)
            hdul = fits().open(path, memmap=False, lazy_load_hdus=False)
        _pass_on(caught)
    except FileNotFoundError:
        raise ExposureError(path, None, "no such file") from None
    except Exception as err:  # astropy raises OSError, ValueError, TypeError... on garbage
        if "SIMPLE" in str(err):  # its advice (ignore_missing_simple=True) is not for users
            raise ExposureError(path, None, "not a FITS file (it does not start with "
                                "SIMPLE = T)") from None
        raise ExposureError(path, None, f"not a readable FITS file ({err})") from None
    try:
        _check_complete(hdul, path)
        if any(_NON_ASCII_NOTE in str(w.message) for w in caught):
            check_non_ascii(hdul, path, notes)
    except ExposureError:
        hdul.close()
        raise
    return hdul


#: The start of astropy's warning that header bytes beyond ASCII were read as '?'.
_NON_ASCII_NOTE = "non-ASCII characters are present"


def _pass_on(caught):
    """Warn again the warnings recorded while opening a file but astropy's non-ASCII note
    (recording them took them from the caller's filters)."""
    for w in caught:
        if _NON_ASCII_NOTE not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _check_complete(hdul, path):
    """A file cut short (an interrupted copy) must not pass for a smaller valid one.

    Astropy reads what it can: a file cut inside an extension's header silently loses that
    extension, and one cut inside the data only fails when the data are read. The file size
    must be where the last HDU's data (padded to 2880 bytes) end.
    """
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"PK":
        return  # zip: astropy reads its first member, whatever else the archive holds
    # The HDU's own fileinfo: the list's first checks every header for a resize (formats
    # them all: ~0.5 ms of a file's ~4 ms of opening), which a file just read has not had.
    info = hdul[-1].fileinfo()
    end = info["datLoc"] + info["datSpan"]
    opener = _DECOMPRESSORS.get(magic)
    size = os.path.getsize(path) if opener is None else _stream_size(opener, path)
    if size < end:
        raise ExposureError(path, None, f"truncated: {size} bytes, but its HDUs need {end} "
                            "(an interrupted copy or write?)")
    if size > end:
        raise ExposureError(path, f"after HDU {hdul[-1].name or len(hdul) - 1}",
                            f"{size - end} bytes that are no complete HDU: a truncated or "
                            "damaged extension")


#: Compressed files astropy opens, by their first two bytes.
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZ": bz2.open}


def _stream_size(opener, path):
    """Bytes of the decompressed stream of ``path``. A stream cut short is an error: astropy
    reads such a file without a word, as far as it goes (a .fits.gz cut inside VARIANCE
    read as a file without VARIANCE, WAVELA nor FIBRES)."""
    size = 0
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
    except (EOFError, OSError, ValueError) as err:  # cut short; damaged data
        raise ExposureError(path, None, f"truncated or damaged compressed file ({err}; an "
                            "interrupted copy or write?)") from None
    return size


def find_hdu(hdul, path, names, required=True):
    """The extension named one of ``names`` (None when absent and not ``required``); two
    such extensions are an error, since which one was meant cannot be told."""
    found = [k for k, hdu in enumerate(hdul) if k and hdu.name.upper() in names]
    if len(found) > 1:
        # Which one kspecdr meant cannot be told; the first would be used silently.
        which = " and ".join(str(k) for k in found)
        kinds = sorted({hdul[k].name.upper() for k in found})
        listed = f": {', '.join(kinds)}" if len(kinds) > 1 else ""
        raise ExposureError(path, f"HDU {names[0]}", f"{len(found)} extensions have this name "
                            f"(HDUs {which}{listed}); expected one")
    if found:
        return hdul[found[0]]
    if required:
        present = ", ".join(h.name or "(unnamed)" for h in hdul[1:]) or "none"
        raise ExposureError(path, f"HDU {names[0]}", f"missing (extensions present: {present})")
    return None


def hdu_data(hdu, path, label):
    """The data of ``hdu``; none, or unreadable (a truncated file), is an error naming
    the HDU ``label``."""
    try:
        data = hdu.data
    except Exception as err:  # a truncated file fails here, not at open
        check_header_cards(hdu, path, label)  # or a damaged card (a TTYPE not ASCII)
        raise ExposureError(path, f"HDU {label}",
                            f"data unreadable ({err}); truncated file?") from None
    if data is None:
        raise ExposureError(path, f"HDU {label}", "has no data")
    return data


def table_columns(hdu, path, label):
    """The binary table ``hdu`` of the file ``path`` as astropy reads it (:func:`hdu_data`,
    ``hdu.columns``): (rows, {name: (values, unit or None)} in the table's order).

    A plain table (:func:`~kspec_fluxcal.fits_bytes.plain_table`, in an uncompressed file)
    is read from its bytes (a :class:`~kspec_fluxcal.fits_bytes.PlainHDU`'s was when the file
    was): astropy's Column objects and record array were ~2 ms of the ~10 of reading a RED
    file (its FIBRES). Any other (or a card astropy cannot parse) is astropy's to read, with
    its results and errors."""
    if isinstance(hdu, PlainHDU):
        return hdu.table
    with contextlib.suppress(verify_error(), ValueError):  # a damaged card: astropy names it
        if isinstance(hdu, fits().BinTableHDU) and (plain := plain_table(
                hdu.header, lambda size: _data_of(hdu, path, size))) is not None:
            return plain
    data = hdu_data(hdu, path, label)
    return len(data), {col.name: (np.asarray(data[col.name]), col.unit) for col in hdu.columns}


def _data_of(hdu, path, size):
    """The first ``size`` bytes of the data of ``hdu`` of ``path`` (None: compressed, cut)."""
    with open(path, "rb") as f:
        if f.read(2) != b"SI":  # not the plain FITS that starts with SIMPLE
            return None
        f.seek(hdu.fileinfo()["datLoc"])
        raw = f.read(size)
    return raw if len(raw) == size else None


def header_value(header, keys, path, required, kind=float):
    """The value of the first of ``keys`` present in ``header``, as ``kind`` (a float must
    be finite); None when absent and not ``required``."""
    for key in keys:
        if key in header and (value := _card_value(header, key, path)) not in (None, ""):
            # FITS logicals are Python bools, which float() would silently turn into 0 or 1.
            try:
                if isinstance(value, bool):
                    raise TypeError
                value = kind(value)
            except (TypeError, ValueError):
                raise ExposureError(path, f"primary header {key}",
                                    f"value {header[key]!r} is not a {kind.__name__}") from None
            if kind is float and not np.isfinite(value):
                raise ExposureError(path, f"primary header {key}", f"value {value!r} is not finite")
            return value
    if required:
        raise ExposureError(path, "primary header",
                            f"missing {' (or '.join(keys)}{')' * (len(keys) - 1)}")
    return None


def _card_value(header, key, path):
    """``header[key]``; a card astropy cannot parse is an error naming it."""
    try:
        return header[key]
    except (verify_error(), ValueError):  # its advice is .verify('fix'); the card's says why
        try:
            header.cards[key].verify("exception")
            problem = "unparsable card"
        except (verify_error(), ValueError) as err:
            problem = _card_problem(err)
        raise ExposureError(path, f"primary header {key}", problem) from None


def _card_problem(err):
    """Astropy's verification message as one line (without its frame and indexing note)."""
    lines = [s.strip() for s in str(err).splitlines()]
    return "; ".join(s for s in lines if s and not s.startswith(
        ("Verification reported errors", "Note: astropy"))) or type(err).__name__


#: Keywords whose values the readers use (any HDU's): a byte beyond ASCII there, which
#: astropy reads as '?', is refused (an EXPID 'KS?001' names the products and archive rows,
#: an EXTNAME 'FIBR?S' hides the table). Elsewhere in a string value, in a comment or
#: commentary text it is noted and kept as '?': the product's headers must be ASCII.
READ_KEYWORDS = re.compile(
    r"(SIMPLE|XTENSION|EXTEND|EXTNAME|BITPIX|NAXIS\d*|PCOUNT|GCOUNT|BSCALE|BZERO|BLANK|"
    r"T(TYPE|FORM|UNIT|DIM|NULL|SCAL|ZERO|FIELDS)\d*|EXPID|BUNIT|AIRORVAC|CUNIT1|CTYPE1|"
    r"CRVAL1|CDELT1|CD1_1|CRPIX1|EXPTIME|EXPOSED|MJD-OBS|UTMJD|AIRMASS|SEEING|SPECFWHM|"
    r"FWHMPC\d+|FLUXCAL|FCAL\w*)")


def check_non_ascii(hdul, path, notes=True):
    """Refuse a header byte beyond ASCII in a keyword, or in the value of a keyword the
    readers use (:data:`READ_KEYWORDS`) or of a number; warn (with ``notes``) about the
    others, which are kept as astropy reads them, with '?' for each such byte.

    Astropy reads such a byte as '?' (and warns, which :func:`open_fits` notices: the raw
    headers are read again only then). FITS headers are ASCII; kspecdr or an observer's
    name in Latin-1 ('Jos\xe9') puts other bytes there.
    """
    kept = []
    for k, raw in enumerate(_raw_headers(path)):
        label = hdul[k].name if k < len(hdul) and hdul[k].name else str(k)
        keyword = ""
        for number, start in enumerate(range(0, len(raw), 80), start=1):
            card = raw[start:start + 80]
            if card[:8] != b"CONTINUE":  # a long string's next card belongs to its keyword
                keyword = card[:8].decode("latin-1").strip() or "(blank)"
            if max(card, default=0) < 128:
                continue
            text = card.decode("latin-1")
            column = next(i for i, b in enumerate(card) if b >= 128)
            byte = f"byte 0x{card[column]:02X} ({text[column]!r} in Latin-1)"
            part = _card_part(text, column)
            where = f"HDU {label} header card {number} ({keyword})"
            if part == "keyword" or part == "value" and (
                    READ_KEYWORDS.fullmatch(keyword) or text[10:].lstrip()[:1] != "'"):
                raise ExposureError(path, where, f"{byte} in its {part} is not ASCII (FITS "
                                    "headers are ASCII; astropy reads it as '?': "
                                    f"{text.encode('ascii', 'replace').decode().strip()!r})")
            kept.append(f"{where} {part}: {text.strip()!r}")
    if kept and notes:
        warnings.warn(f"{path}: header bytes beyond ASCII (FITS headers are ASCII), kept as "
                      f"'?' (shown here in Latin-1): {'; '.join(kept)}", FluxCalWarning,
                      stacklevel=3)


def _card_part(text, column):
    """Which part of the card image ``text`` its ``column`` is in: 'keyword', 'value',
    'comment' or (a commentary card's, or a card without a value) 'text'."""
    if column < 8:
        return "keyword"
    if text[8:10] != "= " and not text.startswith("CONTINUE"):
        return "text"
    start = 8 if text.startswith("CONTINUE") else 10
    # A string runs to its closing quote (quotes inside are doubled); a number to any '/'.
    value = re.match(r"\s*('(?:[^']|'')*'?|[^/]*)", text[start:])
    return "value" if column < start + value.end() else "comment"


def _raw_headers(path):
    """The header bytes of every HDU of ``path`` (plain, gzip or bzip2), as in the file."""
    with open(path, "rb") as raw:
        opener = _DECOMPRESSORS.get(raw.read(2), open)
    headers = []
    with opener(path, "rb") as f:
        while (header := _raw_header(f)) is not None:
            headers.append(header)
            size = _raw_data_size(_raw_keys(header))
            if size is None:
                break
            f.seek(size, os.SEEK_CUR)
    return headers


def check_header_cards(hdu, path, label):
    """Refuse a header with a card that is not FITS (a keyword or value with bytes that are
    not printable ASCII, an unparsable value), naming the card (numbered from 1). Astropy
    reads such a header, and fails when its values are used or the header written (the
    product's primary, after the whole calibration)."""
    for number, card in enumerate(hdu.header.cards, start=1):
        try:
            card.verify("exception")
        except (verify_error(), ValueError) as err:
            keyword = card.image[:8].strip() or "(blank)"
            raise ExposureError(path, f"HDU {label} header card {number} ({keyword})",
                                _card_problem(err)) from None


@contextlib.contextmanager
def cards_named(hdul, path):
    """Within it, an unparsable header card met reading a keyword of any HDU of ``hdul``
    (astropy's VerifyError, which names no file and advises ``.verify('fix')``) is refused
    by :func:`check_header_cards`, naming the HDU, card and keyword; the headers are
    checked only then (15-25 us a card)."""
    try:
        yield
    except verify_error():
        for k, hdu in enumerate(hdul):
            check_header_cards(hdu, path, hdu.name or str(k))
        raise


def column_format(values):
    """The binary-table format of ``values`` (strings, logicals, 64-bit integers or
    doubles) and the values as that format holds them."""
    kind = values.dtype.kind
    if kind in "SUO":
        values = values.astype(str)
        return f"{max(1, int(np.char.str_len(values).max(initial=1)))}A", values
    if kind == "b":
        return "L", values
    if kind in "iu":
        return "K", np.asarray(values, dtype=np.int64)
    return "D", np.asarray(values, dtype=np.float64)


def fits_column(name, values, unit=None):
    """A binary-table column of ``values`` (see :func:`column_format`)."""
    fmt, values = column_format(values)
    return fits().Column(name=name, format=fmt, array=values, unit=unit)


def _extname(name):
    """The EXTNAME card as astropy's ``hdu.name = name`` makes it (in upper case, unless its
    configuration says otherwise: asked only for a name that is not, not to import it)."""
    if name != name.upper() and not fits().conf.extension_name_case_sensitive:
        name = name.upper()
    return card_image("EXTNAME", name, "extension name")


def _hdu_bytes(cards, data):
    """An HDU in FITS bytes: the header of ``cards``, then the data (:func:`_data_bytes`)."""
    return _data_bytes(data, _header_bytes(cards))


def _header_bytes(cards):
    """A header in FITS bytes: the ``cards``, END, blanks to the end of the record."""
    header = "".join(cards) + END_CARD
    return (header + " " * (-len(header) % BLOCK)).encode("ascii")


def _data_bytes(data, header=b""):
    """Big-endian ``data`` in FITS bytes, padded with zeros, after the bytes ``header`` (one
    copy of the data: a product's are ~2 MB)."""
    data = np.ascontiguousarray(data)
    return b"".join((header, memoryview(data).cast("B"), bytes(-data.nbytes % BLOCK)))


def table_bytes(columns, name, cards=()):
    """A binary-table extension in FITS bytes, as astropy writes the same table
    (:func:`table_hdu`; the tests compare them byte for byte), without its ~100 us per
    column of Column objects, header updates and verification.

    Parameters
    ----------
    columns : sequence of (str, str, numpy.ndarray, str or None)
        Each column's name, format (a repeat count, then A, L, I, K or D; A's count is the
        width), values (one per row, a row of ``repeat`` for a vector; str for A) and unit.
    name : str
        EXTNAME.
    cards : sequence of str
        Further header cards (:func:`card_image`), keywords before commentary cards
        (astropy puts a keyword added after COMMENT or HISTORY before them).

    Returns
    -------
    bytes
    """
    nrows = len(columns[0][2]) if columns else 0
    header, dtype = _table_layout(tuple((label, fmt, unit) for label, fmt, _, unit in columns),
                                  nrows, _extname(name), tuple(cards))
    data = np.empty(nrows, dtype=dtype)
    for field, (_, fmt, values, _) in zip(dtype.names or (), columns, strict=True):
        data[field] = _field_values(fmt[-1], np.asarray(values))
    return _data_bytes(data, header)


@functools.lru_cache(maxsize=64)
def _table_layout(specs, nrows, extname, cards):
    """The header (FITS bytes) and record type of the binary table of :func:`table_bytes`
    with columns ``specs`` (name, format, unit), ``nrows`` rows, the EXTNAME card ``extname``
    and further ``cards``: the same for every exposure's FCALSTAR table (its ~160 cards were
    ~0.3 ms of the ~0.8 of making it), made once."""
    fields, column_cards = [], []
    for k, (label, fmt, unit) in enumerate(specs, 1):
        count, code = fmt[:-1], fmt[-1]
        fields.append((f"f{k}", f"S{count}") if code == "A" else
                      (f"f{k}", _FIELD_TYPES[code], (int(count),) if count else ()))
        column_cards += [card_image(f"TTYPE{k}", label), card_image(f"TFORM{k}", fmt)]
        if unit not in (None, ""):  # as astropy: no TUNIT for an empty unit
            column_cards.append(card_image(f"TUNIT{k}", unit))
    dtype = np.dtype(fields)
    header = [card_image("XTENSION", "BINTABLE", "binary table extension"),
              card_image("BITPIX", 8, "array data type"),
              card_image("NAXIS", 2, "number of array dimensions"),
              card_image("NAXIS1", dtype.itemsize, "length of dimension 1"),
              card_image("NAXIS2", nrows, "length of dimension 2"),
              card_image("PCOUNT", 0, "number of group parameters"),
              card_image("GCOUNT", 1, "number of groups"),
              card_image("TFIELDS", len(specs), "number of table fields"),
              *column_cards, extname, *cards]
    return _header_bytes(header), dtype


def _field_values(code, values):
    """A column's ``values`` as its binary-table format ``code`` holds them (text by str
    methods where it can: NumPy's string functions took ~35 us a column of 3 rows)."""
    if code == "A" and values.dtype.kind == "U" and values.ndim == 1:
        return np.array([(text.rstrip(" ") or text[:1]).encode("latin-1", "replace")
                         for text in values.tolist()], dtype=np.bytes_)
    if code == "A":
        # astropy writes the blanks ending a string as NULs, all but a first character
        stripped = np.char.rstrip(values, " ")
        values = np.where((stripped == "") & (np.char.str_len(values) > 0), " ", stripped)
        if values.dtype.kind == "U":  # text read as Latin-1 goes back as it was read
            values = np.char.encode(values, "latin-1", "replace")
    elif code == "L":
        values = np.where(values, b"T", b"F")
    return values


def table_hdu(columns, name, cards=()):
    """The table of :func:`table_bytes` (same arguments) made by astropy, as a
    ``fits.BinTableHDU``."""
    module = fits()
    hdu = module.BinTableHDU.from_columns([module.Column(label, fmt, unit=unit, array=values)
                                           for label, fmt, values, unit in columns], name=name)
    # Parsed as a header: a long text's image is several cards.
    for card in module.Header.fromstring("".join(cards)).cards:
        hdu.header.append(card)
    return hdu


def image_bytes(data, name, cards=()):
    """An image extension of floats (32 or 64 bits) in FITS bytes, as astropy writes
    ``fits.ImageHDU(data, name=name)`` with ``cards`` (:func:`card_image`, as in
    :func:`table_bytes`) added."""
    data = np.asarray(data)
    header = [*_image_cards(data.dtype, data.shape), _extname(name), *cards]
    return _hdu_bytes(header, data.astype(data.dtype.newbyteorder(">"), copy=False))


def image_header(dtype, shape, cards):
    """The header of an image extension of floats (32 or 64 bits) of ``dtype`` and ``shape``
    in FITS bytes (padded), as astropy writes it: its structure's cards, then ``cards``
    (:func:`card_image`; EXTNAME among them where astropy has it: see
    :func:`~kspec_fluxcal.fits_cards.edited_cards`)."""
    return _header_bytes([*_image_cards(np.dtype(dtype), shape), *cards])


def _image_cards(dtype, shape):
    """The structural cards (XTENSION to GCOUNT) of an image extension of floats."""
    return [card_image("XTENSION", "IMAGE", "Image extension"),
            card_image("BITPIX", _BITPIX[f"{dtype.kind}{dtype.itemsize}"], "array data type"),
            card_image("NAXIS", len(shape), "number of array dimensions"),
            *(card_image(f"NAXIS{k}", n) for k, n in enumerate(reversed(shape), 1)),
            card_image("PCOUNT", 0, "number of parameters"),
            card_image("GCOUNT", 1, "number of groups")]


def primary_bytes(data, header):
    """A primary HDU of a float image (32 or 64 bits) in FITS bytes, as astropy writes
    ``fits.PrimaryHDU(data, header)`` with EXTEND = T, verified (``output_verify=
    'exception'``: astropy's VerifyError for a card that is not FITS; the tests compare them
    byte for byte).

    The ``header``'s cards are verified and rendered by astropy as its writer does (a card
    read from a file and left unchanged is its image as read), the structural ones made
    once (:func:`card_image`): the HDU object, its copy of the header, its updates and the
    HDU's verification were ~2.5 ms of a product's ~10. A keyword astropy acts on
    (:data:`IMAGE_KEYWORDS`), a card that does not verify or other data are left to
    astropy's writer, with its own result or refusal. ``header`` may also be the images of
    cards verified without a keyword astropy acts on
    (:func:`~kspec_fluxcal.fits_cards.edited_cards`), for float data.
    """
    data = np.asarray(data)
    bitpix = _BITPIX.get(f"{data.dtype.kind}{data.dtype.itemsize}")
    if (module := loaded_fits()) is not None and isinstance(header, module.Header):
        if bitpix is None or any(IMAGE_KEYWORDS.fullmatch(key) for key in header.keys()):
            return _astropy_primary(data, header)
        try:
            for card in header.cards:
                card.verify("exception")
        except (verify_error(), ValueError):
            return _astropy_primary(data, header)
        header = [card.image for card in header.cards]
    cards = [card_image("SIMPLE", True, "conforms to FITS standard"),
             card_image("BITPIX", bitpix, "array data type"),
             card_image("NAXIS", data.ndim, "number of array dimensions"),
             *(card_image(f"NAXIS{k}", n) for k, n in enumerate(reversed(data.shape), 1)),
             card_image("EXTEND", True, "FITS dataset may contain extensions"), *header]
    return _hdu_bytes(cards, data.astype(data.dtype.newbyteorder(">"), copy=False))


def _astropy_primary(data, header):
    """:func:`primary_bytes` by astropy's writer."""
    module = fits()
    primary = module.PrimaryHDU(data, header=header)
    primary.header.set("EXTEND", True, "FITS dataset may contain extensions",
                       after=f"NAXIS{primary.header['NAXIS']}")
    buffer = io.BytesIO()
    module.HDUList([primary]).writeto(buffer, output_verify="exception")
    return buffer.getvalue()


def image_data_bytes(data):
    """The data of an image of floats (32 or 64 bits) in FITS bytes, as astropy writes them
    after the header (:func:`image_bytes`): big-endian, padded with zeros."""
    data = np.asarray(data)
    return _data_bytes(data.astype(data.dtype.newbyteorder(">"), copy=False))


def extension_bytes(hdu):
    """An astropy extension HDU in FITS bytes, as astropy writes it (verified)."""
    buffer = io.BytesIO()
    module = fits()
    module.HDUList([module.PrimaryHDU(), hdu]).writeto(buffer, output_verify="exception")
    # The empty primary HDU before it is one record: SIMPLE, BITPIX, NAXIS, EXTEND, END.
    return buffer.getvalue()[BLOCK:]


def extension_header(hdu):
    """The header of an astropy extension HDU (image or table) in FITS bytes, padded, as
    astropy writes it (verified): :func:`extension_bytes` without the data."""
    raw = extension_bytes(hdu)
    return raw[:len(raw) - hdu.size - (-hdu.size % BLOCK)]


def extension_raw(path, name):
    """The first extension named ``name`` of a FITS file as its own bytes (header and data,
    padded), found by walking the headers only and copied verbatim; None when the file has
    none or is not a FITS file. Carrying a table through a rewrite this way costs < 1 ms
    instead of astropy's ~15 ms (open every HDU, read, re-serialise)."""
    found = _walk(path, name)
    return found[0][1] if found else None


def extensions_raw(path, skip=()):
    """Every extension of a FITS file (gzip-compressed or not), in order, as (EXTNAME in
    upper case, '' without one; its bytes, verbatim, or None for the names in ``skip``,
    not read); None when the file cannot be walked (missing, not FITS, cut short). The
    bytes are a read-only view of the file's kept when it was read and is unchanged
    (:func:`~kspec_fluxcal.fits_bytes.kept_extensions`: a plain RED file opened)."""
    skip = tuple(n.upper() for n in skip)
    kept = kept_extensions(path)
    if kept is not None:  # named as by the walk (a plain header's bytes are ASCII)
        return [(name, None if name in skip else hdu) for name, hdu in
                ((_raw_keys(bytes(cards)).get("EXTNAME", "").upper(), hdu) for cards, hdu in kept)]
    try:
        return _walk(path, skip=skip)
    except OSError:  # unreadable, or a damaged gzip stream
        return None


def _walk(path, name=None, skip=()):
    """(EXTNAME, bytes) of the extensions of ``path`` (only the first named ``name`` when
    given, the others skipped unread; bytes None for the names in ``skip``); None when a
    header or data record is cut short."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    found = []
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        first = True
        while True:
            header = _raw_header(f)
            if header is None:
                return found if found or name is None else None
            keys = _raw_keys(header)
            size = _raw_data_size(keys)
            if size is None:
                return None
            extname = keys.get("EXTNAME", "").upper()
            if first or (name is not None and extname != name.upper()) or extname in skip:
                if not first and extname in skip:
                    found.append((extname, None))
                first = False
                f.seek(size, os.SEEK_CUR)
                continue
            data = f.read(size)
            if len(data) != size:
                return None
            # Bytes beyond ASCII in a header were refused or noted when it was read (in
            # the product as astropy read them: '?'); a table's text is carried verbatim.
            found.append((extname, header.translate(_ASCII_ONLY) + data))
            if name is not None:
                return found


#: bytes.translate table: a byte beyond ASCII becomes '?', as astropy reads it in a header.
_ASCII_ONLY = bytes(range(128)) + b"?" * 128


def _raw_header(f):
    """A header's records up to and including the one with END; None at the end."""
    blocks = []
    while True:
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            return None
        blocks.append(block)
        if _has_end(block):
            return b"".join(blocks)


def _has_end(block):
    """Whether a header record has the END card (a card of END and blanks): only the
    places where END is found are looked at, not each of its 36 cards (their slices and
    strips took ~10 us a record)."""
    at = block.find(b"END")
    while at >= 0:
        if at % 80 == 0 and block[at:at + 80].rstrip() == b"END":
            return True
        at = block.find(b"END", at + 1)
    return False


#: The keywords an HDU's walk reads (:func:`_raw_data_size`, its EXTNAME; NAXISn too).
_WALK_KEYWORDS = (b"NAXIS", b"BITPIX  ", b"PCOUNT  ", b"GCOUNT  ", b"EXTNAME ")


def _raw_keys(header):
    """Keyword -> value text (comments dropped) of a header's value cards that give its
    data's size or its name (:data:`_WALK_KEYWORDS`): the others are not decoded (a lake
    file's headers have ~36 cards each: ~0.07 ms of a product's input walked)."""
    keys = {}
    for i in range(0, len(header), 80):
        if not header.startswith(_WALK_KEYWORDS, i):
            continue
        card = header[i:i + 80].decode("ascii", "replace")
        if card[8:10] == "= ":
            value = card[10:].strip()
            # A string runs to its closing quote (doubled quotes inside); a number to any /.
            value = value[1:].replace("''", "\0").split("'")[0].replace("\0", "'") \
                if value.startswith("'") else value.split("/")[0]
            keys.setdefault(card[:8].strip(), value.strip())
    return keys


def _raw_data_size(keys):
    """Bytes of an HDU's data, padded to the record (None when its keywords are unreadable)."""
    try:
        naxis = int(keys.get("NAXIS", "0"))
        bits = abs(int(keys["BITPIX"]))
        count = int(np.prod([int(keys[f"NAXIS{k}"]) for k in range(1, naxis + 1)])) if naxis \
            else 0
        count = (count + int(keys.get("PCOUNT", "0"))) * int(keys.get("GCOUNT", "1"))
    except (KeyError, ValueError):
        return None
    size = count * bits // 8
    return size + (-size % BLOCK)
