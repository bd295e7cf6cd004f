"""Header cards made without astropy's Card and Header objects (kspec_fluxcal.fits_cards)
must be astropy's, byte for byte; what is not plain is left to astropy (None)."""

import warnings

import numpy as np
import pytest
from astropy.io import fits

from kspec_fluxcal import fits_cards
from kspec_fluxcal.fits_cards import _value_image, card_image, edited_cards
from kspec_fluxcal.fits_file import primary_bytes


def _astropy_edit(text, remove, updates, commentary):
    """What :func:`edited_cards` does, by astropy's Header (its cards verified)."""
    header = fits.Header.fromstring(text, sep="\n")
    for key in remove:
        header.remove(key, ignore_missing=True, remove_all=True)
    for key, value, comment in updates:
        header[key] = value if comment is None else (value, comment)
    for key, value in commentary:
        header[key] = value
    for card in header.cards:
        card.verify("exception")
    return header


def _text(*cards):
    """A header as the readers keep it (``fits.Header.tostring(sep="\\n")``)."""
    return fits.Header.fromstring("\n".join(c.ljust(80) for c in cards),
                                  sep="\n").tostring(sep="\n")


def test_value_cards_are_astropy_cards():
    """A card of a str, bool, int or float value is astropy's image; what does not fit one
    card or is not printable ASCII is left to astropy."""
    rng = np.random.default_rng(5)
    floats = [0.0, -0.0, 1.0, -2.5, 0.1 + 0.2, 1e16, 1e20, 123456789012345678.0, 5e-324,
              1e-300, -1.7976931348623157e308, 0.005389790795985949, np.float64(3.3e-7),
              *rng.normal(size=20) * 10.0 ** rng.integers(-30, 30, 20)]
    values = [*floats, "", "a", "O'Brien", "counts  ", "x" * 8, "  lead", "y" * 60, True,
              False, 0, -7, 2**62]
    for value in values:
        for comment in (None, "", "a comment", "c" * 40):
            made = _value_image("KEY-1_2", value, comment)
            if made is None:  # longer than a card: astropy cuts the comment (and warns)
                assert len(f"KEY-1_2 = {value!s:20} / {comment}") > 80, (value, comment)
            else:
                assert made == fits.Card("KEY-1_2", value, comment).image, (value, comment)
    assert _value_image("KEY", "x" * 69) is None  # a long string: CONTINUE cards
    assert _value_image("KEY", "caf\xe9") is None  # astropy refuses it
    assert _value_image("KEY", 1.0, "\t") is None
    assert _value_image("HIERARCH A B", 1.0) is None
    assert _value_image("KEY", np.nan) is None
    assert card_image("X", -0.0) == fits.Card("X", -0.0).image != card_image("X", 0.0)
    assert card_image("X", np.float32(0.1)) == fits.Card("X", np.float32(0.1)).image


def test_card_images_are_astropy_cards(monkeypatch):
    """Every card that :func:`card_image` makes without astropy (values of every kind, long
    strings continued on CONTINUE cards, blanks and quotes where they are cut, COMMENT and
    HISTORY text over several cards) is astropy's image; the rest is astropy's."""
    rng = np.random.default_rng(14)
    alphabet = np.array(list("ab c'  ,-_xyz09&/="))
    texts = ["".join(rng.choice(alphabet, n)) for n in
             rng.choice([0, 1, 8, 60, 66, 67, 68, 69, 70, 71, 100, 134, 135, 140, 300], 300)]
    bands = ("panstarrs-g,gaiadr2-BP,panstarrs-r,gaiadr2-G,panstarrs-i,gaiadr2-RP,"
             "panstarrs-z,twomass-J,twomass-H,twomass-Ks")  # a product's FCALSTAR BANDS
    values = [*texts, bands, " " * 100, "'" * 70, "caf\xe9", True, False, 0, -7, 2**62,
              -(10**19), np.int64(3), np.bool_(True), 0.0, -0.0, 1e300, 1 / 3, np.nan]
    by_astropy = []
    astropy_image = fits_cards._astropy_image
    monkeypatch.setattr(fits_cards, "_astropy_image",
                        lambda *card: by_astropy.append(card) or astropy_image(*card))
    fits_cards._card_image.cache_clear()
    compared = 0
    for value in values:
        for keyword in ("BANDS", "TTYPE12", "DATE-OBS", "COMMENT", "HISTORY", "lower"):
            for comment in (None, "", "a comment", "c" * 50):
                with warnings.catch_warnings():
                    warnings.simplefilter("error", fits.verify.VerifyWarning)
                    try:
                        expected = fits.Card(keyword, value, comment).image
                    except ValueError:  # astropy refuses it: so does card_image
                        with pytest.raises(ValueError):
                            card_image(keyword, value, comment)
                        continue
                    except fits.verify.VerifyWarning:  # a comment cut: astropy's to do
                        continue
                assert card_image(keyword, value, comment) == expected, (keyword, value)
                compared += 1
    assert compared > 4000
    # made here: every card of a standard keyword and a plain value without a comment
    # (commentary cards: of text)
    assert not [(key, value) for key, value, comment in by_astropy if key != "lower"
                and not comment and type(value) in (str, bool, int, float)
                and value == value and value != "caf\xe9"
                and (type(value) is str or key not in ("COMMENT", "HISTORY"))]
    fits_cards._card_image.cache_clear()


#: A RED file's primary header, as the readers keep it.
_RED = _text(
    "SIMPLE  =                    T / conforms to FITS standard",
    "BITPIX  =                  -32 / array data type",
    "NAXIS   =                    2 / number of array dimensions",
    "NAXIS1  =                 4096", "NAXIS2  =                   14", "EXTEND  =    T",
    "EXPTIME =                815.0 / exposure time, s",
    "EXPID   = 'KS20261101_0001'    / exposure id",
    "BUNIT   = 'counts  '           / data unit",
    "OBSERVER= 'O''Brien / Smith'   / quotes and a slash",
    "EXPNUM  =                   +7", "SCALE   =              1.0D-03 / odd but valid",
    "DATE-OBS= '2026-11-01T10:12:13'",
    "COMMENT a comment between keywords",
    "CHECKSUM= 'abc'", "FLAG    =                    F",
    "HISTORY first", "HISTORY second", "COMMENT at the end",
)
_UPDATES = [("BUNIT", "1e-17 erg/(s cm2 Angstrom)", None), ("EXPID", "KS20261101_0001", None),
            ("FLUXCAL", True, "flux calibrated"), ("FCALVER", "0.1.0", "version"),
            ("FCALNSTR", 3, "standards"), ("FCALRMS", 0.00538979, "rms"),
            ("FCALMERR", -1.0, "error")]
_COMMENTARY = [("HISTORY", "h" * 150), ("HISTORY", ""), ("COMMENT", "a note")]
_REMOVED = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "CHECKSUM", "DATASUM")


@pytest.mark.parametrize("text, updates, commentary", [
    (_RED, _UPDATES, _COMMENTARY),
    (None, _UPDATES, _COMMENTARY),  # an exposure made in memory
    (_text("A       = 1", "HISTORY h"), _UPDATES, [("COMMENT", "c")]),  # no COMMENT yet
    (_text("COMMENT only commentary"), _UPDATES[2:], [("HISTORY", "x")]),
    # existing keywords set: a string with a new comment, numbers, the same value
    (_RED, [("BUNIT", "adu", "new comment"), ("EXPTIME", 815.0, None),
            ("EXPNUM", 8, "n"), ("FLAG", True, None), ("EXPID", "KS20261101_0001  ", "x"),
            ("OBSERVER", "O'Brien / Smith", None), ("DATE-OBS", "2026-11-02", None)], ()),
    # a product calibrated again: its FCAL keywords are updated in place
    (_text("FLUXCAL =                    T / flux calibrated by kspec-fluxcal",
           "FCALRMS =                 0.01 / rms", "FCALSRC = 'standards'", "HISTORY old"),
     [("FLUXCAL", True, "flux calibrated by kspec-fluxcal"), ("FCALRMS", 0.02, "rms"),
      ("FCALSRC", "model", "origin")], [("HISTORY", "new")]),
])
def test_edited_cards_are_astropy_header_edits(text, updates, commentary):
    """A plain header edited here (keywords removed, updated in place or added after the
    last keyword, commentary after its own kind or at the end) is astropy's Header edited,
    card for card, and the primary HDU written with it astropy's."""
    made = edited_cards(text, _REMOVED, updates, commentary)
    header = _astropy_edit(text or "", _REMOVED, updates, commentary)
    assert made == [card.image for card in header.cards]
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert primary_bytes(data, made) == primary_bytes(data, header)


@pytest.mark.parametrize("cards, updates", [
    (("HIERARCH ESO DET CHIP TEMP = 170.5",), ()),
    (("LONGSTR = 'a long string value that goes on and on beyond one card of eighty &'",
      "CONTINUE  'characters, continued'"), ()),
    (("A       = 1", "", "B       = 2"), ()),  # a blank card
    (("DP1     = 'AXIS.1: 1'",), ()),  # record-valued
    (("Z       = (1.0, 2.0)",), ()),  # complex
    (("U       =",), ()),  # undefined
    (("BSCALE  = 2.0",), ()),  # astropy scales the data
    (("X       = 'no end",), ()),  # refused by astropy
    (("A       = 1",), [("LONG", "x" * 80, None)]),  # a long string added
    (("A       = 1",), [("B", "caf\xe9", None)]),  # astropy refuses it
])
def test_edited_cards_leave_the_rest_to_astropy(cards, updates):
    """Cards that are not plain, keywords astropy acts on and values that are not plain are
    astropy's Header's to edit (None)."""
    assert edited_cards(_text(*cards) if "X       = 'no end" not in cards
                        else "X       = 'no end".ljust(80), (), updates, ()) is None
