"""Staged freezing (input rows and output rows named apart) and the decoupled vocabulary LR.

Each policy, through megatron-core's DDP, gradient finalization, Adam and LR schedule, moves
exactly the tables and rows it names and leaves every other weight bit-identical; with
``optim.vocab_lr`` the optimizer's parameter group of the vocabulary layers follows its own
max/min LR while the rest follows ``optim.lr``.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_ranks

BASE_VOCAB, VOCAB, SEQ = 400, 500, 16
POLICIES = ["new_input_rows", "new_output_rows", "new_vocab_rows", "vocab", "all"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("hf")
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def family_hf_dir(request, tmp_path_factory) -> str:
    """Qwen2 (q/k/v biases, tied embeddings) or Qwen3 (q/k norms), biases and norms non-trivial."""
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if request.param == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return str(directory)


def _rank_train_each_policy(hf_dir: str, tokens: torch.Tensor, policies: list[str] = POLICIES) -> dict:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_adapt.checkpoint.hf import load_hf_checkpoint
    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
    from megatron_adapt.model.weights import export_hf_state
    from megatron_adapt.training.config import Config
    from megatron_adapt.training.optim import build_optimizer, build_scheduler
    from megatron_adapt.training.step import forward_backward

    config = Config()
    config.optim.lr, config.optim.min_lr, config.optim.vocab_lr, config.optim.vocab_min_lr = 1e-3, 1e-4, 5e-3, 2e-4
    config.optim.warmup_steps, config.optim.bf16, config.train.steps, config.train.global_batch_size = 0, False, 4, 1
    arch = LlamaArchitecture.from_hf_config(hf_dir)
    batch = dict(tokens=tokens, labels=torch.roll(tokens, -1, 1))
    out = {}
    for train in policies:
        policy = FreezePolicy(train=train)
        model = build_llama(arch, seq_length=SEQ, first_trainable_row=policy.first_trainable_row(BASE_VOCAB))
        load_hf_checkpoint(model, hf_dir)
        apply_freeze_policy(model, policy)
        ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
        optimizer = build_optimizer(config, ddp, torch.float32, distributed=False)
        scheduler = build_scheduler(config, optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [(sorted(names[id(p)] for p in g["params"]), g["lr"]) for g in optimizer.param_groups if g["params"]]
        before = export_hf_state(model)
        for _ in range(2):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(ddp, [batch])
            finalize_model_grads([ddp])
            optimizer.step()
            scheduler.step(increment=1)
        scheduler.step(increment=10)  # past the decay: every group at its min LR
        final_lrs = [g["lr"] for g in optimizer.param_groups if g["params"]]
        out[train] = dict(before=before, after=export_hf_state(model), groups=groups, final_lrs=final_lrs)
    return out


@pytest.mark.distributed
def test_each_policy_trains_what_it_names_at_its_lr(hf_dir):
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    tokens[0, ::3] = torch.arange(BASE_VOCAB, BASE_VOCAB + len(tokens[0, ::3]))  # new ids in and out
    (results,) = run_ranks(_rank_train_each_policy, hf_dir, tokens)
    tables = {"input": "model.embed_tokens.weight", "output": "lm_head.weight"}
    expect = {  # (input base, input new, output base, output new, transformer) move?
        "new_input_rows": (False, True, False, False, False), "new_output_rows": (False, False, False, True, False),
        "new_vocab_rows": (False, True, False, True, False), "vocab": (True, True, True, True, False),
        "all": (True, True, True, True, True)}
    for train, r in results.items():
        before, after = r["before"], r["after"]
        moved = []
        for table in ("input", "output"):
            name = tables[table]
            moved += [not torch.equal(before[name][:BASE_VOCAB], after[name][:BASE_VOCAB]),
                      not torch.equal(before[name][BASE_VOCAB:], after[name][BASE_VOCAB:])]
        moved.append(any(not torch.equal(before[n], after[n]) for n in before if n not in tables.values()))
        assert tuple(moved) == expect[train], (
            f"train={train}: moved (input base, input new, output base, output new, transformer) = {moved}, "
            f"expected {expect[train]}")

        for params, lr in r["groups"]:
            vocab = [p for p in params if "embedding" in p or "output_layer" in p]
            assert not vocab or len(vocab) == len(params), f"train={train}: a group mixes vocab and other params"
            want = 5e-3 if vocab else 1e-3
            assert lr == pytest.approx(want), f"train={train}: group {params[:2]}… starts at LR {lr}, expected {want}"
        want_final = sorted(2e-4 if any("embedding" in p or "output_layer" in p for p in params) else 1e-4
                            for params, _ in r["groups"])
        assert sorted(r["final_lrs"]) == pytest.approx(want_final), f"train={train}: final LRs {r['final_lrs']}"
    assert len(results["all"]["groups"]) >= 2, "expected a vocabulary group beside the rest"


@pytest.mark.distributed
@pytest.mark.parametrize("family_hf_dir", ["qwen2", "qwen3"], indirect=True)
def test_stage1_keeps_biases_and_qk_norms_of_other_families(family_hf_dir):
    """Stage 1 (the added rows only) at TP=2 on Qwen2 and Qwen3: the added rows move; every base
    tensor, the q/k/v biases and q/k norms included, stays bit-identical."""
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    tokens[0, ::3] = torch.arange(BASE_VOCAB, BASE_VOCAB + len(tokens[0, ::3]))
    results = run_ranks(_rank_train_each_policy, family_hf_dir, tokens, ["new_vocab_rows"], tp=2)
    r = results[0]["new_vocab_rows"]
    before, after = r["before"], r["after"]
    special = [n for n in before if n.endswith(".bias") or "_norm." in n]
    assert special, "the model has neither q/k/v biases nor q/k norms: the test checks nothing particular"
    tables = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in before]
    for name in tables:
        assert torch.equal(before[name][:BASE_VOCAB], after[name][:BASE_VOCAB]), f"base rows of {name} moved"
        assert not torch.equal(before[name][BASE_VOCAB:], after[name][BASE_VOCAB:]), f"added rows of {name} did not move"
    changed = [n for n in before if n not in tables and not torch.equal(before[n], after[n])]
    assert not changed, f"stage 1 changed base tensors {changed}"


def test_tied_model_refuses_input_or_output_rows_alone():

    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy

    tied = torch.nn.Linear(2, 2)
    tied.share_embeddings_and_output_weights = True
    tied.first_trainable_row = 10
    with pytest.raises(ValueError, match="ties its embedding and output layer"):
        apply_freeze_policy(tied, FreezePolicy(train="new_input_rows"))
