"""Stage 1 at TP=2×DP=2 with a TP rank holding no added row at all, under megatron-core's
distributed optimizer as GPU runs with TransformerEngine or apex use it: Adam state sharded over
DP, parameters re-homed into its contiguous buffer (which breaks the row-split layer's view of its
trainable rows).

Its step runs on CPU (loading its checkpoints needs TE or apex, which CPU runs do not have): after
two steps every weight equals the replicated optimizer's bit for bit, in fp32 and in bf16 with
fp32 master weights, the added rows moved and nothing else did. With the parameter all-gather
overlapped (the 7B configs' ``ddp.overlap_param_gather``) the other rank's half of the added rows
is still a step old after the step; the loop's gather before a save makes them whole. The
replicated optimizer's checkpoint at this layout saves and loads back every Adam moment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_adapt.checkpoint import train_state
from megatron_adapt.training.loop import gather_parameters
from megatron_adapt.training.optim import build_scheduler
from tests.multiprocess import run_ranks

VOCAB, BASE, SEQ = 300, 280, 16  # TP=2 pads to 512 rows: rank 0 holds rows 0-255, all base vocabulary


def _rank_two_steps(run_dir: str) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
    from megatron_adapt.model.weights import export_hf_state
    from megatron_adapt.training.config import Config
    from megatron_adapt.training.optim import build_optimizer
    from megatron_adapt.training.step import forward_backward

    def build(dtype, distributed, overlap_param_gather=False):
        model = build_llama(arch, params_dtype=dtype, seq_length=SEQ, first_trainable_row=policy.first_trainable_row(BASE))
        apply_freeze_policy(model, policy)
        config = Config()
        config.optim.bf16, config.optim.lr = dtype == torch.bfloat16, 1e-2
        ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed, overlap_param_gather=overlap_param_gather))
        return model, ddp, build_optimizer(config, ddp, dtype, distributed), config

    def steps(ddp, optimizer):
        for _ in range(2):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(ddp, [dict(tokens=tokens, labels=torch.roll(tokens, -1, 1))])
            finalize_model_grads([ddp])
            optimizer.step()

    arch = LlamaArchitecture(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    policy = FreezePolicy(train="new_vocab_rows")
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(parallel_state.get_data_parallel_rank()))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for distributed in (False, True):
            torch.manual_seed(0)
            model, ddp, optimizer, config = build(dtype, distributed)
            before = export_hf_state(model)
            steps(ddp, optimizer)
            out[str(dtype), distributed] = dict(before=before, after=export_hf_state(model),
                                                rows=model.embedding.word_embeddings.trainable_rows.numel())
            if dtype == torch.float32 and not distributed:
                out["moments", "saved"] = _moments(optimizer)
                train_state.save(run_dir, 2, ddp, optimizer, build_scheduler(config, optimizer))
                torch.manual_seed(1)
                _, fresh_ddp, fresh, config = build(dtype, distributed)
                train_state.load(Path(run_dir) / "iter_0000002", fresh_ddp, fresh, build_scheduler(config, fresh))
                out["moments", "loaded"] = _moments(fresh)
    # Overlapped parameter gather: after the step each rank's parameters are whole only once the
    # next forward (or the loop's gather before a save) has all-gathered the other ranks' shards.
    torch.manual_seed(0)
    model, ddp, optimizer, _ = build(torch.float32, True, overlap_param_gather=True)
    steps(ddp, optimizer)
    out["overlap", "before gather"] = export_hf_state(model)
    gather_parameters(ddp)
    out["overlap", "after gather"] = export_hf_state(model)
    return out


def _moments(optimizer) -> list[torch.Tensor]:
    """Every Adam moment of the optimizer, in parameter order (the added rows' only, in stage 1)."""
    moments = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                state = inner.optimizer.state.get(param, {})
                moments += [state[name].clone() for name in ("exp_avg", "exp_avg_sq") if name in state]
    return moments


@pytest.mark.distributed
def test_distributed_optimizer_steps_equal_the_replicated_ones(tmp_path):
    for rank, result in enumerate(run_ranks(_rank_two_steps, str(tmp_path), tp=2, dp=2)):
        tp_rank = rank % 2
        saved, loaded = result["moments", "saved"], result["moments", "loaded"]
        assert saved and len(loaded) == len(saved), f"rank {rank}: {len(saved)} Adam moments saved, {len(loaded)} loaded"
        for i, (want, got) in enumerate(zip(saved, loaded)):
            assert torch.equal(got, want), f"rank {rank}: Adam moment {i} ({tuple(want.shape)}) not restored"
        for dtype in (str(torch.float32), str(torch.bfloat16)):
            replicated, sharded = result[dtype, False], result[dtype, True]
            if tp_rank == 0:
                assert sharded["rows"] == 0, "the test wants a TP rank without added rows"
            for name, expected in replicated["after"].items():
                assert torch.equal(sharded["after"][name], expected), \
                    f"rank {rank} {dtype}: {name} differs from the replicated optimizer's after two steps"
                moved = (sharded["after"][name] - sharded["before"][name]).abs()
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    assert moved[:BASE].max() == 0 and moved[BASE:].max() > 0, f"rank {rank} {dtype}: {name} rows"
                else:
                    assert moved.max() == 0, f"rank {rank} {dtype}: frozen {name} moved"
        replicated = result[str(torch.float32), False]["after"]
        stale = [n for n, t in result["overlap", "before gather"].items() if not torch.equal(t, replicated[n])]
        if tp_rank == 1:  # the rank holding the added rows: half of them updated by the other DP rank
            assert stale, f"rank {rank}: overlapped parameter gather left nothing to gather (the test lost its point)"
        for name, expected in replicated.items():
            assert torch.equal(result["overlap", "after gather"][name], expected), \
                f"rank {rank}: {name} after the pre-save gather differs from the replicated optimizer's"
