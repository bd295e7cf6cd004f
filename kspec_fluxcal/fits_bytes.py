"""Plain FITS files read from their bytes, as astropy reads them, without astropy's objects.

Astropy's ``fits.open`` and the header look-ups that follow were ~5 ms of the ~9 of reading
a RED file: each card is parsed on first use, and each parse asks astropy's configuration
(a validated look-up, ~10 us) about whitespace and record-valued cards. A plain file (every
header printable ASCII, FITS-standard value and commentary cards only; images without
scaling; binary tables of scalar columns; nothing after the last HDU) is read here from
its bytes instead, with the values, names, data and header text astropy gives (with its
default configuration: string values without their trailing blanks). Any other
file is left to astropy (:func:`kspec_fluxcal.fits_file.open_fits`), with its results and
errors: :func:`read_plain` says None for it.
"""

from __future__ import annotations

import math
import os
import re
import stat

import numpy as np

__all__ = ["PlainHeader", "PlainHDU", "PlainFits", "read_plain", "read_bytes", "header_text",
           "plain_table", "keep_extensions", "kept_extensions"]

#: The FITS record: headers and data are padded to a multiple of it.
BLOCK = 2880
#: The END card that closes a header.
END_CARD = "END".ljust(80)
#: Image data types by BITPIX, big-endian as astropy's (unscaled) arrays.
_IMAGE_TYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
#: A value card as the FITS standard writes it: its keyword (upper case, padded to 8
#: characters), '= ' and the value and comment as astropy's ``Card._value_FSC_RE`` reads
#: them (astropy fixes, or does not parse, other forms), but its complex numbers and
#: undefined values and a string with a lone quote inside: a string (quotes doubled), a
#: logical, an integer or a real number.
_CARD = re.compile(r"(?=[A-Z0-9_ -]{8}= )(?P<keyword>[A-Z0-9_-]+) *=  *"
                   r"(?:'(?P<text>(?:[^']|'')*)'|(?P<logical>[FT])|(?P<integer>[+-]?\d+)|"
                   r"(?P<real>[+-]?(?:\.\d+|\d+(?:\.\d*)?)(?:[DE][+-]?\d+)?))"
                   r" *(?:/ *(?:[!-~][ -~]*)?)?")
#: Keywords of cards without a value, kept as text only.
_COMMENTARY = ("COMMENT ", "HISTORY ", "        ")
#: Keywords astropy reads otherwise whatever follows them.
_SPECIAL = ("END", "CONTINUE")
#: Header keywords astropy acts on when it reads the data (scaling, blanks, random groups,
#: compression, a heap): their files are astropy's.
_ACTED_ON = ("BSCALE", "BZERO", "BLANK", "GROUPS", "ZIMAGE", "ZTABLE", "THEAP")


class PlainHeader(dict):
    """A header read by :func:`read_plain`: keyword -> value (str with trailing blanks
    removed, bool, int or float, as astropy's ``header[keyword]``; the first of a repeated
    keyword), keywords in upper case as in the file; commentary cards have no entry.

    ``text`` is the header's cards before END, as in the file.
    """

    __slots__ = ("text",)

    def tostring(self, sep=""):
        """The header as astropy's ``Header.tostring(sep)``: its cards joined by ``sep``,
        then END, padded with blanks to a multiple of 2880 characters."""
        text = self.text
        joined = sep.join([text[i:i + 80] for i in range(0, len(text), 80)] + [END_CARD])
        return joined + " " * (-len(joined) % BLOCK)


class PlainHDU:
    """An HDU read by :func:`read_plain`: what the readers use of astropy's.

    Attributes
    ----------
    header : PlainHeader
    name : str
        EXTNAME ('PRIMARY' for the primary HDU without one, '' for an extension).
    is_image : bool
    data : numpy.ndarray
        An image's data (big-endian, writable, as astropy's); None for a table.
    table : tuple or None
        A table's (rows, columns) as :func:`plain_table` gives them.
    """

    __slots__ = ("header", "name", "is_image", "data", "table")

    def __init__(self, header, default_name, data=None, table=None):
        self.header = header
        self.name = str(header.get("EXTNAME", default_name))
        self.is_image = table is None
        self.data = data
        self.table = table


class PlainFits(list):
    """The :class:`PlainHDU` of a file, in order; a context manager like astropy's HDUList
    (nothing to close: the file was read whole).

    ``read``: (the file's identity when it was read, its bytes, each extension's (start,
    end of its cards before END, end) in them) when :func:`read_plain` read the file itself,
    else None.
    """

    read = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def read_plain(path, tables=(), content=None):
    """The HDUs of the plain FITS file ``path``, read from its bytes; None for another.

    Parameters
    ----------
    path : str
        An uncompressed FITS file.
    tables : sequence of str
        Extension names (upper case) that are binary tables: any other extension must be
        an image, and these must be plain tables (:func:`plain_table`), for the file to be
        read here.
    content : bytearray, optional
        The file's bytes, when the caller has read them (:func:`read_bytes`): not read
        again. The images are views of them.

    Returns
    -------
    PlainFits or None
        Each HDU's name, header, image data or table as astropy reads them; None when the
        file is not a plain one (module docstring), is not a regular file, or cannot be read:
        astropy's to read (or refuse, saying why).
    """
    raw, identity = _read_whole(path) if content is None else (content, None)
    if raw is None or raw[:9] != b"SIMPLE  =":
        return None
    hdus, start, spans = PlainFits(), 0, []
    while start < len(raw):
        hdu, end = _plain_hdu(raw, start, not hdus, tables)
        if hdu is None:
            return None
        if hdus:
            spans.append((start, start + len(hdu.header.text), end))
        hdus.append(hdu)
        start = end
    if identity is not None:
        hdus.read = (identity, raw, spans)
    return hdus


def read_bytes(path):
    """The bytes of the regular file ``path`` (a bytearray: the images :func:`read_plain`
    makes of them are writable, as astropy's); None for another kind of file (a FIFO would
    wait for data that never come) or one that cannot be read whole."""
    return _read_whole(path)[0]


def _read_whole(path):
    """(:func:`read_bytes`, the file's identity as it was read: :func:`_identity`)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, None
        with open(path, "rb") as f:
            status = os.fstat(f.fileno())
            raw = bytearray(status.st_size)
            return (raw, _identity(status)) if f.readinto(raw) == len(raw) else (None, None)
    except OSError:
        return None, None


def _identity(status):
    """What tells a file from the same path rewritten or replaced: its device and inode, size,
    and times of its last modification and change (``os.stat`` result ``status``)."""
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns)


#: (path, identity, bytes, extension spans) of the file :func:`keep_extensions` kept.
_kept = None


def keep_extensions(path, hdus):
    """Keep the bytes of the plain file ``path`` read as ``hdus`` (:func:`read_plain`, which
    read the file itself; its images not modified) for :func:`kept_extensions`, in place of
    the file kept before (one: the exposure a process reads, then writes as a product). A
    product carries its input's extensions verbatim: read again from the file, they were
    ~0.3 ms of a product's ~4 (two opens, reads of ~0.5 MB into fresh buffers)."""
    global _kept
    _kept = None if hdus.read is None else (os.fspath(path), *hdus.read)


def kept_extensions(path):
    """The extensions of the file ``path`` kept by :func:`keep_extensions`, in order, as
    (cards, HDU) read-only views of its bytes (the header's cards before END; the whole HDU,
    padded), when ``path`` is that file and unchanged since it was read (the same
    :func:`_identity`); None otherwise."""
    kept = _kept  # one snapshot: another thread may keep another file meanwhile
    if kept is None or kept[0] != os.fspath(path):
        return None
    _, identity, raw, spans = kept
    try:
        if _identity(os.stat(path)) != identity:
            return None
    except OSError:
        return None
    view = memoryview(raw).toreadonly()
    return [(view[start:cards], view[start:end]) for start, cards, end in spans]


def _plain_hdu(raw, start, primary, tables):
    """(The HDU at byte ``start`` of the file's bytes ``raw``, where the next one starts);
    (None, None) if it is not plain."""
    header, data_start = _plain_header(raw, start)
    if header is None or any(key in header for key in _ACTED_ON):
        return None, None
    if primary:
        kind, default_name = ("IMAGE" if header.get("SIMPLE") is True else None), "PRIMARY"
    else:  # astropy tells an extension's kind by XTENSION, which the standard puts first
        kind = header.get("XTENSION") if header.text.startswith("XTENSION") else None
        default_name = ""
    name = str(header.get("EXTNAME", default_name)).upper()
    shape = _data_shape(header, primary)
    if shape is None or kind != ("BINTABLE" if name in tables and not primary else "IMAGE") \
            or kind == "BINTABLE" and (len(shape) != 2 or header["BITPIX"] != 8):
        return None, None
    dtype = np.dtype(_IMAGE_TYPES[header["BITPIX"]])
    count = math.prod(shape)
    size = count * dtype.itemsize
    end = data_start + size + (-size % BLOCK)
    if end > len(raw):
        return None, None  # cut short: astropy says so
    if kind == "IMAGE":
        data = np.frombuffer(raw, dtype, count, data_start).reshape(shape)
        return PlainHDU(header, default_name, data=data), end
    table = plain_table(header, lambda n: bytes(raw[data_start:data_start + n]))
    return (None, None) if table is None else (PlainHDU(header, "", table=table), end)


def _data_shape(header, primary):
    """The data's shape (NAXISn reversed, each > 0) if the structure keywords are plain."""
    naxis, bitpix = header.get("NAXIS"), header.get("BITPIX")
    counts = () if primary else (header.get("PCOUNT"), header.get("GCOUNT"))
    # int, not float or bool (-32.0 and True would pass the comparisons)
    if (type(naxis) is not int or not 0 < naxis < 1000 or type(bitpix) is not int
            or bitpix not in _IMAGE_TYPES or counts not in ((), (0, 1))
            or any(type(n) is not int for n in counts)):
        return None
    shape = tuple(header.get(f"NAXIS{k}") for k in range(naxis, 0, -1))
    if not all(type(n) is int and n > 0 for n in shape):
        return None
    return shape


def _plain_header(raw, start):
    """(The header at byte ``start`` of ``raw``, where its data start); (None, None) if it
    is not plain (module docstring)."""
    end = raw.find(b"END" + b" " * 77, start)
    while end >= 0 and (end - start) % 80:
        end = raw.find(b"END" + b" " * 77, end + 1)
    if end < 0:
        return None, None
    data_start = end + 80 + (-(end + 80 - start) % BLOCK)
    try:
        text = raw[start:end].decode("ascii")
    except UnicodeDecodeError:
        return None, None
    if raw[end + 80:data_start].strip(b" ") or data_start > len(raw):
        return None, None
    return _parsed(text), data_start


def _parsed(text):
    """The :class:`PlainHeader` of the cards ``text`` (80 characters each, without END);
    None if it is not plain (module docstring)."""
    if not (text.isascii() and text.isprintable()) or len(text) % 80:
        return None
    header = PlainHeader()
    header.text = text
    for i in range(0, len(text), 80):
        if text[i:i + 8] in _COMMENTARY:
            continue
        card = _CARD.fullmatch(text, i, i + 80)
        if card is None:
            return None  # HIERARCH, CONTINUE, a card without "= " or not standard
        keyword, string, logical, integer, real = card.groups()
        if string is not None:
            if string.endswith("&") or ": " in card[0]:  # a long or record-valued card
                return None
            value = string.replace("''", "'").rstrip()
        elif logical is not None:
            value = logical == "T"
        else:
            value = int(integer) if integer is not None else float(real.replace("D", "E"))
        if keyword in _SPECIAL:
            return None
        header.setdefault(keyword, value)
    return header


def header_text(text):
    """A header as astropy's ``Header.tostring(sep="\\n")`` writes it (a Dataset's
    ``fits_header``), read as a :class:`PlainHeader`: the values of astropy's
    ``Header.fromstring(text, sep="\\n")``; None if it is not plain (astropy's to read).

    Parameters
    ----------
    text : str

    Returns
    -------
    PlainHeader or None
    """
    *cards, end = text.split("\n")
    if end[:80] != END_CARD or end[80:].strip(" ") or any(len(card) != 80 for card in cards):
        return None  # END last, then the padding's blanks
    return _parsed("".join(cards))


#: A plain binary-table format: (repeat) code; A's repeat is its width.
_PLAIN_FORMAT = re.compile(r"(\d*)([LABIJKED])")
_PLAIN_TYPES = {"L": "u1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}
#: Column keywords with which astropy's values are not the bytes as they are.
_COLUMN_SCALING, _COLUMN_NAME = ("TSCAL", "TZERO", "TNULL", "TDIM"), re.compile(r"\w+", re.A)


def plain_table(header, read):
    """A plain binary table read from its bytes, as astropy reads it: (rows, {name:
    (values, unit or None)} in the table's order); None for another table.

    A plain table has scalar columns L, A, B, I, J, K, E, D without scaling, nulls or
    dimensions, and no heap; a logical column without NUL (undefined) values.

    Parameters
    ----------
    header : mapping
        The table's header (astropy's or a :class:`PlainHeader`).
    read : callable
        ``read(size)``: the first ``size`` bytes of the table's data (None if it cannot).

    Returns
    -------
    tuple or None
    """
    nfields, nrows = header.get("TFIELDS", 0), header.get("NAXIS2", 0)
    if not (type(nfields) is int and nfields > 0 and type(nrows) is int and nrows > 0
            and header.get("PCOUNT", 0) == 0 and header.get("GCOUNT", 1) == 1
            and "THEAP" not in header):
        return None
    fields = [_plain_field(header, k) for k in range(1, nfields + 1)]
    if None in fields or len({field[0].upper() for field in fields}) < nfields:
        return None
    dtype = np.dtype([field[:2] for field in fields])
    if header.get("NAXIS1") != dtype.itemsize or (raw := read(nrows * dtype.itemsize)) is None:
        return None
    rows = np.frombuffer(bytearray(raw), dtype=dtype)  # writable, as astropy's
    columns = {}
    for name, _, unit, code in fields:
        values = rows[name]
        if code == "L":
            if not values.all():  # astropy warns about a NUL (undefined) logical
                return None
            values = values == ord("T")
        elif code == "A":
            values = _table_strings(values)
        columns[name] = (values, unit)
    return nrows, columns


def _plain_field(header, k):
    """(name, NumPy type, unit, format code) of the table's column ``k`` if plain, else None."""
    name, form = header.get(f"TTYPE{k}"), header.get(f"TFORM{k}")
    found = _PLAIN_FORMAT.fullmatch(form) if isinstance(form, str) else None
    if (found is None or not isinstance(name, str) or not _COLUMN_NAME.fullmatch(name)
            or any(f"{key}{k}" in header for key in _COLUMN_SCALING)):
        return None
    repeat, code = found.groups()
    if code == "A" and int(repeat or 1) > 0:
        kind = f"S{int(repeat or 1)}"
    elif repeat in ("", "1"):
        kind = _PLAIN_TYPES[code]
    else:
        return None
    return name, kind, header.get(f"TUNIT{k}"), code


def _table_strings(values):
    """A text column as astropy reads it: str where it is ASCII, else its bytes."""
    try:
        return np.char.decode(values, "ascii").astype(f"U{values.dtype.itemsize}")
    except UnicodeDecodeError:
        return values
