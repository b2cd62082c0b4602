"""The language-model loss, both ways the last stage can compute it: (sum over target tokens,
tokens counted), as megatron-core's schedule takes it from a loss function.

- From vocab-parallel logits (megatron-core's output layer): megatron-core pads the vocabulary to
  a multiple of 128·TP and its cross entropy normalizes over every padded column too, so a padded
  model's loss differs from the unpadded HF model's. Masking the padding columns to −inf before
  the vocab-parallel cross entropy makes them exactly equal.
- From the final hidden states (``fused_vocab``): ``kernels.linear_cross_entropy`` applies the
  output weight chunk by chunk, with no [tokens, vocab] logits and a weight gradient only for the
  trainable rows. Losses and gradients equal the first way's (tested).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy
from megatron_adapt.model.vocab import vocab_slice_start, vocab_tables


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
        return losses.sum(), torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum(), mask.sum().to(torch.int)


def fused_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the masked token losses, number of tokens it counts) from the final hidden states
    [b, s, h] (last stage), as ``masked_sum`` gives them for logits."""
    layer = model.output_layer.table
    table, trainable, span = vocab_tables(layer)
    mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    loss_sum, _ = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), trainable, table, labels.reshape(-1),
                                       layer.vocab_start, model.true_vocab_size, span, token_weights=mask.reshape(-1),
                                       group=parallel_state.get_tensor_model_parallel_group(),
                                       reduce_hidden_grad=not model.output_layer.sequence_parallel)
    return loss_sum, mask.sum().to(torch.int)
