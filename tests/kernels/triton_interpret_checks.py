"""Triton kernels under TRITON_INTERPRET=1 against the float64 references; run as a script by
test_triton_kernels.py (the variable must be set before triton is imported). Each check raises
AssertionError naming what differs."""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from megatron_adapt.kernels import linear_cross_entropy as lce  # noqa: E402
from megatron_adapt.kernels import triton_embedding  # noqa: E402
from megatron_adapt.kernels import triton_linear_cross_entropy as tlce  # noqa: E402
from megatron_adapt.kernels.embedding import vocab_embedding_reference  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_chunk_kernels(dtype: torch.dtype, tolerance: float) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(7, 300, generator=gen) * 8).to(dtype)  # 300: a partial last block of 128
    labels = torch.tensor([0, 299, 17, lce.IGNORED, -1, 300, 128])
    max_, sum_exp, target = tlce.chunk_stats(logits, labels, block=128)
    z = logits.double()
    assert torch.equal(max_.double(), z.max(1).values), f"{dtype} row max"
    assert _rel(sum_exp, torch.exp(z - z.max(1, keepdim=True).values).sum(1)) <= tolerance, f"{dtype} sum of exp"
    owned = (labels >= 0) & (labels < 300)
    expected_target = torch.where(owned, z.gather(1, labels.clamp(0, 299)[:, None])[:, 0], 0.0)
    assert torch.equal(target.double(), expected_target), f"{dtype} label logit"
    lse = torch.logsumexp(z, 1)
    softmax_scale, scale = torch.rand(7, generator=gen), torch.rand(7, generator=gen)
    expected = torch.exp(z - lse[:, None]) * softmax_scale.double()[:, None]
    expected[owned, labels[owned]] -= scale.double()[owned]
    tlce.chunk_gradient_(logits, labels, lse.float(), softmax_scale, scale, block=128)
    assert _rel(logits, expected) <= tolerance, f"{dtype} logits gradient: {_rel(logits, expected):.2e}"


def check_linear_cross_entropy_with_triton_kernels(dtype: torch.dtype, tolerance: float) -> None:
    """The whole chunked op with the Triton kernels in place of the C++ ones (the interpreter runs
    them on CPU tensors): several chunks, ignored tokens, z-loss, TP padding, trainable rows."""
    calls = []

    def counted(kernel):
        def run(*args):
            calls.append(kernel.__name__)
            return kernel(*args)
        return run

    torch.library.register_kernel("megatron_adapt::lce_chunk_stats", "cpu", counted(tlce.chunk_stats))
    torch.library.register_kernel("megatron_adapt::lce_chunk_gradient_", "cpu", counted(tlce.chunk_gradient_))
    gen = torch.Generator().manual_seed(0)
    n, h, v, true_v, span, z_loss = 37, 40, 1100, 1090, (700, 1100), 1e-4
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.4).to(dtype)
    labels = torch.randint(0, true_v, (n,), generator=gen)
    labels[::6] = -100
    token_weights = torch.rand(n, generator=gen)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = lce.linear_cross_entropy_reference(hd, wd, labels, true_v, z_loss=z_loss)
    (ref * token_weights.double()).sum().backward()

    hh, rows = hidden.clone().requires_grad_(), torch.nn.Parameter(weight[span[0]:span[1]].clone())
    loss_sum, losses = lce.linear_cross_entropy(hh, rows, weight, labels, 0, true_v, span,
                                                token_weights=token_weights, z_loss=z_loss, chunk=16)
    loss_sum.backward()
    assert calls.count("chunk_stats") == calls.count("chunk_gradient_") == 3, f"Triton kernels not used: {calls}"
    assert _rel(losses, ref.detach()) <= tolerance, f"{dtype} loss: {_rel(losses, ref.detach()):.2e}"
    assert _rel(hh.grad, hd.grad) <= tolerance, f"{dtype} hidden gradient: {_rel(hh.grad, hd.grad):.2e}"
    expected_rows = wd.grad[span[0]:span[1]]
    assert _rel(rows.grad, expected_rows) <= tolerance, f"{dtype} trainable rows: {_rel(rows.grad, expected_rows):.2e}"
    assert rows.grad[true_v - span[0]:].abs().max() == 0, f"{dtype}: padding rows got a gradient"


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


def check_empty_trainable_slice(dtype: torch.dtype, tolerance: float) -> None:
    """A TP rank whose vocabulary slice holds no added row (LLaMA-2's 32000 base rows cover TP rank
    0's half at TP=2): an empty trainable tensor through both ops' Triton kernels."""
    gen = torch.Generator().manual_seed(2)
    n, h, v, true_v = 20, 24, 300, 300
    hidden, weight = torch.randn(n, h, generator=gen).to(dtype), (torch.randn(v, h, generator=gen) * 0.4).to(dtype)
    labels = torch.randint(0, true_v, (n,), generator=gen)
    torch.library.register_kernel("megatron_adapt::lce_chunk_stats", "cpu", tlce.chunk_stats)
    torch.library.register_kernel("megatron_adapt::lce_chunk_gradient_", "cpu", tlce.chunk_gradient_)
    hh, rows = hidden.clone().requires_grad_(), torch.nn.Parameter(weight[v:].clone())
    loss_sum, losses = lce.linear_cross_entropy(hh, rows, weight, labels, 0, true_v, (v, v), chunk=8)
    loss_sum.backward()
    hd = hidden.double().requires_grad_()
    ref = lce.linear_cross_entropy_reference(hd, weight.double(), labels, true_v)
    ref.sum().backward()
    assert _rel(losses, ref.detach()) <= tolerance and _rel(hh.grad, hd.grad) <= tolerance, f"{dtype}: empty span"
    assert rows.grad is not None and rows.grad.shape == (0, h), f"{dtype}: the empty rows' gradient {rows.grad}"

    ids = torch.randint(0, 100, (2, 9), generator=gen)
    table, empty = torch.randn(100, 70, generator=gen).to(dtype), torch.empty(0, 70, dtype=dtype)
    out = triton_embedding.forward(ids, table, empty, 0, 100, block_n=16, block_h=64)
    assert torch.equal(out, table[ids]), f"{dtype}: embedding with an empty trainable slice"
    grad = triton_embedding.backward(ids, torch.randn(2, 9, 70, generator=gen).to(dtype), 0, 100, 0)
    assert grad.shape == (0, 70), f"{dtype}: embedding gradient of an empty slice has shape {tuple(grad.shape)}"


if __name__ == "__main__":
    check_embedding(torch.float32)
    check_embedding(torch.float16)
    check_chunk_kernels(torch.float32, 1e-5)
    check_chunk_kernels(torch.float16, 2e-3)
    check_linear_cross_entropy_with_triton_kernels(torch.float32, 1e-5)
    check_empty_trainable_slice(torch.float32, 1e-5)
    print("ok", file=sys.stderr)
