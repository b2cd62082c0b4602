"""Per-language choices for vocabulary extension, in one table.

A learned piece spelled only in ASCII would also fire inside English words and change their ids.
By default such pieces are not learned at all: the new language's pieces must contain a character
outside ASCII (true of Chinese, Tibetan and most scripts). Vietnamese writes many syllables in
plain ASCII ("trong", "cho", "nhanh"), so its profile allows an ASCII piece when it is part of a
well-formed Vietnamese syllable (onset + vowel nucleus + final consonant) — which English words
and the foreign names common in Vietnamese text ("Levin", "Diana") are not.

A profile also names the scripts the language is written in (Unicode script names as
``bpe_extend.letter_scripts`` gives them: "LATIN", "CJK", "TIBETAN"). Pieces and coverage characters
are learned only from word runs whose letters are all in those scripts: the Chinese, Japanese,
Greek and Cyrillic names inside Vietnamese Wikipedia would otherwise take rows that Vietnamese
text rarely uses; such text stays on the base tokenizer's pieces or bytes.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

from megatron_adapt.text.normalize import get_normalizer
from megatron_adapt.tokenizer.bpe_extend import script_names

_VI_ONSETS = ("", "b", "c", "ch", "d", "g", "gh", "gi", "h", "k", "kh", "l", "m", "n", "ng", "ngh", "nh",
              "p", "ph", "qu", "r", "s", "t", "th", "tr", "v", "x")
# ASCII-spelled rhymes: nuclei ending in a glide take no final consonant; "ch"/"nh" follow only
# a, i, oa, uy and "c"/"ng" only a, e, o, u, oa (the others need a diacritic: "ếch", "uống").
_VI_OPEN_NUCLEI = ("ai", "ao", "au", "ay", "eo", "ia", "iu", "oi", "ua", "ui", "uya", "uyu", "y",
                   "oai", "oay", "oeo")
_VI_CODAS = {
    "a": ("", "c", "ch", "m", "n", "ng", "nh", "p", "t"), "e": ("", "c", "m", "n", "ng", "p", "t"),
    "i": ("", "ch", "m", "n", "nh", "p", "t"), "o": ("", "c", "m", "n", "ng", "p", "t"),
    "u": ("", "c", "m", "n", "ng", "p", "t"), "oa": ("", "c", "ch", "m", "n", "ng", "nh", "p", "t"),
    "oe": ("", "n", "t"), "uy": ("", "ch", "n", "nh", "p", "t"),
}
_VI_RHYMES = tuple(n + c for n, codas in _VI_CODAS.items() for c in codas) + _VI_OPEN_NUCLEI


@functools.cache
def _vi_ascii_fragments() -> tuple[frozenset[str], frozenset[str]]:
    """(prefixes, substrings) of every ASCII-spelled Vietnamese syllable."""
    prefixes, substrings = set(), set()
    for onset in _VI_ONSETS:
        for rhyme in _VI_RHYMES:
            syllable = onset + rhyme
            for i in range(len(syllable)):
                prefixes.add(syllable[: i + 1])
                for j in range(i + 1, len(syllable) + 1):
                    substrings.add(syllable[i:j])
    return frozenset(prefixes), frozenset(substrings)


def vietnamese_ascii_piece(body: str, word_initial: bool) -> bool:
    """Is ``body`` (a piece without its "▁") a fragment of a Vietnamese syllable?"""
    if not (body.islower() or (word_initial and body.istitle())):  # no "Lach", no "CAT"
        return False
    prefixes, substrings = _vi_ascii_fragments()
    return body.lower() in (prefixes if word_initial else substrings)


def no_ascii_piece(body: str, word_initial: bool) -> bool:
    return False


@dataclass(frozen=True)
class LanguageProfile:
    name: str
    normalization: str | None
    """Normalizer applied to training text (``normalize.NORMALIZERS``); None for none."""
    ascii_piece: Callable[[str, bool], bool]
    """May a learned piece spelled only in ASCII be added? (body, starts a word)"""
    character_coverage: float = 0.9995
    """Share of character occurrences the vocabulary must cover; rarer characters stay bytes."""
    scripts: frozenset[str] | None = None
    """Scripts whose letters pieces are learned from; None: any."""

    @property
    def normalize(self) -> Callable[[str], str] | None:
        return get_normalizer(self.normalization)


PROFILES = {
    "vi": LanguageProfile("vi", "vi", vietnamese_ascii_piece, character_coverage=0.99999,
                          scripts=frozenset({"LATIN"})),  # its tone marks are precomposed (NFC) or combining
    "zh": LanguageProfile("zh", None, no_ascii_piece, scripts=frozenset({"CJK"})),
    "bo": LanguageProfile("bo", None, no_ascii_piece, scripts=frozenset({"TIBETAN"})),
}


def profile(lang: str | None, normalization: str | None = None,
            scripts: list[str] | None = None) -> LanguageProfile:
    """The profile for ``lang``; unknown languages get the script-agnostic default. ``scripts``
    overrides the profile's (["any"]: no restriction)."""
    base = PROFILES.get(lang or "", LanguageProfile(lang or "default", None, no_ascii_piece))
    if normalization is not None:
        base = dataclasses.replace(base, normalization=None if normalization == "none" else normalization)
    if scripts is not None:
        chosen = {s.strip().upper() for s in scripts if s.strip()}
        unknown = sorted(chosen - script_names() - {"ANY"})
        if unknown:
            raise ValueError(f"--scripts: unknown script {unknown[0]!r} (a script is the first word "
                             "of its letters' Unicode names: LATIN, CJK, TIBETAN, CYRILLIC, ...; or 'any')")
        base = dataclasses.replace(base, scripts=None if "ANY" in chosen else frozenset(chosen))
    return base
