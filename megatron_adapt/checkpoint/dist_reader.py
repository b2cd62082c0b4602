"""HF tensors read one at a time from a training checkpoint, without building the model.

A training checkpoint (``train_state.py``) is a megatron-core distributed checkpoint.
Exporting a 7B model should not need a 7B model in memory: this reader loads just the slice of a
global tensor that one layer's HF tensors come from, so peak memory is one layer's tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_adapt.checkpoint.format import WEIGHTS_DIST, CheckpointMeta, in_adapter_checkpoint, weights_kind
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.lora import LoraConfig
from megatron_adapt.model.weights import (
    CheckpointMismatchError,
    Rule,
    checkpoint_rules,
    hf_from_shards,
    hf_shapes,
    shard_from_hf,
)


class DistCheckpointReader:
    """``reader[hf_name]`` for a complete ``iter_NNNNNNN`` directory. Needs a (one-process)
    torch.distributed group, as megatron-core's loader does.

    A LoRA run's checkpoint (``meta.adapters_only``) holds its adapters (PEFT names, ``lora``
    says their rank, alpha and targets) and the vocabulary tables; its base is its start's."""

    def __init__(self, checkpoint: str | Path) -> None:
        if weights_kind(checkpoint) != "dist":
            raise ValueError(f"{checkpoint}: a converted start (HF shards), not a training checkpoint")
        self.checkpoint = Path(checkpoint)
        self.directory = self.checkpoint / WEIGHTS_DIST
        self.arch = LlamaArchitecture.from_hf_config(checkpoint)
        self.meta = CheckpointMeta.read(checkpoint)
        self.adapters_only = self.meta.adapters_only
        self.lora = LoraConfig(**self.meta.lora) if self.meta.lora else None
        self.shapes = hf_shapes(self.arch, self.lora)
        self.stored = dist_checkpointing.load_tensors_metadata(str(self.directory))
        self.sources: dict[str, tuple[str, int | None, Rule, int]] = {}
        for key, layer, rule in checkpoint_rules(self.arch, self.lora):
            if key in self.stored:
                self._check_shape(key, layer, rule)
                self.sources.update({hf: (key, layer, rule, j) for j, hf in enumerate(rule.hf_names)})
        for key, layer, rule in checkpoint_rules(self.arch, self.lora):
            if self.adapters_only and not in_adapter_checkpoint(key):
                continue  # the frozen base lives in the run's start
            missing = [hf for hf in rule.hf_names if hf not in self.sources]
            if missing:
                raise CheckpointMismatchError(f"{self.directory}: no tensor for {missing[0]} (no {key})")
        self._cached: tuple[tuple[str, int | None], list[torch.Tensor]] | None = None

    def _check_shape(self, key: str, layer: int | None, rule: Rule) -> None:
        stored = tuple(self.stored[key].global_shape)
        if layer is not None:
            if stored[0] != self.arch.num_layers:
                raise CheckpointMismatchError(f"{key}: {stored[0]} layers stored, config.json says {self.arch.num_layers}")
            stored = stored[1:]
        empty = [torch.empty(self.shapes[hf], device="meta") for hf in rule.hf_names]
        padded = max(stored[0], self.arch.vocab_size) if rule.layout == "vocab_rows" else 0
        expected = tuple(shard_from_hf(rule, empty, self.arch, padded, 0, 1).shape)
        if stored != expected:
            raise CheckpointMismatchError(f"{key}: stored shape {stored} != {expected} implied by config.json")

    def _load(self, key: str, layer: int | None) -> torch.Tensor:
        """The stored tensor, or for a layer tensor the slice of that layer."""
        meta = self.stored[key]
        shape = tuple(meta.global_shape) if layer is None else (1, *meta.global_shape[1:])
        offset = (0 if layer is None else layer,) + (0,) * (len(shape) - 1)
        target = ShardedTensor(key=key, data=torch.empty(shape, dtype=meta.dtype), dtype=meta.dtype, local_shape=shape,
                               global_shape=tuple(meta.global_shape), global_offset=offset, axis_fragmentations=None,
                               replica_id=0)
        # A slice is not the whole tensor, which megatron-core's access check would refuse.
        loaded = dist_checkpointing.load({"tensor": target}, str(self.directory), validate_access_integrity=False)
        return loaded["tensor"] if layer is None else loaded["tensor"][0]

    def __getitem__(self, hf_name: str) -> torch.Tensor:
        key, layer, rule, index = self.sources[hf_name]
        if self._cached is None or self._cached[0] != (key, layer):
            self._cached = ((key, layer), hf_from_shards(rule, [self._load(key, layer)], self.arch))
        return self._cached[1][index]
