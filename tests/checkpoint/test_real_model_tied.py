"""A real pretrained model with tied embeddings and a byte-level BPE tokenizer, end to end:
SmolLM2-135M → hf-to-megatron with its Vietnamese-extended tokenizer → megatron-core at PP=2
(the last stage holding a copy of the tied table) → stage-1 steps → training checkpoint →
megatron-to-hf, checked against transformers' LlamaForCausalLM at each end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from safetensors import safe_open

from megatron_adapt.checkpoint import train_state
from megatron_adapt.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_adapt.checkpoint.hf import load_hf_checkpoint
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
from megatron_adapt.model.vocab import vocab_tables
from megatron_adapt.model.weights import export_hf_state
from megatron_adapt.training.step import forward_backward
from tests.multiprocess import run_ranks

BASE_VOCAB, SEQ, STEPS = 49152, 32, 2
TEXT = ("Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam. The city lies on the Red River, "
        "and người dân thường gọi nó là thành phố vì hòa bình. Mùa thu ở Hà Nội có hoa sữa và cốm làng Vòng; "
        "visitors walk around Hoan Kiem Lake, uống cà phê trứng và ăn phở bò.")


def _logits(model, batches) -> torch.Tensor | None:
    captured: list[torch.Tensor] = []
    forward_backward(model, batches, forward_only=True,
                     on_logits=lambda l: captured.append(gather_from_tensor_model_parallel_region(l)))
    return torch.cat(captured)[..., : model.true_vocab_size] if captured else None


def _table(model) -> torch.Tensor:
    """This stage's whole copy of the tied table (the embedding's, or the last stage's copy)."""
    layer = model.embedding.word_embeddings if model.pre_process else model.output_layer.table
    return vocab_tables(layer)[0][: model.true_vocab_size].detach().clone()


def _rank_stage1(start_dir: str, tokens: torch.Tensor, run_dir: str) -> dict:
    arch = LlamaArchitecture.from_hf_config(start_dir)
    freeze = FreezePolicy(train="new_vocab_rows")
    model = build_llama(arch, seq_length=SEQ, first_trainable_row=freeze.first_trainable_row(BASE_VOCAB))
    load_hf_checkpoint(model, start_dir)
    batches = [dict(tokens=tokens[i:i + 1], labels=torch.roll(tokens[i:i + 1], -1, 1)) for i in range(len(tokens))]
    logits_before = _logits(model, batches)
    apply_freeze_policy(model, freeze)
    before, table_before = export_hf_state(model), _table(model)

    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1,
                                                       params_dtype=torch.float32), [ddp])
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, batches)
        finalize_model_grads([ddp])
        optimizer.step()
    train_state.save(run_dir, STEPS, ddp, run_config={"model": {"tokenizer": ""}})
    return dict(logits_before=logits_before, logits_after=_logits(model, batches), before=before,
                after=export_hf_state(model), table_before=table_before, table_after=_table(model),
                first=parallel_state.is_pipeline_first_stage())


@pytest.fixture(scope="module")
def stage1(smollm2_hf, smollm2_vi, tmp_path_factory):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("tied")
    start = hf_to_megatron(smollm2_hf, smollm2_vi, tmp / "start", init="subword-mean")
    start_dir = start / "iter_0000000" / "model"
    ids = AutoTokenizer.from_pretrained(smollm2_vi)(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2 * SEQ and max(ids) >= BASE_VOCAB, "the probe text must use added tokens"
    tokens = torch.tensor(ids[: 2 * SEQ]).view(2, SEQ)
    results = run_ranks(_rank_stage1, str(start_dir), tokens, str(tmp / "run"), pp=2)
    return dict(start_dir=start_dir, tokens=tokens, results=results, run=tmp / "run", tmp=tmp)


@pytest.mark.distributed
def test_start_checkpoint_is_tied_and_equals_hf(stage1):
    from transformers import LlamaForCausalLM

    start_dir = stage1["start_dir"]
    config = json.loads((start_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] > BASE_VOCAB
    names = set(json.loads((start_dir / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" not in names
    hf = LlamaForCausalLM.from_pretrained(start_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(stage1["tokens"]).logits
    last = [r for r in stage1["results"] if r["logits_before"] is not None]
    assert len(last) == 1
    diff = (last[0]["logits_before"] - expected).abs().max().item()
    assert diff <= 1e-4, f"megatron-core PP=2 logits differ from LlamaForCausalLM (resized, tied) by {diff:.2e}"


@pytest.mark.distributed
def test_stage1_trains_new_rows_on_both_copies_only(stage1):
    first, last = (next(r for r in stage1["results"] if r["first"] is f) for f in (True, False))
    for name, tensor in {**first["before"], **last["before"]}.items():
        after = {**first["after"], **last["after"]}[name]
        if name == "model.embed_tokens.weight":
            assert torch.equal(after[:BASE_VOCAB], tensor[:BASE_VOCAB]), "base rows of the tied table moved"
            assert not torch.equal(after[BASE_VOCAB:], tensor[BASE_VOCAB:]), "new rows did not train"
        else:
            assert torch.equal(after, tensor), f"frozen {name} changed"
    assert "lm_head.weight" not in last["after"], "a tied model exports no lm_head"
    for r in (first, last):
        assert torch.equal(r["table_after"][:BASE_VOCAB], r["table_before"][:BASE_VOCAB])
    assert torch.equal(first["table_before"], last["table_before"]), "the last stage's copy did not start equal"
    assert torch.equal(first["table_after"], last["table_after"]), \
        "the two stages' copies of the new rows diverged (gradient all-reduce between them missing)"


@pytest.mark.distributed
def test_megatron_to_hf_gives_tied_model_with_the_trained_logits(stage1, smollm2_vi):
    from transformers import LlamaForCausalLM

    out = megatron_to_hf(stage1["run"], stage1["tmp"] / "release", tokenizer_dir=smollm2_vi, dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    names = set()
    for shard in Path(out).glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(stage1["tokens"]).logits
    got = next(r["logits_after"] for r in stage1["results"] if r["logits_after"] is not None)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"exported tied model's logits differ from megatron-core's after training by {diff:.2e}"
