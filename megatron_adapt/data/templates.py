"""Render parallel sentences into documents of prompt and target text (conversations: ``chat.py``).

A rendered document is a list of (text, is_target) segments. Preprocessing encodes each segment
separately (so the boundary between prompt and target is exact in tokens), concatenates the ids,
and stores a 0/1 target mask beside the tokens; training puts loss on target tokens only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from megatron_adapt.text.corpus import BadInputError, open_binary

Segments = list[tuple[str, bool]]

LANGUAGE_NAMES = {"en": "English", "vi": "Vietnamese", "zh": "Chinese", "bo": "Tibetan", "fr": "French",
                  "de": "German", "ja": "Japanese", "ko": "Korean", "th": "Thai", "id": "Indonesian"}


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def translation(source: str, target: str, source_lang: str, target_lang: str) -> Segments:
    """"Translate from English to Vietnamese:\\n{source}\\n" → " {target}"."""
    prompt = f"Translate from {language_name(source_lang)} to {language_name(target_lang)}:\n{source}\n"
    return [(prompt, False), (target, True)]


def iter_parallel(source_path: str | Path, target_path: str | Path, source_lang: str, target_lang: str,
                  both_directions: bool = True) -> Iterator[tuple[int, Segments]]:
    """(line number, segments) for each aligned pair; both directions when asked.

    The files must have the same number of lines; a byte-order mark is dropped; a pair with an
    empty side is skipped (it teaches nothing), a count mismatch is an error naming both files.
    """
    with open_binary(source_path) as fs, open_binary(target_path) as ft:
        src_lines, tgt_lines = fs.read().decode("utf-8-sig").splitlines(), ft.read().decode("utf-8-sig").splitlines()
    if len(src_lines) != len(tgt_lines):
        raise BadInputError(f"{source_path} has {len(src_lines)} lines but {target_path} has {len(tgt_lines)}")
    for lineno, (src, tgt) in enumerate(zip(src_lines, tgt_lines), start=1):
        src, tgt = src.strip(), tgt.strip()
        if not src or not tgt:
            continue
        yield lineno, translation(src, tgt, source_lang, target_lang)
        if both_directions:
            yield lineno, translation(tgt, src, target_lang, source_lang)
