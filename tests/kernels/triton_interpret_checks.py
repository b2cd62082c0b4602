"""Triton kernels under TRITON_INTERPRET=1 against the float64 references; run as a script by
test_triton_kernels.py (the variable must be set before triton is imported). Each check raises
AssertionError naming what differs."""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from megatron_adapt.kernels import triton_embedding  # noqa: E402
from megatron_adapt.kernels import triton_linear_cross_entropy as tlce  # noqa: E402
from megatron_adapt.kernels.embedding import vocab_embedding_reference  # noqa: E402
from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy_reference  # noqa: E402

IGNORED = torch.iinfo(torch.int64).min
BLOCKS = dict(block_n=16, block_v=32, block_k=16)  # small shapes still span several tiles


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_linear_cross_entropy(dtype: torch.dtype, tolerance: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n, h, v, true_v, vocab_start, span = 37, 40, 70, 60, 0, (25, 64)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.4).to(dtype)
    labels = torch.randint(0, true_v, (n,), generator=gen)
    labels[::6] = -100
    grad_out = torch.rand(n, generator=gen)
    z_loss = 1e-4
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = linear_cross_entropy_reference(hd, wd, labels, true_v, z_loss=z_loss)
    ref.backward(grad_out.double())

    valid = true_v - vocab_start
    local = torch.where(labels == -100, IGNORED, labels - vocab_start)
    max_, sum_exp, target = tlce.lse_partials(hidden, weight, local, valid, **BLOCKS)
    lse = max_ + torch.log(sum_exp)
    loss = torch.where(labels == -100, 0.0, lse - target + z_loss * lse**2)
    assert _rel(loss, ref.detach()) <= tolerance, f"{dtype} loss: {_rel(loss, ref.detach()):.2e}"
    scale = torch.where(labels == -100, 0.0, grad_out)
    grad_h, grad_rows = tlce.backward(hidden, weight, local, valid, lse, scale * (1 + 2 * z_loss * lse), scale,
                                      *span, **BLOCKS)
    assert _rel(grad_h, hd.grad) <= tolerance, f"{dtype} hidden gradient: {_rel(grad_h, hd.grad):.2e}"
    expected_rows = wd.grad[span[0]:span[1]]  # rows 60..63 are padding: zero gradient
    assert _rel(grad_rows, expected_rows) <= tolerance, f"{dtype} trainable rows: {_rel(grad_rows, expected_rows):.2e}"
    assert grad_rows[true_v - span[0]:].abs().max() == 0, f"{dtype}: padding rows got a gradient"


def check_embedding(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    start, rows, t0, t1, hidden = 30, 40, 12, 33, 150  # 150: a partial hidden block
    ids = torch.randint(0, 100, (3, 29), generator=gen)
    ids[0, :4] = torch.tensor([start, start + rows - 1, start + t0, start + t1])
    table = torch.randn(rows, hidden, generator=gen).to(dtype)
    trainable = (table[t0:t1].float() + 1).to(dtype)
    grad_out = torch.randn(3, 29, hidden, generator=gen).to(dtype)
    out = triton_embedding.forward(ids, table, trainable, start, t0, block_n=16, block_h=64)
    trainable64 = trainable.double().requires_grad_()
    ref = vocab_embedding_reference(ids, table.double(), trainable64, start, t0)
    assert torch.equal(out.double(), ref), f"{dtype} embedding forward differs from the reference"
    (ref_grad,) = torch.autograd.grad(ref, trainable64, grad_out.double())
    grad = triton_embedding.backward(ids, grad_out, start, t0, t1 - t0, block_n=16, block_h=64)
    assert _rel(grad, ref_grad) <= 1e-6, f"{dtype} embedding gradient: {_rel(grad, ref_grad):.2e}"


if __name__ == "__main__":
    check_embedding(torch.float32)
    check_embedding(torch.float16)
    check_linear_cross_entropy(torch.float32, 1e-5)
    check_linear_cross_entropy(torch.float16, 2e-2)
    print("ok", file=sys.stderr)
