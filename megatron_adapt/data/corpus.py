"""Read corpus files: plain text or JSONL, uncompressed or .gz/.xz/.zst, one document per line.

Lines are decoded one at a time so that a bad line (invalid UTF-8, invalid JSON, a missing or
non-string text field) costs only itself: it is reported to ``on_bad`` with its file and line
number and skipped, or raised as ``BadInputError`` when strict. A truncated compressed file is
reported at the line where it ends.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class BadInputError(ValueError):
    """A corpus line that cannot be used, with where it is."""


@dataclass(frozen=True)
class BadLine:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def open_binary(path: str | Path) -> BinaryIO:
    """Open a file for reading bytes, decompressing by suffix."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def is_jsonl(path: str | Path) -> bool:
    name = str(path)
    for suffix in (".gz", ".xz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    return name.endswith(JSONL_SUFFIXES)


def iter_documents(path: str | Path, text_key: str = "text",
                   on_bad: Callable[[BadLine], None] | None = None,
                   strict: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (line number, document text) for every usable line of ``path``.

    Empty documents are yielded too (the caller decides); unusable lines go to ``on_bad``.
    """
    path = str(path)
    jsonl = is_jsonl(path)

    def bad(line: int, reason: str) -> None:
        record = BadLine(path, line, reason)
        if strict:
            raise BadInputError(str(record))
        if on_bad is not None:
            on_bad(record)

    lineno = 0
    with open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad(lineno, f"invalid UTF-8 at byte {err.start}")
                    continue
                if not jsonl:
                    yield lineno, line.rstrip("\n").rstrip("\r")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    bad(lineno, f"invalid JSON ({err.msg} at column {err.colno})")
                    continue
                text = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    reason = "missing" if not isinstance(record, dict) or text_key not in record else "not a string"
                    bad(lineno, f"field {text_key!r} {reason}")
                    continue
                yield lineno, text
        except (EOFError, OSError, lzma.LZMAError) as err:
            bad(lineno + 1, f"compressed stream ends early ({type(err).__name__}: {err})")
