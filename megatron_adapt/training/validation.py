"""Validation during training: the loss per blend group on held-out samples, and its bits per
UTF-8 byte where the group's preprocessing stats give bytes per token (a per-token loss does not
compare across tokenizers; bits per byte does, and matches ``tools/evaluate.py``)."""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from megatron_adapt.distributed import data_parallel_loss
from megatron_adapt.training.config import Config
from megatron_adapt.training.data import micro_batches
from megatron_adapt.training.step import forward_backward


def validate(model, valid_sets: dict, config: Config, iteration: int,
             bytes_per_token: dict[str, float] | None = None) -> dict[str, float]:
    """Validation loss per blend group over ``eval_steps`` global batches (different ones each round),
    and ``valid_bpb/<group>`` for groups in ``bytes_per_token``."""
    out = {}
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    gbs, steps = config.train.global_batch_size, config.train.eval_steps
    round_index = iteration // config.train.eval_interval - 1
    model.eval()
    with torch.no_grad():
        for group, dataset in valid_sets.items():
            if dataset is None:
                continue
            losses = []
            for k in range(steps):
                start = ((round_index * steps + k) * gbs) % max(len(dataset) - gbs + 1, 1)
                batches = micro_batches(dataset, start, gbs, config.train.micro_batch_size, dp_rank, dp_size)
                losses.append(forward_backward(model, batches, forward_only=True))
            if losses[0] is not None:
                loss = data_parallel_loss(sum(losses[1:], losses[0]))
                out[f"valid_loss/{group}"] = loss
                if bytes_per_token and group in bytes_per_token:
                    out[f"valid_bpb/{group}"] = loss / math.log(2) / bytes_per_token[group]
    model.train()
    return out
