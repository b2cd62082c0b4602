"""Chunked vocab-parallel linear + cross entropy (C++ kernels on CPU) equals the float64 unfused reference."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from megatron_adapt.kernels.linear_cross_entropy import (
    IGNORED,
    chunk_gradient_,
    chunk_stats,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from tests.multiprocess import run_ranks

N, H, V, TRUE_V = 37, 24, 100, 93
OUTER = 2.5  # the loss sum's own gradient (megatron scales by 1 / micro-batches): backward must apply it


def _inputs(seed: int, n=N, h=H, v=V, true_v=TRUE_V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    labels = torch.randint(0, true_v, (n,), generator=gen)
    labels[::5] = -100  # ignored tokens
    token_weights = torch.rand(n, generator=gen)  # a loss mask, generalized
    return hidden, weight, labels, token_weights


def _reference(hidden, weight, labels, token_weights, z_loss, true_v=TRUE_V):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss = linear_cross_entropy_reference(h, w, labels, true_v, z_loss=z_loss)
    (OUTER * (loss * token_weights.double()).sum()).backward()
    return loss.detach(), h.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fused(hidden, weight, labels, token_weights, span, z_loss, chunk, true_v=TRUE_V, vocab_start=0, group=None):
    h = hidden.clone().requires_grad_()
    trainable = torch.nn.Parameter(weight[span[0]:span[1]].clone())
    loss_sum, losses = linear_cross_entropy(h, trainable, weight, labels, vocab_start, true_v, span,
                                            token_weights=token_weights, z_loss=z_loss, group=group, chunk=chunk)
    (OUTER * loss_sum).backward()
    return loss_sum.detach(), losses, h.grad, trainable.grad


@pytest.mark.parametrize("chunk", [8, 256], ids=["5-chunks", "1-chunk"])
@pytest.mark.parametrize("span", [(40, 77), (0, V), (93, V), (60, 60)], ids=["inside", "all", "padding", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_single_rank_matches_reference(span, z_loss, chunk):
    hidden, weight, labels, token_weights = _inputs(0)
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, token_weights, z_loss)
    loss_sum, losses, dh, dw = _fused(hidden, weight, labels, token_weights, span, z_loss, chunk)
    assert _rel(losses, ref_loss) <= 1e-5, "per-token loss"
    assert _rel(loss_sum, (ref_loss * token_weights.double()).sum()) <= 1e-5, "weighted loss sum"
    assert _rel(dh, ref_dh) <= 1e-5, "hidden gradient"
    if span[1] > span[0]:
        assert _rel(dw, ref_dw[span[0]:span[1]]) <= 1e-5, "trainable weight gradient"
    if span[1] > TRUE_V:
        assert dw[TRUE_V - span[0]:].abs().max() == 0, "TP padding rows must get no gradient"
    assert (losses[labels == -100] == 0).all(), "ignored tokens must have loss 0"


@pytest.mark.parametrize("staged_tokens, products", [(20, 3), (8, 5), (4096, 1)],
                         ids=["two-chunks-a-product", "chunk-sized", "all-in-one"])
def test_weight_gradient_is_added_in_few_large_products(monkeypatch, staged_tokens, products):
    """Chunks of 8 tokens (37 in all) are staged into products of up to ``staged_tokens`` tokens:
    the fp32 accumulator is read that many times, not once per chunk, and the gradient is unchanged."""
    from megatron_adapt.kernels import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "WEIGHT_GRADIENT_TOKENS", staged_tokens)
    calls = []
    original = lce._add_product
    monkeypatch.setattr(lce, "_add_product", lambda out, a, b: (calls.append(b.shape[0]), original(out, a, b))[1])
    hidden, weight, labels, token_weights = _inputs(1)
    _, _, ref_dw = _reference(hidden, weight, labels, token_weights, 0.0)
    *_, dw = _fused(hidden, weight, labels, token_weights, (40, 77), 0.0, chunk=8)
    assert _rel(dw, ref_dw[40:77]) <= 1e-5, "trainable weight gradient"
    assert len(calls) == products and sum(calls) == N, f"tokens per weight-gradient product: {calls}"


def test_wide_vocabulary_matches_reference():
    """Rows wider than the C++ kernel's 2048-column blocks, with the max moving between blocks,
    logits low enough that exp underflows to 0, and a ragged last chunk."""
    hidden, weight, labels, token_weights = _inputs(2, n=150, h=16, v=4500, true_v=4490)
    weight[:, 0] = torch.linspace(-3, 3, 4500)  # logits grow across the row for tokens with hidden[:, 0] > 0
    hidden[:7, 0] = 40.0  # spreads of ~240 between a token's smallest and largest logit
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, token_weights, 1e-4, true_v=4490)
    span = (3000, 4490)
    _, losses, dh, dw = _fused(hidden, weight, labels, token_weights, span, 1e-4, chunk=64, true_v=4490)
    assert _rel(losses, ref_loss) <= 1e-5, "per-token loss"
    assert _rel(dh, ref_dh) <= 1e-5, "hidden gradient"
    assert _rel(dw, ref_dw[span[0]:span[1]]) <= 1e-5, "trainable weight gradient"


def test_chunk_kernels_match_float64():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 2100, generator=gen) * 30  # exp(logit - max) spans far below float32's range
    labels = torch.tensor([0, 2099, 17, IGNORED, -1, 2100, 5, 2048, 2047])
    max_, sum_exp, target = chunk_stats(logits, labels)
    z = logits.double()
    assert torch.equal(max_, logits.max(1).values), "row max"
    assert _rel(sum_exp, torch.exp(z - z.max(1, keepdim=True).values).sum(1)) <= 1e-6, "sum of exp"
    owned = (labels >= 0) & (labels < 2100)
    expected_target = torch.where(owned, logits.gather(1, labels.clamp(0, 2099)[:, None])[:, 0], 0.0)
    assert torch.equal(target, expected_target), "label logit (0 where another slice owns the label)"

    lse = torch.logsumexp(z, 1)
    softmax_scale, scale = torch.rand(9, generator=gen), torch.rand(9, generator=gen)
    expected = torch.exp(z - lse[:, None]) * softmax_scale.double()[:, None]
    expected[owned, labels[owned]] -= scale.double()[owned]
    chunk_gradient_(logits, labels, lse.float(), softmax_scale, scale)
    assert _rel(logits, expected) <= 1e-5, "gradient of the logits chunk"  # lse rounded to fp32: ~2e-6


def test_no_grad_forward_computes_losses_only(monkeypatch):
    """Under torch.no_grad (validation) the op computes no gradient, though its inputs require one:
    its gradients are made in the forward pass, where autograd's needs_input_grad still says yes."""
    from megatron_adapt.kernels import linear_cross_entropy as lce

    hidden, weight, labels, token_weights = _inputs(4)
    hidden.requires_grad_()
    trainable = torch.nn.Parameter(weight.clone())
    calls = []
    original = lce.chunk_gradient_
    monkeypatch.setattr(lce, "chunk_gradient_", lambda *args: (calls.append(1), original(*args))[1])
    with torch.no_grad():
        loss_sum, losses = linear_cross_entropy(hidden, trainable, weight, labels, 0, TRUE_V, (0, V), chunk=8)
    assert _rel(losses, linear_cross_entropy_reference(hidden.double(), weight.double(), labels, TRUE_V)) <= 1e-5
    assert not loss_sum.requires_grad
    assert not calls, f"{len(calls)} chunks' gradients computed under no_grad"
    linear_cross_entropy(hidden, trainable, weight, labels, 0, TRUE_V, (0, V), chunk=8)
    assert calls, "the gradient kernel is not where this test counts it"


def test_strided_hidden_states():
    """Hidden states that are a transposed view (as [s, b, h] → [b, s, h] can be) give the same result."""
    hidden, weight, labels, token_weights = _inputs(6)
    ref_loss, ref_dh, _ = _reference(hidden, weight, labels, token_weights, 0.0)
    h = hidden.T.contiguous().T.requires_grad_()
    assert not h.is_contiguous()
    loss_sum, losses = linear_cross_entropy(h, torch.nn.Parameter(weight.clone()), weight, labels, 0, TRUE_V,
                                            (0, V), token_weights=token_weights, chunk=8)
    (OUTER * loss_sum).backward()
    assert _rel(losses, ref_loss) <= 1e-5, "per-token loss"
    assert _rel(h.grad, ref_dh) <= 1e-5, "hidden gradient"


def test_second_backward_is_refused():
    hidden, weight, labels, _ = _inputs(5)
    h = hidden.clone().requires_grad_()
    loss_sum, _ = linear_cross_entropy(h, torch.nn.Parameter(weight.clone()), weight, labels, 0, TRUE_V, (0, V))
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss_sum.backward()


def _rank_tp(hidden, weight, labels, token_weights, span, z_loss):
    rank = parallel_state.get_tensor_model_parallel_rank()
    rows = V // 2
    start = rank * rows
    local = weight[start:start + rows]
    t0, t1 = min(max(span[0] - start, 0), rows), min(max(span[1] - start, 0), rows)
    t1 = max(t0, t1)
    loss_sum, losses, dh, dw = _fused(hidden, local, labels, token_weights, (t0, t1), z_loss, chunk=16,
                                      vocab_start=start, group=parallel_state.get_tensor_model_parallel_group())
    return dict(loss_sum=loss_sum, losses=losses, dh=dh, dw=dw, start=start + t0, stop=start + t1)


@pytest.mark.distributed
def test_tensor_parallel_matches_reference():
    hidden, weight, labels, token_weights = _inputs(1)
    span, z_loss = (45, 93), 1e-3  # boundary inside rank 0's slice, at the start of rank 1's
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, token_weights, z_loss)
    results = run_ranks(_rank_tp, hidden, weight, labels, token_weights, span, z_loss, tp=2)
    for rank, r in enumerate(results):
        assert _rel(r["losses"], ref_loss) <= 1e-5, f"rank {rank}: per-token loss"
        assert _rel(r["loss_sum"], (ref_loss * token_weights.double()).sum()) <= 1e-5, f"rank {rank}: loss sum"
        assert _rel(r["dh"], ref_dh) <= 1e-5, f"rank {rank}: hidden gradient"
        assert _rel(r["dw"], ref_dw[r["start"]:r["stop"]]) <= 1e-5, f"rank {rank}: trainable rows' gradient"
    assert [(r["start"], r["stop"]) for r in results] == [(45, 50), (50, 93)]
