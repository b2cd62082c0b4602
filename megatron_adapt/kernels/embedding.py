"""Vocab-range embedding lookup: the rows of one tensor-parallel vocabulary slice.

A rank that owns vocabulary rows [start, start + rows) looks up the ids it owns and writes zeros
for the rest; summing over the TP group gives the full embedding. megatron-core does this with
four tensor ops (mask, shift, gather, zero). ``vocab_range_embedding`` is one torch op whose CPU
implementation is the C++ kernel in ``csrc/vocab_embedding.cpp`` (one pass, deterministic
backward); ``vocab_range_embedding_reference`` beside it is the plain-PyTorch definition.
"""

from __future__ import annotations

import torch

from megatron_adapt import _native


def vocab_range_embedding_reference(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    local = ids - start
    owned = (local >= 0) & (local < weight.shape[0])
    out = torch.nn.functional.embedding(local.clamp(0, weight.shape[0] - 1), weight)
    return out * owned.unsqueeze(-1).to(out.dtype)


def _check(ids: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dtype != torch.float32 or ids.dtype != torch.int64:
        raise TypeError(f"CPU kernel takes int64 ids and float32 weights, got {ids.dtype}, {weight.dtype}")


@torch.library.custom_op("megatron_adapt::vocab_range_embedding", mutates_args=())
def vocab_range_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """[*, hidden] rows of ``weight`` for ids in [start, start + rows), zeros elsewhere."""
    _check(ids, weight)
    flat = ids.detach().contiguous().view(-1)
    out = weight.new_empty((flat.numel(), weight.shape[1]))
    _native.vocab_embedding_forward(flat.numpy(), weight.detach().contiguous().numpy(), start, out.numpy())
    return out.view(*ids.shape, weight.shape[1])


@vocab_range_embedding.register_fake
def _(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("megatron_adapt::vocab_range_embedding_backward", mutates_args=())
def vocab_range_embedding_backward(ids: torch.Tensor, grad_out: torch.Tensor, start: int,
                                   rows: int) -> torch.Tensor:
    flat = ids.detach().contiguous().view(-1)
    grad_weight = grad_out.new_zeros((rows, grad_out.shape[-1]))
    grad = grad_out.detach().contiguous().view(flat.numel(), -1)
    _native.vocab_embedding_backward(flat.numpy(), grad.numpy(), start, grad_weight.numpy())
    return grad_weight


def _setup_context(ctx, inputs, output) -> None:
    ids, weight, start = inputs
    ctx.save_for_backward(ids)
    ctx.start, ctx.rows = start, weight.shape[0]


def _backward(ctx, grad_out: torch.Tensor):
    (ids,) = ctx.saved_tensors
    return None, vocab_range_embedding_backward(ids, grad_out.float(), ctx.start, ctx.rows), None


vocab_range_embedding.register_autograd(_backward, setup_context=_setup_context)
