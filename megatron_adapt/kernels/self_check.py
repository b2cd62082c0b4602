"""Whether the fused vocabulary kernels can be trusted on this machine: both ops run on a small
random problem against their plain-PyTorch references.

The kernels exist for CUDA tensors (Triton) and float32 CPU tensors (C++); CI can only run the
Triton kernels under the interpreter, so a GPU run checks them here before relying on them.
"""

from __future__ import annotations

import logging

import torch

from megatron_adapt import distributed
from megatron_adapt.kernels.embedding import vocab_embedding, vocab_embedding_reference
from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

log = logging.getLogger(__name__)


class FusedKernelsFailed(RuntimeError):
    """The fused vocabulary kernels failed their check on this machine and no fallback was allowed."""


def use_fused_vocab(dtype: torch.dtype, allow_fallback: bool = False) -> bool:
    """Whether this run's model uses the fused kernels; collective, the same answer on every rank.

    On CPU the C++ kernels take float32 only (other dtypes keep megatron-core's layers: expected,
    logged). On GPUs each rank checks the Triton kernels (``self_check``) and the ranks agree:
    if any fails, all fail, since ranks disagreeing on the loss would pair mismatched
    collectives and hang. A failure stops the run naming it, unless ``allow_fallback``."""
    if not torch.cuda.is_available():
        if dtype != torch.float32:
            log.info("fused vocabulary kernels not used: on the CPU they take float32 tensors, not %s", dtype)
        return dtype == torch.float32
    return agree_on_check(checked_problem("cuda", dtype), allow_fallback)


def checked_problem(device: str, dtype: torch.dtype) -> str | None:
    """``self_check``'s finding, or the error the kernels raised (one that cannot run here is as
    unusable as a wrong one)."""
    try:
        return self_check(device, dtype)
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"


def agree_on_check(problem: str | None, allow_fallback: bool) -> bool:
    """True on every rank when no rank found a ``problem``; otherwise False everywhere (with
    ``allow_fallback``) or ``FusedKernelsFailed`` raised on every rank."""
    if not distributed.any_rank(problem is not None):
        return True
    reason = problem or "another rank's check failed"
    if allow_fallback:
        log.warning("fused vocabulary kernels disabled (model.fused_vocab_fallback): %s", reason)
        return False
    raise FusedKernelsFailed(f"model.fused_vocab: the fused vocabulary kernels failed their self-check on this "
                             f"machine ({reason}); set model.fused_vocab=false for megatron-core's layers, or "
                             "model.fused_vocab_fallback=true to fall back to them when this happens")


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
