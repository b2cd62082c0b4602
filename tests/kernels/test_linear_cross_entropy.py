"""Blocked vocab-parallel linear + cross entropy equals the float64 unfused reference."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tests.multiprocess import run_ranks

N, H, V, TRUE_V = 37, 24, 100, 93


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    labels = torch.randint(0, TRUE_V, (N,), generator=gen)
    labels[::5] = -100  # ignored tokens
    grad_out = torch.rand(N, generator=gen)
    return hidden, weight, labels, grad_out


def _reference(hidden, weight, labels, grad_out, z_loss):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss = linear_cross_entropy_reference(h, w, labels, TRUE_V, z_loss=z_loss)
    loss.backward(grad_out.double())
    return loss.detach(), h.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("span", [(40, 77), (0, V), (93, V), (60, 60)], ids=["inside", "all", "padding", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_single_rank_matches_reference(span, z_loss):
    hidden, weight, labels, grad_out = _inputs(0)
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, grad_out, z_loss)
    h = hidden.clone().requires_grad_()
    trainable = torch.nn.Parameter(weight[span[0]:span[1]].clone())
    loss = linear_cross_entropy(h, trainable, weight, labels, 0, TRUE_V, span, z_loss=z_loss)
    loss.backward(grad_out)
    assert _rel(loss, ref_loss) <= 1e-5, "loss"
    assert _rel(h.grad, ref_dh) <= 1e-5, "hidden gradient"
    if span[1] > span[0]:
        assert _rel(trainable.grad, ref_dw[span[0]:span[1]]) <= 1e-5, "trainable weight gradient"
    assert (loss[labels == -100] == 0).all()


def test_many_tiles_match_reference():
    """Shapes that cross the kernels' 64-token and 64-row tiles several times, with ragged edges."""
    gen = torch.Generator().manual_seed(2)
    n, h, v, true_v, span = 150, 40, 300, 290, (130, 290)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 0.3
    labels = torch.randint(0, true_v, (n,), generator=gen)
    labels[::7] = -100
    grad_out = torch.rand(n, generator=gen)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = linear_cross_entropy_reference(hd, wd, labels, true_v, z_loss=1e-4)
    ref.backward(grad_out.double())
    hh, trainable = hidden.clone().requires_grad_(), torch.nn.Parameter(weight[span[0]:span[1]].clone())
    loss = linear_cross_entropy(hh, trainable, weight, labels, 0, true_v, span, z_loss=1e-4)
    loss.backward(grad_out)
    assert _rel(loss, ref.detach()) <= 1e-5, "loss"
    assert _rel(hh.grad, hd.grad) <= 1e-5, "hidden gradient"
    assert _rel(trainable.grad, wd.grad[span[0]:span[1]]) <= 1e-5, "trainable weight gradient"


def _rank_tp(hidden, weight, labels, grad_out, span, z_loss):
    rank = parallel_state.get_tensor_model_parallel_rank()
    rows = V // 2
    start = rank * rows
    local = weight[start:start + rows]
    t0, t1 = min(max(span[0] - start, 0), rows), min(max(span[1] - start, 0), rows)
    t1 = max(t0, t1)
    h = hidden.clone().requires_grad_()
    trainable = torch.nn.Parameter(local[t0:t1].clone())
    loss = linear_cross_entropy(h, trainable, local, labels, start, TRUE_V, (t0, t1), z_loss=z_loss,
                                group=parallel_state.get_tensor_model_parallel_group())
    loss.backward(grad_out)
    return dict(loss=loss.detach(), dh=h.grad, dw=trainable.grad, start=start + t0, stop=start + t1)


@pytest.mark.distributed
def test_tensor_parallel_matches_reference():
    hidden, weight, labels, grad_out = _inputs(1)
    span, z_loss = (45, 93), 1e-3  # boundary inside rank 0's slice, at the start of rank 1's
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, grad_out, z_loss)
    results = run_ranks(_rank_tp, hidden, weight, labels, grad_out, span, z_loss, tp=2)
    for rank, r in enumerate(results):
        assert _rel(r["loss"], ref_loss) <= 1e-5, f"rank {rank}: loss"
        assert _rel(r["dh"], ref_dh) <= 1e-5, f"rank {rank}: hidden gradient"
        assert _rel(r["dw"], ref_dw[r["start"]:r["stop"]]) <= 1e-5, f"rank {rank}: trainable rows' gradient"
    assert [(r["start"], r["stop"]) for r in results] == [(45, 50), (50, 93)]
