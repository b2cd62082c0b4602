"""Language-model loss over vocab-parallel logits that ignores the TP padding rows.

megatron-core pads the vocabulary to a multiple of 128·TP and its cross entropy normalizes over
every padded column too, so a padded model's loss differs from the unpadded HF model's. Masking
the padding columns to −inf before the vocab-parallel cross entropy makes them exactly equal.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from megatron_adapt.model.vocab import vocab_slice_start


def mask_vocab_padding(logits: torch.Tensor, true_vocab_size: int) -> torch.Tensor:
    """Set this rank's logits for ids ≥ true_vocab_size to −inf (last dim is the vocab slice)."""
    local = logits.shape[-1]
    start = vocab_slice_start(local)
    n_pad = start + local - true_vocab_size
    if n_pad <= 0:
        return logits
    keep = torch.arange(local, device=logits.device) < (local - min(n_pad, local))
    return logits.masked_fill(~keep, float("-inf"))


def token_losses(logits: torch.Tensor, labels: torch.Tensor, true_vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy [b, s] from vocab-parallel logits [b, s, v/tp] in fp32.

    Like megatron-core's own loss, this may overwrite fp32 ``logits`` in place (its cross entropy
    subtracts the max and exponentiates in the input's storage) to save a logits-sized buffer.
    """
    masked = mask_vocab_padding(logits.float(), true_vocab_size)
    return tensor_parallel.vocab_parallel_cross_entropy(masked, labels)


def masked_sum(losses: torch.Tensor, loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses where the mask is 1, number of such tokens), as megatron-core's schedule
    expects from a loss function that reports its own token count."""
    if loss_mask is None:
        return losses.sum(), torch.tensor(losses.numel(), dtype=torch.int)
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum(), mask.sum().to(torch.int)
