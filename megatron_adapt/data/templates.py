"""Render parallel sentences and instruction records into documents of prompt and target text.

A rendered document is a list of (text, is_target) segments. Preprocessing encodes each segment
separately (so the boundary between prompt and target is exact in tokens), concatenates the ids,
and stores a 0/1 target mask beside the tokens; training puts loss on target tokens only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from megatron_adapt.text.corpus import BadInputError, BadLine, open_binary

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


def instruction(record: dict[str, Any], where: BadLine) -> Segments:
    """A chat record {"messages": [{"role", "content"}...]} or {"instruction", "input"?, "output"}.

    Assistant turns are targets; everything else is prompt.
    """
    if "messages" in record:
        segments: Segments = []
        for turn in record["messages"]:
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                raise BadInputError(f"{where}: every message needs a string 'content'")
            role = turn.get("role", "user")
            if role == "assistant":
                segments.append(("### Assistant:\n", False))
                segments.append((turn["content"] + "\n", True))
            else:
                segments.append((f"### {role.capitalize()}:\n{turn['content']}\n", False))
        return segments
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        prompt = f"### Instruction:\n{record['instruction']}\n"
        if record.get("input"):
            prompt += f"### Input:\n{record['input']}\n"
        return [(prompt + "### Response:\n", False), (record["output"], True)]
    raise BadInputError(f"{where}: expected 'messages' or 'instruction' and 'output' fields")
