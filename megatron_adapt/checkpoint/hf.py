"""Read and write Hugging Face LLaMA checkpoints (safetensors, sharded with an index).

Reading opens only the shard that holds a requested tensor, so a rank loads just the tensors of
its pipeline stage. Writing produces one shard per pipeline stage from that stage's TP-rank 0,
each written under a temporary name and renamed; the index, written last by global rank 0, is
what makes the directory a complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_adapt.atomic import atomic_file, write_text
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.weights import export_hf_state, load_hf_state

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"


class CorruptCheckpointError(ValueError):
    """A safetensors file that cannot be read (truncated, say)."""


def _open(path: Path):
    try:
        return safe_open(path, "pt")
    except Exception as err:  # safetensors raises its own error type for damaged headers
        raise CorruptCheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:  # memory-mapped: a shard's tensors are read from disk as they are used
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise CorruptCheckpointError(f"{path}: unreadable PyTorch checkpoint ({err})") from None


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory by name.

    Safetensors shards are opened per tensor; PyTorch ``.bin`` shards (older checkpoints) are
    memory-mapped, one shard at a time.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._bin_cache: tuple[str, dict[str, torch.Tensor]] | None = None
        for index_name, single in ((INDEX_NAME, SINGLE_NAME), (BIN_INDEX_NAME, BIN_SINGLE_NAME)):
            if (self.directory / index_name).exists():
                weight_map = json.loads((self.directory / index_name).read_text())["weight_map"]
                break
            if (self.directory / single).exists():
                keys = _open(self.directory / single).keys() if single == SINGLE_NAME else \
                    _load_bin(self.directory / single).keys()
                weight_map = {k: single for k in keys}
                break
        else:
            raise FileNotFoundError(f"{self.directory}: no {INDEX_NAME}, {SINGLE_NAME}, {BIN_INDEX_NAME} "
                                    f"or {BIN_SINGLE_NAME} found")
        self.weight_map: dict[str, str] = weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self.directory / self.weight_map[name]  # KeyError names the tensor
        if not shard.exists():
            raise FileNotFoundError(f"{shard}: shard listed in the index for {name} is missing")
        if shard.suffix != ".bin":
            return _open(shard).get_tensor(name)
        if self._bin_cache is None or self._bin_cache[0] != shard.name:
            self._bin_cache = (shard.name, _load_bin(shard))
        return self._bin_cache[1][name].clone()


def load_hf_checkpoint(model: torch.nn.Module, directory: str | Path) -> None:
    """Load this rank's piece of ``model`` from an HF checkpoint directory."""
    load_hf_state(model, HFCheckpointReader(directory).__getitem__)


def save_hf_checkpoint(model: torch.nn.Module, directory: str | Path,
                       dtype: torch.dtype | None = None) -> None:
    """Write the whole model as an HF checkpoint. Collective over all ranks."""
    directory = Path(directory)
    arch: LlamaArchitecture = model.architecture
    state = export_hf_state(model)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    writer = (parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0)
    shard_name = f"model-{pp_rank + 1:05d}-of-{pp_size:05d}.safetensors"
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / shard_name) as tmp:
            save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}, tmp,
                      metadata={"format": "pt"})
    written = ({k: (shard_name, v.numel() * (v.to(dtype) if dtype else v).element_size())
                for k, v in state.items()} if writer else {})
    gathered: list[dict[str, tuple[str, int]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, written)
    if dist.get_rank() == 0:
        entries = {k: v for part in gathered for k, v in part.items()}
        config = arch.to_hf_config()
        if dtype is not None:
            config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        index = {"metadata": {"total_size": sum(size for _, size in entries.values())},
                 "weight_map": {k: entries[k][0] for k in sorted(entries)}}
        write_text(directory / INDEX_NAME, json.dumps(index, indent=2))
    dist.barrier()
