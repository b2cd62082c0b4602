"""Triton kernels of the fused output projection + cross entropy: the CUDA side of the two
per-chunk torch ops in ``linear_cross_entropy.py`` (same contract as the C++ CPU kernels).

The chunk's logits come from cuBLAS in the model's dtype; both kernels read them once, compute in
fp32 and, for the gradient, write back in place in the same dtype. ``_stats_kernel``: one program
per token walks its row in blocks, keeping a running max and sum of exponentials (online
log-sum-exp). ``_gradient_kernel``: one program per (token, block of the row).

Tested on CPU under ``TRITON_INTERPRET=1`` (fp32 and fp16; the interpreter's bf16 is unsupported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(logits_ptr, label_ptr, max_ptr, sum_ptr, target_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: tokens x vocabulary can pass 2^31
    base = logits_ptr + row * vocab
    running_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, z)
        scale_old = tl.where(running_max == new_max, 1.0, tl.exp(running_max - new_max))
        running_sum = running_sum * scale_old + tl.where(z == float("-inf"), 0.0, tl.exp(z - new_max))
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    lane_scale = tl.where(running_max == float("-inf"), 0.0, tl.exp(running_max - row_max))
    tl.store(max_ptr + row, row_max)
    tl.store(sum_ptr + row, tl.sum(running_sum * lane_scale, axis=0))
    label = tl.load(label_ptr + row)
    owned = (label >= 0) & (label < vocab)
    target = tl.load(base + tl.where(owned, label, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(target_ptr + row, target)


@triton.jit
def _gradient_kernel(logits_ptr, label_ptr, lse_ptr, softmax_scale_ptr, scale_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < vocab
    ptrs = logits_ptr + row * vocab + cols
    z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    label = tl.load(label_ptr + row)
    grad = tl.exp(z - tl.load(lse_ptr + row)) * tl.load(softmax_scale_ptr + row)
    grad -= tl.where(cols == label, tl.load(scale_ptr + row), 0.0)
    tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=ok)


def chunk_stats(logits: torch.Tensor, local_labels: torch.Tensor, block: int = 1024):
    logits = logits.contiguous()
    n, vocab = logits.shape
    out = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3)]
    if n:
        _stats_kernel[(n,)](logits, local_labels.contiguous(), *out, vocab, BLOCK=block)
    return tuple(out)


def chunk_gradient_(logits: torch.Tensor, local_labels: torch.Tensor, lse: torch.Tensor,
                    softmax_scale: torch.Tensor, scale: torch.Tensor, block: int = 1024) -> None:
    if not logits.is_contiguous():
        raise ValueError("the logits chunk must be contiguous (it is overwritten in place)")
    n, vocab = logits.shape
    if n and vocab:
        _gradient_kernel[(n, triton.cdiv(vocab, block))](logits, local_labels.contiguous(), lse.contiguous(),
                                                         softmax_scale.contiguous(), scale.contiguous(), vocab,
                                                         BLOCK=block)
