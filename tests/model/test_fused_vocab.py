"""The fused vocabulary kernels in the model give megatron-core's losses and gradients, for
stage 1 (added rows only, boundary inside a rank's slice) and stage 2, at TP=2 and PP=2, with
separate and with tied embedding and output weights, with and without sequence parallelism."""

from __future__ import annotations

import pytest
import torch

from megatron_adapt.kernels.self_check import self_check
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
from megatron_adapt.model.weights import export_hf_grads
from megatron_adapt.training.step import forward_backward
from tests.multiprocess import run_ranks, sum_sequence_parallel_grads

VOCAB, BASE, SEQ = 300, 200, 16  # TP=2 pads to 512 rows: rank 0 holds 0..255, so new rows start inside it


def _rank_compare(policy: str, tied: bool, sequence_parallel: bool) -> dict:
    """Losses and gradients of megatron-core's path, then the fused one, then (with sequence
    parallelism) megatron-core's path under it, all from the same weights."""
    arch = LlamaArchitecture(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
    torch.manual_seed(0)
    freeze = FreezePolicy(train=policy)
    sp = {"sequence_parallel": sequence_parallel}
    models = [build_llama(arch, seq_length=SEQ, first_trainable_row=freeze.first_trainable_row(BASE)),
              build_llama(arch, seq_length=SEQ, first_trainable_row=freeze.first_trainable_row(BASE), fused_vocab=True, **sp)]
    if sequence_parallel:
        models.append(build_llama(arch, seq_length=SEQ, first_trainable_row=freeze.first_trainable_row(BASE), **sp))
    gen = torch.Generator().manual_seed(1)
    batches = [{"tokens": torch.randint(0, VOCAB, (2, SEQ), generator=gen),
                "labels": torch.randint(0, VOCAB, (2, SEQ), generator=gen),
                "loss_mask": (torch.rand(2, SEQ, generator=gen) > 0.2).long()} for _ in range(2)]
    losses, grads = [], []
    for model in models:
        model.load_state_dict(models[0].state_dict())
        apply_freeze_policy(model, freeze)
        loss = forward_backward(model, batches)
        losses.append(loss.mean if loss else None)
        sum_sequence_parallel_grads(model)
        grads.append(export_hf_grads(model))
    return {"losses": losses, "grads": grads}


@pytest.mark.distributed
@pytest.mark.parametrize("policy,tp,pp,tied,sp", [
    ("new_vocab_rows", 2, 1, False, False), ("all", 2, 1, False, False), ("new_vocab_rows", 1, 2, False, False),
    ("new_vocab_rows", 2, 1, True, False), ("all", 1, 2, True, False),
    ("new_vocab_rows", 2, 1, False, True), ("all", 2, 1, True, True)])
def test_fused_equals_megatron_core(policy, tp, pp, tied, sp):
    """Tied at TP=2 on one stage: the one table's gradient sums the lookup's and the loss's. With
    sequence parallelism the fused layers gather and scatter along the sequence as megatron-core's do."""
    names = ["fused", "megatron-core with sequence parallelism"]
    for rank, r in enumerate(run_ranks(_rank_compare, policy, tied, sp, tp=tp, pp=pp)):
        (ref_loss, *losses), (ref_grads, *grads) = r["losses"], r["grads"]
        for name, loss, model_grads in zip(names, losses, grads):
            if ref_loss is not None:
                assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"rank {rank}: {name} loss {loss} vs {ref_loss}"
            assert set(ref_grads) == set(model_grads)
            for param, expected in ref_grads.items():
                got = model_grads[param]
                err = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
                assert err <= 1e-5, f"rank {rank}: {name}: gradient of {param} differs by {err:.2e}"
                if policy == "new_vocab_rows" and param in ("model.embed_tokens.weight", "lm_head.weight"):
                    assert got[:BASE].abs().max() == 0, f"rank {rank}: {name}: {param} base rows got a gradient"


def test_self_check_passes_on_the_cpu_kernels():
    """The start-up check a GPU run makes of the Triton kernels, here on the C++ ones."""
    assert self_check("cpu", torch.float32) is None


def _decide_with_rank1_failing(allow_fallback: bool) -> dict:
    """Every rank's decision when rank 1's kernels raise (as a GPU without them would)."""
    from megatron_adapt.kernels import self_check as checks

    def broken(device, dtype):
        raise RuntimeError("no kernel image is available")

    if torch.distributed.get_rank() == 1:
        checks.self_check = broken  # in this spawned process only
    problem = checks.checked_problem("cpu", torch.float32)
    try:
        return {"fused": checks.agree_on_check(problem, allow_fallback)}
    except checks.FusedKernelsFailed as err:
        return {"error": str(err)}


@pytest.mark.distributed
def test_ranks_agree_when_one_ranks_check_fails():
    """One rank's failed check decides for all (ranks disagreeing on the loss would hang NCCL); the
    run stops naming the kernels' error unless model.fused_vocab_fallback allows megatron-core's layers."""
    stop = run_ranks(_decide_with_rank1_failing, False, tp=2)
    assert all("error" in r for r in stop), f"a rank went on: {stop}"
    assert "no kernel image is available" in stop[1]["error"] and "model.fused_vocab_fallback" in stop[1]["error"]
    assert "another rank's check failed" in stop[0]["error"]
    assert run_ranks(_decide_with_rank1_failing, True, tp=2) == [{"fused": False}, {"fused": False}]


def test_mixed_precision_products_accumulate_in_float32_on_every_torch(monkeypatch):
    """The weight-gradient product of bf16 operands into an fp32 accumulator, with torch's
    out_dtype (2.10+) and without it (older torch refuses it): both equal the float64 product."""
    from megatron_adapt.kernels import linear_cross_entropy as lce

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 48, generator=gen).bfloat16(), torch.randn(48, 32, generator=gen).bfloat16())
    want = 1 + a.double() @ b.double()
    for supported in (True, False):
        monkeypatch.setattr(lce, "accumulates_into_float32", lambda device_type, s=supported: s)
        out = torch.ones(64, 32)
        try:
            lce._add_product(out, a, b)
        except RuntimeError as err:  # this torch's CPU addmm lacks the mixed-dtype kernel
            assert supported, err
            continue
        assert ((out.double() - want).abs().max() <= 1e-4), f"out_dtype supported={supported}"
