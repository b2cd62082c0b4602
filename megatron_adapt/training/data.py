"""Training data: megatron-core's GPTDataset over a blend, with target-only loss where marked.

``TargetMaskedGPTDataset`` is megatron-core's GPTDataset plus one thing: when a dataset prefix has
a ``PREFIX_targetmask`` companion (written by tools/preprocess_data.py for translation and
instruction data), the mask is read through the very same document/sample/shuffle indices, so it
lines up with the tokens of every sample, and the loss mask keeps only target tokens.

With ``per_document_attention`` a sample also carries ``segment_ids``: which of the documents
packed into it each token belongs to, read through those same indices (a view whose "tokens"
mark where documents start), so attention can stay within a document. The boundaries come from
the index, not from EOD tokens: a chat template puts EOS inside a conversation, after every
assistant turn, and a conversation's later turns must see its earlier ones.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_adapt.data.blend import BlendEntry
from megatron_adapt.data.indexed import MASK_SUFFIX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:
        """Part of the key of megatron-core's index caches."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


@dataclass
class AdaptDatasetConfig(GPTDatasetConfig):
    per_document_attention: bool = False
    """Samples carry ``segment_ids`` (see the module docstring)."""


class _DocumentStarts:
    """Stands in for an IndexedDataset: a document's "tokens" are 1 at its first token, else 0."""

    def __init__(self, dataset: IndexedDataset) -> None:
        self.sequence_lengths = dataset.sequence_lengths

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        n = self.sequence_lengths[idx] - offset if length is None else length
        starts = np.zeros(n, dtype=np.int64)
        starts[:1] = offset == 0
        return starts


class TargetMaskedGPTDataset(GPTDataset):
    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self._mask_view = self._starts_view = None
        if dataset_path and Path(f"{dataset_path}{MASK_SUFFIX}.idx").exists():
            self._mask_view = copy.copy(self)
            self._mask_view.dataset = IndexedDataset(f"{dataset_path}{MASK_SUFFIX}", mmap=config.mmap_bin_files)
        if getattr(config, "per_document_attention", False):
            self._starts_view = copy.copy(self)
            self._starts_view.dataset = _DocumentStarts(self.dataset)

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        if self._mask_view is not None and idx is not None:
            mask, _ = self._mask_view._query_document_sample_shuffle_indices(idx)
            target = torch.from_numpy(np.asarray(mask) == 1)
            sample["loss_mask"] = sample["loss_mask"] * target[1:].to(sample["loss_mask"].dtype)
        if self._starts_view is not None:
            starts, _ = self._starts_view._query_document_sample_shuffle_indices(0 if idx is None else idx)
            sample["segment_ids"] = torch.from_numpy(np.cumsum(np.asarray(starts)[:-1] == 1, dtype=np.int32))
        return sample


def dataset_config(seq_length: int, seed: int, split: str, tokenizer: DatasetTokenizer, cache_dir: str,
                   blend: tuple[list[str], list[float]] | None = None, blend_per_split: list | None = None,
                   per_document_attention: bool = False) -> AdaptDatasetConfig:
    return AdaptDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, blend_per_split=blend_per_split,
        split=split if blend is not None else None, tokenizer=tokenizer, path_to_cache=cache_dir,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mmap_bin_files=True, per_document_attention=per_document_attention)


def _build(config: GPTDatasetConfig, sizes: list[int]):
    """Build on global rank 0 first (it writes the index caches), then on the others."""
    def build():
        return BlendedMegatronDatasetBuilder(TargetMaskedGPTDataset, sizes, lambda: True, config).build()

    if dist.is_initialized() and dist.get_world_size() > 1:
        datasets = build() if dist.get_rank() == 0 else None
        dist.barrier()
        return datasets if datasets is not None else build()
    return build()


def build_datasets(entries: list[BlendEntry], seq_length: int, seed: int, split: str, train_samples: int,
                   eval_samples: int, tokenizer: DatasetTokenizer, cache_dir: str,
                   per_document_attention: bool = False):
    """(train dataset over the whole blend, {group: validation dataset})."""
    prefixes, weights = [e.prefix for e in entries], [e.weight for e in entries]
    train, _, _ = _build(dataset_config(seq_length, seed, split, tokenizer, cache_dir, (prefixes, weights),
                                        per_document_attention=per_document_attention), [train_samples, 0, 0])
    valid = {}
    for group in dict.fromkeys(e.group for e in entries):
        members = [e for e in entries if e.group == group]
        config = dataset_config(seq_length, seed, split, tokenizer, cache_dir,
                                ([e.prefix for e in members], [e.weight for e in members]),
                                per_document_attention=per_document_attention)
        _, valid[group], _ = _build(config, [0, eval_samples, 0])
    return train, valid


def micro_batches(dataset, start: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch that begins at sample ``start``: steps take
    samples in a fixed order, so the data position of a run is one number (consumed samples)."""
    per_rank = global_batch_size // dp_size
    first = start + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch_size):
        samples = [dataset[first + m * micro_batch_size + k] for k in range(micro_batch_size)]
        keys = [k for k in ("tokens", "labels", "loss_mask", "segment_ids") if k in samples[0]]
        batch = {key: torch.stack([s[key] for s in samples]) for key in keys}
        out.append({k: v.pin_memory() for k, v in batch.items()} if torch.cuda.is_available() else batch)
    return out
