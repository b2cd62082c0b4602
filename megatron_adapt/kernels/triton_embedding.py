"""Triton kernels of the two-table vocab-range embedding (the CUDA side of ``embedding.py``).

Forward: one program per (block of tokens, block of the hidden dimension) picks each token's row
from the trainable table, the whole slice, or zeros. Backward: the same grid adds each token's
gradient into its trainable row with fp32 atomic adds (rows repeat across tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(id_ptr, table_ptr, trainable_ptr, out_ptr, n_tokens, hidden_size, start, rows, t0, t_rows,
                    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: offsets can pass 2^31
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok, col_ok = tokens < n_tokens, cols < hidden_size
    row = tl.load(id_ptr + tokens, mask=token_ok, other=-1) - start
    in_trainable = (row >= t0) & (row < t0 + t_rows)
    in_table = (row >= 0) & (row < rows) & ~in_trainable
    mask = token_ok[:, None] & col_ok[None, :]
    from_trainable = tl.load(trainable_ptr + (row - t0)[:, None] * hidden_size + cols[None, :],
                             mask=mask & in_trainable[:, None], other=0.0)
    from_table = tl.load(table_ptr + row[:, None] * hidden_size + cols[None, :], mask=mask & in_table[:, None],
                         other=0.0)
    tl.store(out_ptr + tokens[:, None] * hidden_size + cols[None, :], from_trainable + from_table, mask=mask)


@triton.jit
def _backward_kernel(id_ptr, grad_out_ptr, grad_ptr, n_tokens, hidden_size, start, t0, t_rows,
                     BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok, col_ok = tokens < n_tokens, cols < hidden_size
    row = tl.load(id_ptr + tokens, mask=token_ok, other=-1) - start - t0
    mask = token_ok[:, None] & col_ok[None, :] & ((row >= 0) & (row < t_rows))[:, None]
    grad = tl.load(grad_out_ptr + tokens[:, None] * hidden_size + cols[None, :], mask=mask, other=0.0)
    tl.atomic_add(grad_ptr + row[:, None] * hidden_size + cols[None, :], grad.to(tl.float32), mask=mask)


def forward(ids: torch.Tensor, table: torch.Tensor, trainable: torch.Tensor, start: int, t0: int,
            block_n: int = 32, block_h: int = 128) -> torch.Tensor:
    flat = ids.contiguous().view(-1)
    table, trainable = table.contiguous(), trainable.contiguous()
    out = torch.empty((flat.numel(), table.shape[1]), dtype=table.dtype, device=table.device)
    grid = (triton.cdiv(flat.numel(), block_n), triton.cdiv(table.shape[1], block_h))
    # A TP rank without added rows has an empty trainable slice, whose null pointer Triton refuses;
    # no row of it is read (t_rows is 0), so the table's pointer stands in.
    trainable_or_any = trainable if trainable.numel() else table
    _forward_kernel[grid](flat, table, trainable_or_any, out, flat.numel(), table.shape[1], start, table.shape[0], t0,
                          trainable.shape[0], BLOCK_N=block_n, BLOCK_H=block_h)
    return out.view(*ids.shape, table.shape[1])


def backward(ids: torch.Tensor, grad_out: torch.Tensor, start: int, t0: int, rows: int,
             block_n: int = 32, block_h: int = 128) -> torch.Tensor:
    flat = ids.contiguous().view(-1)
    grad = grad_out.contiguous().view(flat.numel(), -1)
    grad_rows = torch.zeros((rows, grad.shape[1]), dtype=torch.float32, device=grad.device)
    if rows == 0:  # no trainable row on this rank: nothing to accumulate (and no pointer to give Triton)
        return grad_rows
    grid = (triton.cdiv(flat.numel(), block_n), triton.cdiv(grad.shape[1], block_h))
    _backward_kernel[grid](flat, grad, grad_rows, flat.numel(), grad.shape[1], start, t0, rows,
                           BLOCK_N=block_n, BLOCK_H=block_h)
    return grad_rows
