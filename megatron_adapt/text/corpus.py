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


def open_binary(path: str | Path, raw: BinaryIO | None = None) -> BinaryIO:
    """Open a file for reading bytes, decompressing by suffix (from ``raw`` when given)."""
    path = str(path)
    raw = raw or open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".xz"):
        return lzma.LZMAFile(raw, "rb")
    if path.endswith(".bz2"):
        return bz2.BZ2File(raw, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def is_jsonl(path: str | Path) -> bool:
    name = str(path)
    for suffix in (".gz", ".xz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    return name.endswith(JSONL_SUFFIXES)


def _reporter(path: str, on_bad: Callable[[BadLine], None] | None, strict: bool) -> Callable[[int, str], None]:
    def bad(line: int, reason: str) -> None:
        record = BadLine(path, line, reason)
        if strict:
            raise BadInputError(str(record))
        if on_bad is not None:
            on_bad(record)

    return bad


def _iter_lines(path: str, bad: Callable[[int, str], None],
                on_position: Callable[[int], None] | None) -> Iterator[tuple[int, str]]:
    """Decoded lines (without the newline); undecodable lines and early stream ends go to ``bad``."""
    lineno = 0
    raw_file = open(path, "rb")
    with raw_file, open_binary(path, raw_file) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                if on_position is not None and lineno % 1000 == 0:
                    on_position(raw_file.tell())
                try:
                    yield lineno, raw.decode("utf-8").rstrip("\n").rstrip("\r")
                except UnicodeDecodeError as err:
                    bad(lineno, f"invalid UTF-8 at byte {err.start} of the line")
        except (EOFError, OSError, lzma.LZMAError) as err:
            bad(lineno + 1, f"compressed stream ends early ({type(err).__name__}: {err})")


def iter_records(path: str | Path, on_bad: Callable[[BadLine], None] | None = None, strict: bool = False,
                 on_position: Callable[[int], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, JSON object) for every parseable, non-blank line of a JSONL file."""
    bad = _reporter(str(path), on_bad, strict)
    for lineno, line in _iter_lines(str(path), bad, on_position):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad(lineno, f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(record, dict):
            bad(lineno, f"a JSON {type(record).__name__}, not an object")
            continue
        yield lineno, record


def iter_documents(path: str | Path, text_key: str = "text",
                   on_bad: Callable[[BadLine], None] | None = None,
                   strict: bool = False,
                   on_position: Callable[[int], None] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (line number, document text) for every usable line of ``path``.

    Empty documents are yielded too (the caller decides); unusable lines go to ``on_bad``.
    ``on_position`` gets the byte offset reached in the (compressed) file every 1000 lines.
    """
    path = str(path)
    if not is_jsonl(path):
        yield from _iter_lines(path, _reporter(path, on_bad, strict), on_position)
        return
    bad = _reporter(path, on_bad, strict)
    for lineno, record in iter_records(path, on_bad, strict, on_position):
        text = record.get(text_key)
        if not isinstance(text, str):
            bad(lineno, f"field {text_key!r} {'missing' if text_key not in record else 'not a string'}")
            continue
        yield lineno, text
