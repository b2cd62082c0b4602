"""Output projection + cross entropy over a vocab-parallel weight, without building the logits.

Each tensor-parallel rank holds rows [vocab_start, vocab_start + V_local) of the output weight;
only rows [trainable_start, trainable_stop) of its slice may receive a gradient (stage 1 trains
only the added vocabulary). The logits [N, V] and their gradient are never materialized: the
forward pass walks the vocabulary in blocks, keeping a running max and sum of exponentials per
token (online log-sum-exp), reduces them across the TP group (max, then rescaled sum) together
with the target logit from the rank that owns it; the backward pass recomputes each block's
logits, turns them into the block's gradient (softmax − one-hot, scaled), and accumulates the
hidden-state gradient (summed over TP) and the weight gradient of trainable rows only.

Peak extra memory is one [N, block] tile instead of [N, V] logits plus their gradient. This is
the plain-PyTorch form of the algorithm (``linear_cross_entropy_reference`` beside it is the
unfused definition); the C++ CPU op and Triton GPU kernels implement the same contract.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, trainable, weight, labels, vocab_start, true_vocab_size, span, ignore_index,
                z_loss, block, group):
        n, v_local = hidden.shape[0], weight.shape[0]
        max_ = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        sum_exp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        target = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        local_label = labels - vocab_start
        owned = (local_label >= 0) & (local_label < v_local) & (labels != ignore_index)
        valid_cols = max(0, min(v_local, true_vocab_size - vocab_start))
        for j in range(0, valid_cols, block):
            logits = (hidden @ weight[j:min(j + block, valid_cols)].T).float()
            new_max = torch.maximum(max_, logits.max(dim=1).values)
            sum_exp = sum_exp * torch.exp(max_ - new_max) + torch.exp(logits - new_max[:, None]).sum(1)
            max_ = new_max
            in_block = owned & (local_label >= j) & (local_label < j + logits.shape[1])
            rows = in_block.nonzero()[:, 0]
            target[rows] = logits[rows, local_label[rows] - j]
        if group is not None and dist.get_world_size(group) > 1:
            global_max = max_.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            sum_exp = sum_exp * torch.exp(max_ - global_max)
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target, group=group)
            max_ = global_max
        lse = max_ + torch.log(sum_exp)
        loss = lse - target + z_loss * lse**2
        ignored = labels == ignore_index
        loss = torch.where(ignored, torch.zeros_like(loss), loss)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.config = (vocab_start, valid_cols, span, ignore_index, z_loss, block, group)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        vocab_start, valid_cols, (t0, t1), ignore_index, z_loss, block, group = ctx.config
        scale = torch.where(labels == ignore_index, torch.zeros_like(grad_loss), grad_loss).float()
        softmax_scale = scale * (1 + 2 * z_loss * lse)
        local_label = labels - vocab_start
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_trainable = torch.zeros((t1 - t0, weight.shape[1]), dtype=torch.float32, device=weight.device)
        for j in range(0, valid_cols, block):
            stop = min(j + block, valid_cols)
            logits = (hidden @ weight[j:stop].T).float()
            grad = torch.exp(logits - lse[:, None]) * softmax_scale[:, None]
            hit = (local_label >= j) & (local_label < stop)
            rows = hit.nonzero()[:, 0]
            grad[rows, local_label[rows] - j] -= scale[rows]
            grad_hidden += grad @ weight[j:stop].float()
            lo, hi = max(j, t0), min(stop, t1)
            if lo < hi:  # only trainable rows get a weight gradient
                grad_trainable[lo - t0:hi - t0] += grad[:, lo - j:hi - j].T @ hidden.float()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(grad_hidden, group=group)
        return (grad_hidden.to(hidden.dtype), grad_trainable.to(weight.dtype), None, None, None, None, None, None,
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, trainable: torch.Tensor, weight: torch.Tensor,
                         labels: torch.Tensor, vocab_start: int, true_vocab_size: int,
                         trainable_span: tuple[int, int], ignore_index: int = -100, z_loss: float = 0.0,
                         block: int = 4096, group=None) -> torch.Tensor:
    """Per-token loss [N] for hidden [N, H] against this rank's weight slice [V_local, H].

    ``trainable`` is the Parameter holding rows ``trainable_span`` of the slice (a view of
    ``weight``, as ``model.freeze.split_vocab_rows`` makes it; for a fully trainable layer, the
    weight itself with span (0, V_local)); its gradient is the only weight gradient computed.
    ``labels`` are global ids; ``ignore_index`` tokens get loss 0 and no gradient; ids at or above
    ``true_vocab_size`` (TP padding) are excluded from the softmax. Collective over ``group``.
    """
    return _LinearCrossEntropy.apply(hidden, trainable, weight.detach(), labels, vocab_start, true_vocab_size,
                                     trainable_span, ignore_index, z_loss, block, group)
