"""Read and write Hugging Face LLaMA checkpoints (safetensors, sharded with an index).

Reading opens only the shard that holds a requested tensor, so a rank loads just the tensors of
its pipeline stage. Writing produces one shard per pipeline stage from that stage's TP-rank 0,
each written under a temporary name and renamed; the index, written last by global rank 0, is
what makes the directory a complete checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.weights import export_hf_state, load_hf_state

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CorruptCheckpointError(ValueError):
    """A safetensors file that cannot be read (truncated, say)."""


def _open(path: Path):
    try:
        return safe_open(path, "pt")
    except Exception as err:  # safetensors raises its own error type for damaged headers
        raise CorruptCheckpointError(f"{path}: unreadable safetensors file ({err})") from None


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory by name."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_NAME).exists():
            weight_map = {k: SINGLE_NAME for k in _open(self.directory / SINGLE_NAME).keys()}
        else:
            raise FileNotFoundError(f"{self.directory}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self.weight_map: dict[str, str] = weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self.directory / self.weight_map[name]  # KeyError names the tensor
        if not shard.exists():
            raise FileNotFoundError(f"{shard}: shard listed in {INDEX_NAME} for {name} is missing")
        return _open(shard).get_tensor(name)


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
              and parallel_state.get_data_parallel_rank() == 0)
    shard_name = f"model-{pp_rank + 1:05d}-of-{pp_size:05d}.safetensors"
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{shard_name}.tmp"
        save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}, tmp,
                  metadata={"format": "pt"})
        os.replace(tmp, directory / shard_name)
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
        tmp = directory / f".{INDEX_NAME}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, directory / INDEX_NAME)
    dist.barrier()
