"""FITS header cards as astropy writes them, made without astropy's Card and Header objects
where the cards are plain: one card's image (:func:`card_image`), and a header read from a
file edited as astropy's Header edits it (:func:`edited_cards`: a product's primary header).

Astropy builds a card in 20-60 us (its configuration looked up for each property) and
verifies one in ~25 us: a product's primary header (its input's cards, ~20 keywords set,
HISTORY) cost ~2.4 ms of a product's ~8 ms of writing that way. Anything not plain is left
to astropy, whose result (or refusal) is the reference the tests compare with.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

from ._astropy import fits, verify_error

__all__ = ["card_image", "edited_cards", "IMAGE_KEYWORDS"]

#: Keywords astropy moves, drops, checks or acts on in an image HDU's header (structure,
#: scaling, BLANK, EXTNAME): a primary header with one is astropy's to write.
IMAGE_KEYWORDS = re.compile(r"SIMPLE|XTENSION|BITPIX|NAXIS.*|EXTEND|PCOUNT|GCOUNT|GROUPS|"
                            r"BSCALE|BZERO|BLANK|TFIELDS|THEAP|EXTNAME")
_LENGTH = 80
#: Text of a commentary card: 80 characters less the keyword's 8.
_TEXT_LENGTH = 72
_COMMENTARY = ("COMMENT", "HISTORY")
#: Keywords that astropy parses in their own ways (long strings, ESO's HIERARCH, END).
_SPECIAL = ("CONTINUE", "HIERARCH", "END")
_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")
#: Printable ASCII: all that FITS (and astropy) allows in a header.
_PRINTABLE = re.compile(r"[ -~]*")
#: A plain card of a header as read: COMMENT or HISTORY text, or a standard keyword with a
#: value that astropy's verification passes: a string, logical, integer or real number (FITS
#: fixed format), an optional comment. A subset of what it passes (not complex or undefined
#: values, nor strings that may be record-valued cards, 'AXIS.1: 1', which astropy files
#: under another keyword), the rest left to it.
_PLAIN_CARD = re.compile(
    r"(?P<commentary>COMMENT|HISTORY) [ -~]*"
    r"|(?=.{8}= )(?P<keyword>[A-Z0-9_-]{1,8}) *= (?! *'[A-Za-z_][\w.]*: ) *"
    r"(?:'(?:[ -&(-~]|'')*'|[TF]|[+-]?(?:\.\d+|\d+(?:\.\d*)?)(?:[DE][+-]?\d+)?) *(?:/[ -~]*)?")
#: A plain string value (quotes inside doubled) and its comment.
_STRING_VALUE = re.compile(r" *'(?P<text>(?:[^']|'')*)' *(?:/ *(?P<comment>.*))?")
#: :data:`IMAGE_KEYWORDS` on lines, for keywords joined by newlines.
_IMAGE_KEYWORD_LINE = re.compile(f"^(?:{IMAGE_KEYWORDS.pattern})$", re.M)


def card_image(keyword, value=None, comment=None):
    """The header card as astropy writes it: 80 characters (a multiple for long text or
    commentary).

    A plain card (a standard keyword; a str, bool, int or finite float value, or COMMENT or
    HISTORY text, printable ASCII) is made here, as astropy makes it (the tests compare them
    over many values): astropy's Card (~17 us a card, and astropy.io.fits imported: ~0.2 s
    of a command's start-up) makes the others. A product's extensions have ~250 cards,
    nearly all the same from one exposure to the next: their images are remembered. Floats
    are not (0.0 == -0.0 would share one image).
    """
    if isinstance(value, float | np.floating):
        return _value_image(keyword, value, comment) or _astropy_image(keyword, value, comment)
    return _card_image(keyword, value, comment)


@functools.lru_cache(maxsize=4096, typed=True)
def _card_image(keyword, value, comment):
    if keyword in _COMMENTARY and not comment:
        images = _commentary_images(keyword, value)
        image = "".join(images) if images else None
    else:
        image = _value_image(keyword, value, comment) or _long_string_image(keyword, value,
                                                                            comment)
    return image or _astropy_image(keyword, value, comment)


def _astropy_image(keyword, value, comment):
    """``fits.Card(keyword, value, comment).image``: astropy's image, or its refusal."""
    return fits().Card(keyword, value, comment).image


def _value_image(keyword, value, comment=None):
    """``fits.Card(keyword, value, comment).image`` for a standard keyword, a value of str,
    bool, int or finite float and a comment (printable ASCII) that fit one card; None for
    any other (astropy's: long strings, HIERARCH, refusals)."""
    if not _KEYWORD.fullmatch(keyword) or keyword in _SPECIAL or keyword in _COMMENTARY:
        return None
    if isinstance(value, str):
        if not _PRINTABLE.fullmatch(value):
            return None
        text = f"{_quoted(value):20}" if value else "''"
    elif isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{value:>20d}"
    elif isinstance(value, float) and math.isfinite(value):
        text = f"{_float_text(value):>20}"
    else:
        return None
    if comment and not _PRINTABLE.fullmatch(comment):
        return None
    image = f"{keyword:8}= {text} / {comment}" if comment else f"{keyword:8}= {text}"
    return f"{image:{_LENGTH}}" if len(image) <= _LENGTH else None


#: :func:`_value_image` remembered, for values other than floats (0.0 == -0.0).
_same_image = functools.lru_cache(maxsize=1024, typed=True)(_value_image)


def _long_string_image(keyword, value, comment):
    """Astropy's image of a string too long for one card, without a comment: the string (quotes
    doubled) cut by :func:`_words` into pieces of 67 characters, continued with '&' on
    CONTINUE cards; None for any other value (and for one that fits one card)."""
    if (comment or not isinstance(value, str) or not _PRINTABLE.fullmatch(value)
            or not _KEYWORD.fullmatch(keyword) or keyword in _SPECIAL + _COMMENTARY
            or len(f"{_quoted(value):20}") <= _LENGTH - 10):
        return None
    words = _words(value.replace("'", "''"), _CONTINUED_LENGTH)
    cards = [f"CONTINUE  '{word}&'".ljust(_LENGTH) for word in words]
    cards[-1] = f"CONTINUE  '{words[-1]}'".ljust(_LENGTH)  # the last without its '&'
    cards[0] = f"{keyword:8}= {cards[0][10:]}"
    return "".join(cards)


#: Characters of a long string on each of its cards (astropy's Card._format_long_image).
_CONTINUED_LENGTH = 67


def _words(text, width):
    """``text`` cut into pieces of at most ``width`` characters, after a blank where it can,
    as astropy's ``fits.util._words_group`` cuts a long string (a word longer than
    ``width`` is cut inside)."""
    blanks = [k for k, char in enumerate(text) if char == " "] + [len(text)]
    words, start = [], 0
    while True:
        before = [b for b in blanks if b < start + width]
        end = before[-1] + 1 if before else -1
        if end <= start:
            end = min(start + width, len(text))
        words.append(text[start:end])
        if end >= len(text):
            return words
        start = end


def _quoted(text):
    """A FITS string value: quotes doubled, at least 8 characters between the quotes."""
    return f"'{text.replace(chr(39), chr(39) * 2):8}'"


def _float_text(value):
    """A real number as astropy writes it: Python's shortest repr, E for the exponent, cut to
    20 characters (the mantissa's last digits dropped)."""
    text = str(value).replace("e", "E")
    if len(text) > 20:
        exponent = text.find("E")
        text = text[:20] if exponent < 0 else text[:20 - (len(text) - exponent)] + text[exponent:]
    return text


def _commentary_images(keyword, text):
    """The cards of ``header[keyword] = text`` for COMMENT or HISTORY: the text cut into
    pieces of 72 characters, one card each; None for text that is not printable ASCII."""
    if keyword not in _COMMENTARY or not isinstance(text, str) or not _PRINTABLE.fullmatch(text):
        return None
    return [f"{keyword:8}{text[k:k + _TEXT_LENGTH]:{_TEXT_LENGTH}}"
            for k in range(0, max(len(text), 1), _TEXT_LENGTH)]


def _plain_cards(text):
    """The (keyword, image) of each card of a header ``text`` (``fits.Header.tostring`` with
    ``sep="\\n"``, as read), if every card is plain (:data:`_PLAIN_CARD`); None otherwise."""
    cards = []
    for line in text.split("\n") if text else ():
        if line.rstrip() == "END":  # where fits.Header.fromstring stops
            break
        plain = _PLAIN_CARD.fullmatch(line) if len(line) == _LENGTH else None
        if plain is None or plain["keyword"] in _SPECIAL:
            return None
        cards.append((plain["commentary"] or plain["keyword"], line))
    return cards


def edited_cards(text, remove, updates, commentary, extname=None):
    """The card images of a header read from a file, edited as astropy's Header edits it,
    verified; None where astropy's Header must do it.

    Parameters
    ----------
    text : str or None
        The header as read (``fits.Header.tostring(sep="\\n")``).
    remove : collection of str
        Keywords whose cards are all removed.
    updates : sequence of (str, value, str or None)
        ``header[keyword] = value`` (comment None: the card's own is kept) or
        ``(value, comment)``, in order: a keyword present is updated in place, a new one
        goes after the last card that is not commentary.
    commentary : sequence of (str, str)
        ``header[keyword] = text`` for COMMENT or HISTORY, after the updates: after the last
        card of that keyword, else at the end.
    extname : str, optional
        The EXTNAME (in upper case) that an image extension made with this header and
        ``name=extname`` has (``fits.ImageHDU(data, header, name=extname)``): set before
        the updates, as a new keyword.

    Returns
    -------
    list of str or None
        The cards' images, as astropy writes them (a card read and left unchanged is its
        image as read). None when a card of ``text`` is not plain (long strings, HIERARCH,
        blank cards, complex or undefined values, a card astropy would refuse or fix...),
        when a keyword of :data:`IMAGE_KEYWORDS` remains or is updated, or a value or text
        is not one that :func:`card_image` makes here.
    """
    cards = _plain_cards(text)
    if cards is None:
        return None
    keys = [key for key, _ in cards if key not in remove]
    images = [image for key, image in cards if key not in remove]
    if _IMAGE_KEYWORD_LINE.search("\n".join((*keys, *(key for key, _, _ in updates)))):
        return None
    if extname is not None:
        updates = [("EXTNAME", extname, "extension name"), *updates]
    # New keywords go after the last card that is not commentary (astropy's Header.append).
    end = next((k + 1 for k in range(len(keys) - 1, -1, -1) if keys[k] not in _COMMENTARY), 0)
    for key, value, comment in updates:
        if key in _COMMENTARY:
            return None
        if key in keys:
            image = _updated(images[keys.index(key)], value, comment)
            if image is None:
                return None
            images[keys.index(key)] = image
            continue
        image = (_value_image if isinstance(value, float) else _same_image)(key, value, comment)
        if image is None:
            return None
        keys.insert(end, key)
        images.insert(end, image)
        end += 1
    for key, value in commentary:
        new = _commentary_images(key, value)
        if new is None:
            return None
        at = len(keys) - keys[::-1].index(key) if key in keys else len(keys)
        keys[at:at] = [key] * len(new)
        images[at:at] = new
    return images


def _updated(image, value, comment):
    """The card ``image`` (as read) with ``value`` and, unless None, ``comment`` set, as
    astropy updates it (unchanged when they are the card's own), verified; None when that
    takes more than one card or does not verify. A string set on a string, the comment kept
    (a RED file's BUNIT and EXPID), is updated here; astropy's Card does the others."""
    old = _STRING_VALUE.fullmatch(image, 10)
    if old and isinstance(value, str):
        text, old_comment = old["text"].replace("''", "'"), (old["comment"] or "").rstrip()
        # The same value, or another: which astropy's conf.strip_header_whitespace (trailing
        # blanks not part of a string) does not decide.
        if (comment is None or comment == old_comment) and text == value:
            return image
        if (comment is None or comment == old_comment) and text.rstrip() != value.rstrip():
            new = _value_image(image[:8].rstrip(), value, old_comment)
            if new is not None:
                return new
    card = fits().Card.fromstring(image)
    card.value = value
    if comment is not None:
        card.comment = comment
    try:
        card.verify("exception")
    except (verify_error(), ValueError):
        return None
    image = card.image
    return image if len(image) == _LENGTH else None
