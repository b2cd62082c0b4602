"""Write safetensors shards one tensor at a time.

``safetensors.torch.save_file`` needs the whole shard in memory. The format is a little-endian
u64 header length, a JSON header (dtype, shape, byte offsets of every tensor) and the raw bytes,
so when the shapes are known in advance the header goes first and each tensor is fetched, cast,
written and freed in turn: converting a model then needs memory for one tensor, not one shard.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch

from megatron_adapt.atomic import atomic_file

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shard(path: str | Path, names: list[str], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                get: Callable[[str], torch.Tensor], on_tensor: Callable[[], None] | None = None) -> int:
    """Write ``names`` (fetched one at a time with ``get``, cast to ``dtype``) to ``path``; returns bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as safetensors does
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            tensor = get(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"tensor {name}: shape {tuple(tensor.shape)} != planned {shapes[name]}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
            del tensor
            if on_tensor is not None:
                on_tensor()
    return offset
