"""Vocab-range embedding lookup over two tables: the frozen slice and its trainable rows.

A tensor-parallel rank owns vocabulary rows [start, start + rows). Stage 1 trains only the added
rows, which ``model.vocab.VocabRows`` keeps as a separate Parameter (``trainable``, rows
[t0, t0 + len) of the slice) beside the whole slice (``table``, read for the frozen rows). The
lookup writes each owned id's row — from ``trainable`` if it is one of those rows — and zeros for
ids of other ranks (the TP all-reduce sums the ranks); backward accumulates into the trainable
rows only, so no gradient the size of the frozen table is ever made. In stage 2 ``trainable`` is
the whole slice. One torch op each way, with the C++ kernel of ``csrc/vocab_embedding.cpp`` for
CPU tensors (deterministic backward) and Triton kernels for CUDA tensors
(``triton_embedding.py``); ``vocab_embedding_reference`` is the plain-PyTorch definition.
"""

from __future__ import annotations

import torch

from megatron_adapt import _native
from megatron_adapt.kernels.main_grad import rows_gradient


def vocab_embedding_reference(ids: torch.Tensor, table: torch.Tensor, trainable: torch.Tensor, start: int,
                              t0: int) -> torch.Tensor:
    weight = torch.cat([table[:t0].detach(), trainable, table[t0 + trainable.shape[0]:].detach()])
    local = ids - start
    owned = (local >= 0) & (local < weight.shape[0])
    out = torch.nn.functional.embedding(local.clamp(0, weight.shape[0] - 1), weight)
    return out * owned.unsqueeze(-1).to(out.dtype)


def _check(ids: torch.Tensor, *tables: torch.Tensor) -> None:
    if ids.dtype != torch.int64 or any(t.dtype != torch.float32 for t in tables):
        raise TypeError(f"CPU kernel takes int64 ids and float32 tables, got {ids.dtype}, "
                        f"{', '.join(str(t.dtype) for t in tables)}")


@torch.library.custom_op("megatron_adapt::vocab_embedding", mutates_args=(), device_types="cpu")
def vocab_embedding(ids: torch.Tensor, table: torch.Tensor, trainable: torch.Tensor, start: int,
                    t0: int) -> torch.Tensor:
    """[*, hidden]: row ``id - start`` of the slice for owned ids (rows [t0, t0 + len) from
    ``trainable``), zeros elsewhere."""
    _check(ids, table, trainable)
    flat = ids.detach().contiguous().view(-1)
    out = table.new_empty((flat.numel(), table.shape[1]))
    _native.vocab_embedding_forward(flat.numpy(), table.detach().contiguous().numpy(),
                                    trainable.detach().contiguous().numpy(), start, t0, out.numpy())
    return out.view(*ids.shape, table.shape[1])


@vocab_embedding.register_fake
def _(ids, table, trainable, start, t0):
    return table.new_empty((*ids.shape, table.shape[1]))


@torch.library.custom_op("megatron_adapt::vocab_embedding_backward", mutates_args=(), device_types="cpu")
def vocab_embedding_backward(ids: torch.Tensor, grad_out: torch.Tensor, start: int, t0: int,
                             rows: int) -> torch.Tensor:
    """Gradient [rows, hidden] of the trainable rows (float32)."""
    flat = ids.detach().contiguous().view(-1)
    grad_rows = grad_out.new_zeros((rows, grad_out.shape[-1]), dtype=torch.float32)
    grad = grad_out.detach().float().contiguous().view(flat.numel(), -1)
    _native.vocab_embedding_backward(flat.numpy(), grad.numpy(), start, t0, grad_rows.numpy())
    return grad_rows


@vocab_embedding_backward.register_fake
def _(ids, grad_out, start, t0, rows):
    return grad_out.new_empty((rows, grad_out.shape[-1]), dtype=torch.float32)


def _register_triton() -> None:
    try:
        from megatron_adapt.kernels import triton_embedding
    except ImportError:  # no triton on this machine: CPU only
        return
    vocab_embedding.register_kernel("cuda")(triton_embedding.forward)
    vocab_embedding_backward.register_kernel("cuda")(triton_embedding.backward)


_register_triton()


def _setup_context(ctx, inputs, output) -> None:
    ids, table, trainable, start, t0 = inputs
    ctx.save_for_backward(ids)
    ctx.start, ctx.t0, ctx.rows, ctx.trainable = start, t0, trainable.shape[0], trainable


def _backward(ctx, grad_out: torch.Tensor):
    (ids,) = ctx.saved_tensors
    grad = rows_gradient(ctx.trainable, vocab_embedding_backward(ids, grad_out, ctx.start, ctx.t0, ctx.rows))
    return None, None, grad, None, None


vocab_embedding.register_autograd(_backward, setup_context=_setup_context)
