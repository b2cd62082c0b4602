"""megatron-core's gradient-accumulation fusion (apex's ``fused_weight_gradient_mlp_cuda``, on in the
7B configs) on CPU, through a torch stand-in for its two wgrad kernels: stage 1 (row-split
vocabulary) and stage 2, each with and without the fused vocabulary kernels, take the same steps as
without the fusion. Stage 1 unfused used to crash at its first backward: the output layer's weight
is the joined rows, which have no ``main_grad`` for the fused kernel to accumulate into."""

from __future__ import annotations

import types

import pytest
import torch

from tests.multiprocess import run_ranks

VOCAB, BASE, SEQ = 500, 400, 16


def _stand_in_kernels() -> types.ModuleType:
    """apex's fused_weight_gradient_mlp_cuda in torch: main_grad += grad_outputᵀ · input."""
    def accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        total_input = total_input.reshape(-1, total_input.shape[-1])
        main_grad.add_((grad_output.t().float() @ total_input.float()).to(main_grad.dtype))

    return types.SimpleNamespace(wgrad_gemm_accum_fp32=accumulate, wgrad_gemm_accum_fp16=accumulate)


def _steps(policy: str, fused_vocab: bool, fusion: bool) -> dict[str, torch.Tensor]:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.tensor_parallel import layers

    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
    from megatron_adapt.model.weights import export_hf_state
    from megatron_adapt.training.config import Config
    from megatron_adapt.training.optim import build_optimizer
    from megatron_adapt.training.step import forward_backward

    layers.fused_weight_gradient_mlp_cuda = _stand_in_kernels()
    layers._grad_accum_fusion_available = True
    arch = LlamaArchitecture(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    freeze = FreezePolicy(train=policy)
    torch.manual_seed(0)
    model = build_llama(arch, seq_length=SEQ, first_trainable_row=freeze.first_trainable_row(BASE),
                        fused_vocab=fused_vocab, gradient_accumulation_fusion=fusion)
    apply_freeze_policy(model, freeze)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    config = Config()
    config.optim.lr = 1e-2
    optimizer = build_optimizer(config, ddp, torch.float32, False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, [dict(tokens=tokens, labels=torch.roll(tokens, -1, 1))])
        finalize_model_grads([ddp])
        optimizer.step()
    return export_hf_state(model)


def _compare(policy: str, fused_vocab: bool) -> float:
    plain, fused = _steps(policy, fused_vocab, fusion=False), _steps(policy, fused_vocab, fusion=True)
    return max(((fused[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in plain.items())


@pytest.mark.distributed
@pytest.mark.parametrize("fused_vocab", [False, True], ids=["megatron-core-loss", "fused-loss"])
@pytest.mark.parametrize("policy", ["new_vocab_rows", "all"], ids=["stage1", "stage2"])
def test_gradient_accumulation_fusion_takes_the_same_steps(policy, fused_vocab):
    (difference,) = run_ranks(_compare, policy, fused_vocab)
    assert difference <= 1e-5, f"{policy}, fused_vocab={fused_vocab}: weights differ by {difference:.1e} with the fusion"
