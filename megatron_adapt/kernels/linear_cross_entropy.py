"""Output projection + cross entropy over a vocab-parallel weight, without building the logits.

Each tensor-parallel rank holds rows [vocab_start, vocab_start + V_local) of the output weight;
only rows [trainable_start, trainable_stop) of its slice may receive a gradient (stage 1 trains
only the added vocabulary). The logits [N, V] and their gradient are never materialized: the
forward pass walks the vocabulary in tiles, keeping a running max and sum of exponentials per
token (online log-sum-exp), reduces them across the TP group (max, then rescaled sum) together
with the target logit from the rank that owns it; the backward pass recomputes each tile's
logits, turns them into the tile's gradient (softmax − one-hot, scaled), and accumulates the
hidden-state gradient (summed over TP) and the weight gradient of trainable rows only.

The two per-rank steps are torch ops (``megatron_adapt::lce_lse_partials``,
``megatron_adapt::lce_backward``) with a C++ kernel for CPU tensors (``csrc/linear_cross_entropy.cpp``)
and Triton kernels for CUDA tensors (``triton_linear_cross_entropy.py``); the TP reductions sit
between them here. ``linear_cross_entropy_reference`` is the unfused definition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_adapt import _native


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   true_vocab_size: int, ignore_index: int = -100,
                                   z_loss: float = 0.0) -> torch.Tensor:
    """Per-token loss from the full (unsharded) weight: the unfused definition."""
    logits = hidden @ weight.T
    logits[:, true_vocab_size:] = float("-inf")
    lse = torch.logsumexp(logits, dim=-1)
    safe = labels.clamp(0, weight.shape[0] - 1)
    loss = lse - logits.gather(1, safe[:, None])[:, 0] + z_loss * lse**2
    return torch.where(labels == ignore_index, torch.zeros_like(loss), loss)


def _cpu_inputs(*tensors: torch.Tensor) -> list:
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"the CPU kernel takes float32 hidden states and weights, got {t.dtype}")
    return [t.detach().contiguous().numpy() for t in tensors]


@torch.library.custom_op("megatron_adapt::lce_lse_partials", mutates_args=(), device_types="cpu")
def lse_partials(hidden: torch.Tensor, weight: torch.Tensor, local_labels: torch.Tensor,
                 valid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over rows [0, valid) of this slice: (max logit, sum of exp(logit − max), logit
    of its label or 0 where the label is not in [0, valid))."""
    h, w = _cpu_inputs(hidden, weight)
    out = [torch.empty(hidden.shape[0], dtype=torch.float32) for _ in range(3)]
    _native.lce_lse_partials(h, w, local_labels.contiguous().numpy(), valid, *(t.numpy() for t in out))
    return tuple(out)


@lse_partials.register_fake
def _(hidden, weight, local_labels, valid):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("megatron_adapt::lce_backward", mutates_args=(), device_types="cpu")
def lce_backward(hidden: torch.Tensor, weight: torch.Tensor, local_labels: torch.Tensor, valid: int,
                 lse: torch.Tensor, softmax_scale: torch.Tensor, scale: torch.Tensor, t0: int,
                 t1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of hidden [N, H], gradient of rows [t0, t1) of the slice), both float32, for the
    per-token loss gradient ``scale`` given the global log-sum-exp ``lse``; ``softmax_scale`` is
    ``scale`` times the z-loss factor."""
    h, w = _cpu_inputs(hidden, weight)
    grad_hidden = torch.empty(hidden.shape, dtype=torch.float32)
    grad_rows = torch.empty((t1 - t0, weight.shape[1]), dtype=torch.float32)
    _native.lce_backward(h, w, local_labels.contiguous().numpy(), valid, lse.contiguous().numpy(),
                         softmax_scale.contiguous().numpy(), scale.contiguous().numpy(), t0, t1,
                         grad_hidden.numpy(), grad_rows.numpy())
    return grad_hidden, grad_rows


@lce_backward.register_fake
def _(hidden, weight, local_labels, valid, lse, softmax_scale, scale, t0, t1):
    return (hidden.new_empty(hidden.shape, dtype=torch.float32),
            hidden.new_empty((t1 - t0, weight.shape[1]), dtype=torch.float32))


def _register_triton() -> None:
    """The CUDA kernels of both ops, where triton is installed (CPU-only machines skip it)."""
    try:
        from megatron_adapt.kernels import triton_linear_cross_entropy as tl_lce
    except ImportError:
        return
    lse_partials.register_kernel("cuda")(tl_lce.lse_partials)
    lce_backward.register_kernel("cuda")(tl_lce.backward)


_register_triton()


_IGNORED = torch.iinfo(torch.int64).min  # a local label no slice owns and no real label maps to


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, trainable, weight, labels, vocab_start, true_vocab_size, span, ignore_index,
                z_loss, group):
        valid = max(0, min(weight.shape[0], true_vocab_size - vocab_start))
        local_labels = torch.where(labels == ignore_index, _IGNORED, labels - vocab_start)
        max_, sum_exp, target = lse_partials(hidden, weight, local_labels, valid)
        if group is not None and dist.get_world_size(group) > 1:
            global_max = max_.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            sum_exp = sum_exp * torch.exp(max_ - global_max)
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target, group=group)
            max_ = global_max
        lse = max_ + torch.log(sum_exp)
        loss = lse - target + z_loss * lse**2
        loss = torch.where(labels == ignore_index, torch.zeros_like(loss), loss)
        ctx.save_for_backward(hidden, weight, local_labels, lse)
        ctx.config = (valid, span, z_loss, group)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_labels, lse = ctx.saved_tensors
        valid, (t0, t1), z_loss, group = ctx.config
        scale = torch.where(local_labels == _IGNORED, 0.0, grad_loss.float())
        softmax_scale = scale * (1 + 2 * z_loss * lse)
        grad_hidden, grad_rows = lce_backward(hidden, weight, local_labels, valid, lse, softmax_scale, scale, t0, t1)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(grad_hidden, group=group)
        return (grad_hidden.to(hidden.dtype), grad_rows.to(weight.dtype), None, None, None, None, None, None,
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, trainable: torch.Tensor, weight: torch.Tensor,
                         labels: torch.Tensor, vocab_start: int, true_vocab_size: int,
                         trainable_span: tuple[int, int], ignore_index: int = -100, z_loss: float = 0.0,
                         group=None) -> torch.Tensor:
    """Per-token loss [N] for hidden [N, H] against this rank's weight slice [V_local, H].

    ``trainable`` is the Parameter holding rows ``trainable_span`` of the slice (a view of
    ``weight``, as ``model.freeze.split_vocab_rows`` makes it; for a fully trainable layer, the
    weight itself with span (0, V_local)); its gradient is the only weight gradient computed.
    ``labels`` are global ids; ``ignore_index`` tokens get loss 0 and no gradient; ids at or above
    ``true_vocab_size`` (TP padding) are excluded from the softmax. Collective over ``group``.
    """
    return _LinearCrossEntropy.apply(hidden, trainable, weight.detach(), labels, vocab_start, true_vocab_size,
                                     trainable_span, ignore_index, z_loss, group)
