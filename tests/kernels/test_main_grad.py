"""The fused ops' trainable-row gradients go into megatron-core's fp32 ``main_grad`` directly (not
rounded to the parameter's dtype per micro-batch first): through DDP, over two micro-batches, with
and without tied embeddings (one parameter fed by both ops), the gradient buffer holds what
megatron-core's own layers put there."""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_ranks

VOCAB, BASE, SEQ = 500, 400, 16


def _main_grads(tied: bool) -> dict:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
    from megatron_adapt.training.step import forward_backward

    arch = LlamaArchitecture(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
    freeze = FreezePolicy(train="new_vocab_rows")
    gen = torch.Generator().manual_seed(1)
    batches = [{"tokens": torch.randint(0, VOCAB, (2, SEQ), generator=gen),
                "labels": torch.randint(0, VOCAB, (2, SEQ), generator=gen)} for _ in range(2)]
    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_llama(arch, seq_length=SEQ, first_trainable_row=freeze.first_trainable_row(BASE), fused_vocab=fused)
        apply_freeze_policy(model, freeze)
        ddp = DistributedDataParallel(config=model.config, module=model,
                                      ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
        model.config.finalize_model_grads_func = finalize_model_grads
        ddp.zero_grad_buffer()
        forward_backward(ddp, batches)
        rows = [model.embedding.word_embeddings.trainable_rows] + ([] if tied else [model.output_layer.trainable_rows])
        out[fused] = {"grads": [r.main_grad.clone() for r in rows],
                      "direct": [bool(r.grad_added_to_main_grad) for r in rows]}
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_row_gradients_land_in_main_grad(tied):
    (result,) = run_ranks(_main_grads, tied)
    assert all(result[True]["direct"]), "the fused ops handed their row gradients back through autograd"
    assert not any(result[False]["direct"]), "megatron-core's path is expected to go through DDP's hook"
    for i, (want, got) in enumerate(zip(result[False]["grads"], result[True]["grads"])):
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert want.norm() > 0 and err <= 1e-5, f"table {i}: main_grad differs by {err:.1e} from megatron-core's"
