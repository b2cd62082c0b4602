"""Whether the fused vocabulary kernels can be trusted on this machine: both ops run on a small
random problem against their plain-PyTorch references.

The kernels exist for CUDA tensors (Triton) and float32 CPU tensors (C++); CI can only run the
Triton kernels under the interpreter, so a GPU run checks them here before relying on them.
"""

from __future__ import annotations

import logging

import torch

from megatron_adapt.kernels.embedding import vocab_embedding, vocab_embedding_reference
from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

log = logging.getLogger(__name__)


def fused_vocab_supported(dtype: torch.dtype) -> bool:
    """float32 on CPU (the C++ kernels); on GPUs the Triton kernels, once they pass ``self_check``."""
    if not torch.cuda.is_available():
        return dtype == torch.float32
    try:
        problem = self_check("cuda", dtype)
    except Exception as error:  # noqa: BLE001 - a kernel that cannot run here is as unusable as a wrong one
        problem = f"{type(error).__name__}: {error}"
    if problem:
        log.warning("fused vocabulary kernels disabled on this GPU: %s", problem)
    return problem is None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def self_check(device: str, dtype: torch.dtype) -> str | None:
    """Run both fused ops on a small random problem on ``device`` against their plain-PyTorch
    references in float64; returns what differs, or None. Milliseconds; CI can only run the Triton
    kernels under the interpreter, so a GPU run checks them before relying on them."""
    gen = torch.Generator().manual_seed(0)
    n, h, v, true_v, span = 96, 64, 320, 300, (200, 300)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(device, dtype)
    labels = torch.randint(0, true_v, (n,), generator=gen).to(device)
    labels[::7] = -100
    trainable = weight[span[0]:span[1]].clone().requires_grad_()
    loss_sum, loss = linear_cross_entropy(hidden, trainable, weight, labels, 0, true_v, span, chunk=40)
    loss_sum.backward()
    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.double().requires_grad_()
    reference = linear_cross_entropy_reference(hidden64, weight64, labels, true_v)
    reference.sum().backward()

    rows = weight[span[0]:span[1]].clone().requires_grad_()
    embedded = vocab_embedding(labels.clamp(min=0), weight, rows, 0, span[0])
    embedded.backward(torch.ones_like(embedded))
    rows64 = rows.detach().double().requires_grad_()
    expected = vocab_embedding_reference(labels.clamp(min=0), weight.double(), rows64, 0, span[0])
    expected.backward(torch.ones_like(expected))

    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    checks = {"loss": (loss.detach(), reference.detach()), "hidden gradient": (hidden.grad, hidden64.grad),
              "trainable rows' gradient": (trainable.grad, weight64.grad[span[0]:span[1]]),
              "embedding": (embedded, expected.detach()), "embedding gradient": (rows.grad, rows64.grad)}
    for name, (got, want) in checks.items():
        error = _rel(got, want)
        if not error <= tolerance:
            return f"{name} differs from the reference by {error:.1e} ({dtype})"
    return None
