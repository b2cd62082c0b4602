"""Paragraphs of a corpus split into training and held-out ones by a stable hash.

A paragraph is a block between blank lines, its line breaks joined with spaces (hard-wrapped
books become one paragraph per block; Wikipedia's one-line paragraphs stay as they are). Its key
is the file name, the document's line number and the index of the paragraph's first line in the
document — the key ``tokenizer.extend.split_lines`` gives that line, so the tokenizer extension
held out at least that line of every held-out paragraph. Preprocessing the training side (the
real-model recipe does) keeps evaluation text out of the model's training data.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megatron_adapt.text.corpus import iter_documents


def is_heldout(key: str, per_mille: int) -> bool:
    return zlib.crc32(key.encode()) % 1000 < per_mille


def paragraphs(text: str) -> Iterator[tuple[int, str]]:
    """(index of its first line, paragraph) for each non-empty paragraph of a document."""
    line = 0
    for block in re.split(r"(\n[ \t]*\n)", text):
        if block.startswith("\n") and not block.strip():
            line += block.count("\n")
            continue
        lines = block.split("\n")
        joined = " ".join(part.strip() for part in lines if part.strip())
        if joined:
            lead = next(i for i, part in enumerate(lines) if part.strip())  # blank lines before it
            yield line + lead, joined
        line += block.count("\n")


@dataclass
class ParagraphSplit:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)


def split_paragraphs(paths: list[Path], text_key: str = "text", per_mille: int = 10) -> ParagraphSplit:
    split = ParagraphSplit()
    for path in paths:
        for lineno, text in iter_documents(path, text_key):
            for index, paragraph in paragraphs(text):
                heldout = is_heldout(f"{path.name}:{lineno}:{index}", per_mille)
                (split.heldout if heldout else split.train).append(paragraph)
    return split
