"""Output projection + cross entropy over a vocab-parallel weight, one chunk of tokens at a time.

Each tensor-parallel rank holds rows [vocab_start, vocab_start + V_local) of the output weight;
only rows [trainable_start, trainable_stop) of its slice may receive a gradient (stage 1 trains
only the added vocabulary). The [N, V] logits are never built: the tokens are taken in chunks
(1/16 of them, at least 128), and for each chunk

1. a matrix product gives its logits against this rank's slice, [C, V_local];
2. ``lce_chunk_stats`` reduces them to per-token max, sum of exponentials and label logit, which
   are merged across the TP group into the log-sum-exp (max, then the rescaled sums);
3. ``lce_chunk_gradient_`` turns the logits into their gradient in place (softmax − one-hot,
   times the token's weight and the z-loss factor), and a matrix product gives the chunk's
   hidden-state gradient.

The trainable rows' gradient is a float32 accumulator the size of those rows, read and written
whole by every product that adds to it; with one product per chunk of a few hundred tokens that
traffic, not the arithmetic, would bound it on a GPU. Consecutive chunks' logit gradients (the
trainable columns only) are therefore staged until ``WEIGHT_GRADIENT_TOKENS`` tokens are ready,
and added in one product (an extra buffer of at most that many tokens × the trainable columns).

The gradients are thus computed during the forward pass (as Liger-Kernel does), which is why the
op returns the weighted sum of the token losses: its gradient is one number, by which backward
scales them. Per chunk this is the unfused path's three matrix products — on the trainable rows
only for the weight gradient — with no logits-sized tensor and no recomputation.

The two per-chunk steps are torch ops with a C++ kernel for CPU tensors
(``csrc/linear_cross_entropy.cpp``) and Triton kernels for CUDA tensors
(``triton_linear_cross_entropy.py``); the matrix products are BLAS / cuBLAS through torch.
``linear_cross_entropy_reference`` is the unfused definition.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from megatron_adapt import _native
from megatron_adapt.kernels.main_grad import rows_gradient

IGNORED = torch.iinfo(torch.int64).min  # a local label no slice owns and no real label maps to
CHUNKS = 16  # a chunk's logits are 1/16 of the whole: 2-3% of the unfused path's working memory
MIN_CHUNK_TOKENS = 128  # smaller chunks make thin matrix products
# Tokens per product into the fp32 weight gradient: it does 2·K flops per 8 bytes of accumulator
# traffic, so K ≳ 1000 keeps an H100's bf16 GEMM compute-bound.
WEIGHT_GRADIENT_TOKENS = 2048


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


def _cpu_floats(*tensors: torch.Tensor) -> list:
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"the CPU kernel takes float32 logits, got {t.dtype}")
    return [t.contiguous().numpy() for t in tensors]


@torch.library.custom_op("megatron_adapt::lce_chunk_stats", mutates_args=(), device_types="cpu")
def chunk_stats(logits: torch.Tensor, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [C, V_local]: (max, sum of exp(logit − max), logit of its label or 0
    where the label is not in [0, V_local)), float32."""
    (z,) = _cpu_floats(logits)
    out = [torch.empty(logits.shape[0], dtype=torch.float32) for _ in range(3)]
    _native.lce_chunk_stats(z, local_labels.contiguous().numpy(), *(t.numpy() for t in out))
    return tuple(out)


@chunk_stats.register_fake
def _(logits, local_labels):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("megatron_adapt::lce_chunk_gradient_", mutates_args=("logits",), device_types="cpu")
def chunk_gradient_(logits: torch.Tensor, local_labels: torch.Tensor, lse: torch.Tensor,
                    softmax_scale: torch.Tensor, scale: torch.Tensor) -> None:
    """In place: logits → exp(logit − lse) · softmax_scale − [column is the label] · scale."""
    if not logits.is_contiguous():
        raise ValueError("the logits chunk must be contiguous (it is overwritten in place)")
    _native.lce_chunk_gradient(*_cpu_floats(logits), local_labels.contiguous().numpy(),
                               *_cpu_floats(lse, softmax_scale, scale))


def _register_triton() -> None:
    """The CUDA kernels of both ops, where triton is installed (CPU-only machines skip it)."""
    try:
        from megatron_adapt.kernels import triton_linear_cross_entropy as tl_lce
    except ImportError:
        return
    chunk_stats.register_kernel("cuda")(tl_lce.chunk_stats)
    chunk_gradient_.register_kernel("cuda")(tl_lce.chunk_gradient_)


_register_triton()


def chunk_tokens(n: int) -> int:
    """Tokens per chunk for a problem of ``n`` tokens."""
    return max(MIN_CHUNK_TOKENS, math.ceil(n / CHUNKS))


def _merge_across_ranks(max_: torch.Tensor, sum_exp: torch.Tensor, target: torch.Tensor, group):
    """Log-sum-exp and label logit over the whole vocabulary from every rank's partials."""
    if group is not None and dist.get_world_size(group) > 1:
        global_max = max_.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([sum_exp * torch.exp(max_ - global_max), target])
        dist.all_reduce(sums, group=group)
        max_, (sum_exp, target) = global_max, sums
    return max_ + torch.log(sum_exp), target


@functools.cache
def accumulates_into_float32(device_type: str) -> bool:
    """Whether ``torch.addmm`` adds a bf16/fp16 product into a float32 ``out`` here (``out_dtype``:
    torch 2.10 and later; torch 2.8-2.9 refuse the mix, and earlier ones lack the argument)."""
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
    out = torch.zeros(2, 2, device=device_type)
    try:
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except (TypeError, RuntimeError):
        return False
    return bool(out.eq(2).all())


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (float32) += a @ b, for a and b of the model's dtype: the product accumulates in fp32 in
    the GEMM where torch can say so, else from fp32 copies of the operands (never rounded to the
    model's dtype on the way)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif accumulates_into_float32(out.device.type):
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


class _StagedRowsGradient:
    """``grad_rows[:columns] += logit_gradient.T @ hidden`` over consecutive chunks of tokens, in
    products of about ``WEIGHT_GRADIENT_TOKENS`` tokens. Chunks smaller than that have their logit
    gradients copied into a staging buffer; their hidden states are consecutive rows of ``hidden``
    already. Larger chunks go straight to the product."""

    def __init__(self, grad_rows: torch.Tensor, columns: int, hidden: torch.Tensor, chunk: int):
        self.out, self.hidden, self.columns = grad_rows[:columns], hidden, columns
        tokens = min(hidden.shape[0], WEIGHT_GRADIENT_TOKENS)
        self.staged = hidden.new_empty((tokens, columns)) if columns and chunk < tokens else None
        self.start = self.filled = 0

    def add(self, first_token: int, logit_grad: torch.Tensor) -> None:
        n = logit_grad.shape[0]
        if not self.columns:
            return
        if self.staged is None:
            _add_product(self.out, logit_grad.T, self.hidden[first_token:first_token + n])
            return
        if self.filled + n > self.staged.shape[0]:
            self.flush()
        if not self.filled:
            self.start = first_token
        self.staged[self.filled:self.filled + n] = logit_grad
        self.filled += n

    def flush(self) -> None:
        if self.filled:
            _add_product(self.out, self.staged[:self.filled].T, self.hidden[self.start:self.start + self.filled])
            self.filled = 0


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, trainable, weight, labels, token_weights, vocab_start, true_vocab_size, span,
                ignore_index, z_loss, group, reduce_hidden_grad, chunk):
        n = hidden.shape[0]
        valid = max(0, min(weight.shape[0], true_vocab_size - vocab_start))  # the rest is TP padding
        rows = weight[:valid]
        t0, t1 = span[0], max(span[0], min(span[1], valid))
        ignored = labels == ignore_index
        local_labels = torch.where(ignored, IGNORED, labels - vocab_start)
        scale = torch.where(ignored, 0.0, token_weights.float())
        want_hidden, want_rows = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = hidden.new_empty(hidden.shape) if want_hidden else None  # contiguous, filled by chunk
        grad_rows = hidden.new_zeros((span[1] - span[0], hidden.shape[1]), dtype=torch.float32) if want_rows else None
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        buffer = hidden.new_empty((min(n, chunk), valid))  # one chunk's logits, reused: the op's working memory
        staged = _StagedRowsGradient(grad_rows, t1 - t0, hidden, chunk) if want_rows else None
        for c0 in range(0, n, chunk):
            tokens = slice(c0, min(n, c0 + chunk))
            h = hidden[tokens]
            logits = torch.mm(h, rows.T, out=buffer[:h.shape[0]])
            lse, target = _merge_across_ranks(*chunk_stats(logits, local_labels[tokens]), group)
            losses[tokens] = torch.where(ignored[tokens], 0.0, lse - target + z_loss * lse**2)
            if not (want_hidden or want_rows):
                continue
            s = scale[tokens]
            chunk_gradient_(logits, local_labels[tokens], lse, s * (1 + 2 * z_loss * lse), s)
            if want_hidden:
                torch.mm(logits, rows, out=grad_hidden[tokens])
            if staged is not None:
                staged.add(c0, logits[:, t0:t1])
        if staged is not None:
            staged.flush()
        ctx.gradients = grad_hidden, grad_rows  # intermediates, not inputs: kept on ctx so backward can drop them
        ctx.reduce_group = group if reduce_hidden_grad and group is not None and dist.get_world_size(group) > 1 else None
        ctx.dtype, ctx.trainable = weight.dtype, trainable
        ctx.mark_non_differentiable(losses)
        return (losses * scale).sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, _grad_losses):
        if ctx.gradients is None:
            raise RuntimeError("the fused linear cross entropy's backward runs once (its gradients are computed "
                               "in the forward pass and handed over); do not retain its graph")
        # Handed over and scaled in place: autograd can then keep them as .grad without a copy.
        (grad_hidden, grad_rows), ctx.gradients = ctx.gradients, None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_sum.to(grad_hidden.dtype))
            if ctx.reduce_group is not None:
                dist.all_reduce(grad_hidden, group=ctx.reduce_group)
        if grad_rows is not None:
            grad_rows = rows_gradient(ctx.trainable, grad_rows.mul_(grad_sum))
        return (grad_hidden, grad_rows) + (None,) * 11


def linear_cross_entropy(hidden: torch.Tensor, trainable: torch.Tensor, weight: torch.Tensor,
                         labels: torch.Tensor, vocab_start: int, true_vocab_size: int,
                         trainable_span: tuple[int, int], token_weights: torch.Tensor | None = None,
                         ignore_index: int = -100, z_loss: float = 0.0, group=None, reduce_hidden_grad: bool = True,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ token_weights · loss, per-token losses [N]) for hidden [N, H] against this rank's weight
    slice [V_local, H]; only the sum carries gradients.

    ``trainable`` is the Parameter holding rows ``trainable_span`` of the slice (a view of
    ``weight``, as ``model.vocab.VocabRows`` makes it; for a fully trainable layer, the
    weight itself with span (0, V_local)); its gradient is the only weight gradient computed.
    ``labels`` are global ids; ``ignore_index`` tokens get loss 0 and no gradient; ids at or above
    ``true_vocab_size`` (TP padding) are excluded from the softmax. ``token_weights`` default to 1
    (the loss mask, typically). ``chunk`` tokens are processed at a time (default: ``chunk_tokens``).
    Collective over ``group``; the hidden states' gradient is all-reduced over it unless
    ``reduce_hidden_grad`` is false (sequence parallelism: the caller's gather reduce-scatters it).
    """
    if token_weights is None:
        token_weights = torch.ones_like(labels, dtype=torch.float32)
    if not torch.is_grad_enabled():  # validation: the op's gradients are made in its forward, so skip them here
        hidden, trainable = hidden.detach(), trainable.detach()
    return _LinearCrossEntropy.apply(hidden, trainable, weight.detach(), labels, token_weights.detach(), vocab_start,
                                     true_vocab_size, trainable_span, ignore_index, z_loss, group, reduce_hidden_grad,
                                     chunk or chunk_tokens(hidden.shape[0]))
