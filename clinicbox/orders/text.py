"""Text for devices that cannot show every character: transliteration into Latin-1 (ISO_IR 100)."""

from __future__ import annotations

import unicodedata

# letters NFKD does not decompose into a Latin base letter + marks
_SPECIAL = str.maketrans({
    "Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Ħ": "H", "ħ": "h", "ı": "i", "Œ": "OE", "œ": "oe",
    "Ŋ": "N", "ŋ": "n", "ſ": "s", "Ŧ": "T", "ŧ": "t", "ĸ": "k", "Ŀ": "L", "ŀ": "l", "ẞ": "SS",
    "‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "...",
})


def to_latin1(text: str) -> str:
    """``text`` with every character Latin-1 cannot hold replaced by its nearest Latin letters.

    Characters Latin-1 has (ä, é, ß, ø…) stay as they are; Ł becomes L, Ș becomes S, ő becomes o;
    what has no Latin form (Cyrillic, CJK…) becomes ``?``, as a Latin-1 device would show it anyway.
    """
    try:
        text.encode("latin-1")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text.translate(_SPECIAL):
        try:
            ch.encode("latin-1")
            out.append(ch)
            continue
        except UnicodeEncodeError:
            pass
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        try:
            base.encode("latin-1")
            out.append(base or "?")
        except UnicodeEncodeError:
            out.append("?")
    return "".join(out)
