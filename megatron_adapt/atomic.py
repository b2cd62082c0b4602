"""Outputs that appear whole or not at all.

Every tool writes under a temporary name beside its output and renames it into place last, so a
run that fails or is killed leaves nothing that looks complete, and never damages what an earlier
run wrote until the new output is whole. The temporary names start with a dot and contain
``.tmp``, so ``remove_stale`` (and a reader listing outputs) can tell them apart.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def temporary_name(path: str | Path) -> Path:
    """A name beside ``path`` for its half-written version (unique to this process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; it replaces ``path`` when the block
    ends without an error, and is deleted when it raises."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty directory beside ``path`` to build it in; it replaces ``path`` (and what
    was there) when the block ends without an error, and is deleted when it raises. A parent that
    cannot be written is refused naming ``path``."""
    out = Path(path)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=parent))
    except OSError as err:
        raise PermissionError(f"{out}: cannot write there ({err.strerror})") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(path: str | Path) -> None:
    """Delete what runs that failed or were killed left while writing ``path`` (any process's)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
