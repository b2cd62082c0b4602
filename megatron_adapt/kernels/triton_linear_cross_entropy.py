"""Triton kernels of the fused output projection + cross entropy (the CUDA side of the two torch
ops in ``linear_cross_entropy.py``; same contract as the C++ CPU kernels).

``_lse_kernel``: one program per block of tokens walks the vocabulary slice in tiles, computing
each logits tile with ``tl.dot`` over the hidden dimension and folding it into a running max and
sum of exponentials (online log-sum-exp) and the label's logit. ``_backward_kernel``: one program
per (token block, vocabulary tile) recomputes that logits tile, forms its gradient
(softmax · s − one-hot · t) and adds ``g @ W`` into the hidden-state gradient and, only if the
tile holds trainable rows, ``gᵀ @ h`` into their gradient, both fp32 with atomic adds (Cut
Cross-Entropy's layout). No [N, V] tensor is ever allocated.

Tested on CPU under ``TRITON_INTERPRET=1`` (fp32 and fp16; the interpreter's bf16 ``tl.dot`` is
wrong); fp32 uses IEEE dot products, so fp32 results match the float64 reference to 1e-5.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, hidden_size,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden_size
        h = tl.load(h_ptr + rows[:, None] * hidden_size + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * hidden_size + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(h, tl.trans(w), input_precision=PRECISION)
    return acc


@triton.jit
def _lse_kernel(h_ptr, w_ptr, label_ptr, max_ptr, sum_ptr, target_ptr, n_tokens, hidden_size, valid,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: offsets can pass 2^31
    row_ok = rows < n_tokens
    labels = tl.load(label_ptr + rows, mask=row_ok, other=-1)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, valid, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < valid
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, hidden_size, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target += tl.sum(tl.where(labels[:, None] == cols[None, :], logits, 0.0), axis=1)
    tl.store(max_ptr + rows, running_max, mask=row_ok)
    tl.store(sum_ptr + rows, running_sum, mask=row_ok)
    tl.store(target_ptr + rows, target, mask=row_ok)


@triton.jit
def _backward_kernel(h_ptr, w_ptr, label_ptr, lse_ptr, softmax_scale_ptr, scale_ptr, grad_h_ptr, grad_w_ptr,
                     n_tokens, hidden_size, valid, t0, t1,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: offsets can pass 2^31
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < n_tokens, cols < valid
    logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, hidden_size, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
    labels = tl.load(label_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    softmax_scale = tl.load(softmax_scale_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    grad = tl.exp(logits - lse[:, None]) * softmax_scale[:, None]
    grad -= tl.where(labels[:, None] == cols[None, :], scale[:, None], 0.0)
    grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0).to(h_ptr.dtype.element_ty)
    trainable = col_ok & (cols >= t0) & (cols < t1)
    has_trainable = tl.sum(trainable.to(tl.int32), axis=0) > 0
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden_size
        w = tl.load(w_ptr + cols[:, None] * hidden_size + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        grad_h = tl.dot(grad, w, input_precision=PRECISION)
        tl.atomic_add(grad_h_ptr + rows[:, None] * hidden_size + ks[None, :], grad_h,
                      mask=row_ok[:, None] & k_ok[None, :])
        if has_trainable:
            h = tl.load(h_ptr + rows[:, None] * hidden_size + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            grad_w = tl.dot(tl.trans(grad), h, input_precision=PRECISION)
            tl.atomic_add(grad_w_ptr + (cols[:, None] - t0) * hidden_size + ks[None, :], grad_w,
                          mask=trainable[:, None] & k_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lse_partials(hidden: torch.Tensor, weight: torch.Tensor, local_labels: torch.Tensor, valid: int,
                 block_n: int = 64, block_v: int = 128, block_k: int = 64):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    out = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    _lse_kernel[(triton.cdiv(n, block_n),)](hidden, weight, local_labels.contiguous(), *out, n, h, valid,
                                            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k,
                                            PRECISION=_precision(hidden.dtype))
    return tuple(out)


def backward(hidden: torch.Tensor, weight: torch.Tensor, local_labels: torch.Tensor, valid: int, lse: torch.Tensor,
             softmax_scale: torch.Tensor, scale: torch.Tensor, t0: int, t1: int,
             block_n: int = 64, block_v: int = 128, block_k: int = 64):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    grad_hidden = torch.zeros((n, h), dtype=torch.float32, device=hidden.device)
    grad_rows = torch.zeros((t1 - t0, h), dtype=torch.float32, device=hidden.device)
    if valid > 0:
        grid = (triton.cdiv(n, block_n), triton.cdiv(valid, block_v))
        _backward_kernel[grid](hidden, weight, local_labels.contiguous(), lse.contiguous(),
                               softmax_scale.contiguous(), scale.contiguous(), grad_hidden, grad_rows,
                               n, h, valid, t0, t1, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k,
                               PRECISION=_precision(hidden.dtype))
    return grad_hidden, grad_rows
