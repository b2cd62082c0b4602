"""Text normalization applied before tokenizer training and (optionally) preprocessing.

Vietnamese text arrives composed (NFC), decomposed (NFD) or mixed, and with the tone mark of
open syllables ending in "oa", "oe", "uy" placed on either vowel ("hòa"/"hoà", "khỏe"/"khoẻ",
"thủy"/"thuỷ"). A tokenizer trained on one form splits the other into bytes and fragments, so
``normalize_vi`` maps all of them to NFC with the traditional placement (tone on the first vowel:
"hòa", "khỏe", "thủy"), the more frequent one in Vietnamese Wikipedia. Syllables with a final
consonant ("hoàn", "thuyền") and "qu" + vowel ("quý", "quà", where u belongs to the consonant)
are already unambiguous and stay as they are.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

_TONES = ("\u0300", "\u0301", "\u0309", "\u0303", "\u0323")  # grave, acute, hook, tilde, dot


def _compose(letter: str, tone: str) -> str:
    return unicodedata.normalize("NFC", letter + tone)


def _tone_moves() -> dict[str, str]:
    """'oà' → 'òa' and the like, in both cases, for the three ambiguous vowel pairs."""
    moves = {}
    for first, second in (("o", "a"), ("o", "e"), ("u", "y")):
        for tone in _TONES:
            for f, s in ((first, second), (first.upper(), second.upper()), (first.upper(), second)):
                moves[f + _compose(s, tone)] = _compose(f, tone) + s
    return moves


_MOVES = _tone_moves()
# The pair ends the syllable (no letter follows) and its first vowel is not the u of "qu".
_NEW_STYLE = re.compile(r"(?<![qQ])(" + "|".join(sorted(_MOVES)) + r")(?!\w)")


def normalize_vi(text: str) -> str:
    """NFC, then the traditional tone placement for open "oa", "oe", "uy" syllables."""
    return _NEW_STYLE.sub(lambda m: _MOVES[m.group(1)], unicodedata.normalize("NFC", text))


def normalize_nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


NORMALIZERS: dict[str, Callable[[str], str]] = {"vi": normalize_vi, "nfc": normalize_nfc}


def get_normalizer(name: str | None) -> Callable[[str], str] | None:
    """The normalizer registered under ``name`` (None or "none": no normalization)."""
    if name in (None, "none"):
        return None
    try:
        return NORMALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown normalization {name!r}; choose from {sorted(NORMALIZERS)} or none") from None
