"""Data blends: which indexed datasets training reads, and with what weight.

A blend names groups (a language, say) with a weight each; a group is one dataset prefix or a
directory of shards. Within a group, each prefix is weighted by its token count, so a group's
share of training tokens is its weight whatever its sharding. The file is JSON:
{"datasets": [{"group", "prefix", "tokens", "weight"}...]}, weights summing to 1, which also
gives megatron-core's ``blend`` (prefixes, weights) directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_adapt.data.indexed import MASK_SUFFIX, read_index


@dataclass(frozen=True)
class BlendEntry:
    group: str
    prefix: str
    tokens: int
    weight: float


def dataset_prefixes(path: str | Path) -> list[Path]:
    """A prefix (PATH.idx exists) or every complete shard in a directory, sorted."""
    path = Path(path)
    if Path(f"{path}.idx").exists():
        return [path]
    if path.is_dir():
        prefixes = sorted(Path(str(p)[: -len(".idx")]) for p in path.glob("*.idx")
                          if not p.name.startswith(".") and not p.name.endswith(f"{MASK_SUFFIX}.idx"))
        if prefixes:
            return prefixes
    raise FileNotFoundError(f"{path}: neither {path}.idx nor a directory of .idx shards")


def make_blend(groups: dict[str, tuple[float, str | Path]]) -> list[BlendEntry]:
    """``groups``: name → (weight, prefix or shard directory)."""
    total_weight = sum(w for w, _ in groups.values())
    if total_weight <= 0:
        raise ValueError("group weights must sum to a positive number")
    entries = []
    for name, (weight, path) in groups.items():
        sizes = {p: int(read_index(f"{p}.idx")[1].sum(dtype="int64")) for p in dataset_prefixes(path)}
        group_tokens = sum(sizes.values())
        if group_tokens == 0:
            raise ValueError(f"group {name}: {path} holds no tokens")
        for prefix, tokens in sizes.items():
            entries.append(BlendEntry(name, str(prefix), tokens, weight / total_weight * tokens / group_tokens))
    return entries


def save_blend(entries: list[BlendEntry], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"datasets": [e.__dict__ for e in entries]}, indent=2))


def load_blend(path: str | Path) -> list[BlendEntry]:
    """Read a blend file, checking that every dataset it names exists."""
    entries = [BlendEntry(**d) for d in json.loads(Path(path).read_text())["datasets"]]
    for e in entries:
        for ext in (".bin", ".idx"):
            if not Path(f"{e.prefix}{ext}").exists():
                raise FileNotFoundError(f"{path}: data prefix {e.prefix} has no {e.prefix}{ext}")
    return entries


def bytes_per_token(entries: list[BlendEntry]) -> dict[str, float]:
    """UTF-8 text bytes per stored token of each group, from the preprocessing stats beside its
    datasets (``text_bytes``, ``tokens``); groups whose stats lack them are left out. Turns a loss
    per token into bits per byte, which compares across tokenizers."""
    totals: dict[str, list[int]] = {}
    missing = set()
    for e in entries:
        path = Path(f"{e.prefix}.stats.json")
        stats = json.loads(path.read_text()) if path.exists() else {}
        if "text_bytes" in stats:
            group = totals.setdefault(e.group, [0, 0])
            group[0] += stats["text_bytes"]
            group[1] += stats["tokens"]
        else:
            missing.add(e.group)
    return {g: b / t for g, (b, t) in totals.items() if g not in missing and t}
