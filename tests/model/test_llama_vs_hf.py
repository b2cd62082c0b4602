"""megatron-core models built by megatron_adapt equal Hugging Face's LLaMA, Mistral, Qwen2 and Qwen3.

Same weights, same tokens: logits (fp32, max |diff| ≤ 1e-4) and the gradients of one backward
step, for TP=1, TP=2, PP=2 and TP=2×PP=2 (the other families at TP=2 and PP=2), the pipeline cases
through megatron-core's 1F1B schedule with two micro-batches. Also: HF → megatron → HF is
bit-exact for every layout and family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from safetensors.torch import load_file

from megatron_adapt.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.weights import export_hf_grads
from megatron_adapt.training.step import forward_backward
from tests.multiprocess import run_ranks

VOCAB, SEQ, MICRO_BATCHES = 1000, 24, 2


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """A random tiny LLaMA saved in HF format, with its logits, loss and gradients on fixed tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
    return build_reference(LlamaForCausalLM, config, tmp_path_factory)


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def family_reference(request, tmp_path_factory):
    """A random tiny model of another family the same way: Mistral without a sliding window, Qwen2
    with q/k/v biases and tied embeddings (as its small sizes are), Qwen3 with q/k norms."""
    import transformers

    family = request.param
    config_class, model_class, extra = {
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=1e6, sliding_window=None)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=True,
                                                          use_sliding_window=False)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1e6, head_dim=16, attention_bias=False)),
    }[family]
    config = getattr(transformers, config_class)(**TINY, **extra)
    return dict(build_reference(getattr(transformers, model_class), config, tmp_path_factory), family=family)


def build_reference(model_class, config, tmp_path_factory) -> dict:
    torch.manual_seed(0)
    model = model_class(config).float()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make both non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    hf_dir = tmp_path_factory.mktemp("hf")
    model.save_pretrained(hf_dir, max_shard_size="100KB")  # several shards + index
    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return dict(dir=str(hf_dir), tokens=tokens, labels=labels, logits=logits.detach(),
                loss=loss.item(), grads=grads, weights=load_file_all(hf_dir))


def load_file_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out |= load_file(f)
    return out


def _rank_forward_backward_roundtrip(hf_dir: str, tokens, labels, out_dir: str) -> dict:
    arch = LlamaArchitecture.from_hf_config(hf_dir)
    model = build_llama(arch, seq_length=SEQ)
    load_hf_checkpoint(model, hf_dir)
    batches = [dict(tokens=tokens[i:i + 1], labels=labels[i:i + 1]) for i in range(MICRO_BATCHES)]
    captured: list[torch.Tensor] = []
    # As the training loop runs it: megatron-core's DDP, whose finalize_model_grads sums the tied
    # table's two copies (PP) and the per-head norms' partial gradients (TP)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    loss = forward_backward(ddp, batches,
                            on_logits=lambda l: captured.append(gather_from_tensor_model_parallel_region(l)))
    grads = export_hf_grads(model)

    save_hf_checkpoint(model, out_dir)
    reloaded = build_llama(arch, seq_length=SEQ)  # fresh random init
    load_hf_checkpoint(reloaded, out_dir)
    original = dict(model.named_parameters())
    mismatched = [n for n, p in reloaded.named_parameters() if not torch.equal(p, original[n])]

    last = parallel_state.is_pipeline_last_stage()
    logits = torch.cat(captured)[..., : arch.vocab_size] if last else None
    return dict(loss=loss.mean if loss else None, logits=logits, grads=grads, mismatched=mismatched)


LAYOUTS = [pytest.param(1, 1, id="tp1"), pytest.param(2, 1, id="tp2"),
           pytest.param(1, 2, id="pp2"), pytest.param(2, 2, id="tp2xpp2")]


def _assert_matches_hf(ref: dict, results: list[dict], saved_dir: Path, what: str) -> None:
    last = [r for r in results if r["logits"] is not None]
    assert last, "no rank reported logits from the last pipeline stage"
    for r in last:
        diff = (r["logits"] - ref["logits"]).abs().max().item()
        assert diff <= 1e-4, f"{what}: logits differ from HF by {diff:.3e}"
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"{what}: loss differs from HF"

    grads: dict[str, torch.Tensor] = {}
    for r in results:
        grads |= r["grads"]
    assert set(grads) == set(ref["grads"]), f"{what}: gradient export does not cover every HF tensor"
    for name, ref_grad in ref["grads"].items():
        scale = ref_grad.abs().max().item()
        diff = (grads[name] - ref_grad).abs().max().item()
        assert diff <= 1e-4 * max(scale, 1e-3), (
            f"{what}: grad of {name} differs from HF by {diff:.3e} (max |grad| {scale:.3e})")

    for rank, r in enumerate(results):
        assert not r["mismatched"], f"{what}, rank {rank}: reload after save changed {r['mismatched']}"
    saved = load_file_all(saved_dir)
    assert set(saved) == set(ref["weights"]), f"{what}: saved checkpoint lacks or adds tensors"
    for name, tensor in ref["weights"].items():
        assert torch.equal(saved[name], tensor), f"{what}: HF→megatron→HF changed {name}"


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_megatron_matches_hf(hf_reference, tmp_path, tp, pp):
    results = run_ranks(_rank_forward_backward_roundtrip, hf_reference["dir"], hf_reference["tokens"],
                        hf_reference["labels"], str(tmp_path / "out"), tp=tp, pp=pp)
    _assert_matches_hf(hf_reference, results, tmp_path / "out", f"LLaMA TP={tp} PP={pp}")


@pytest.mark.distributed
@pytest.mark.parametrize("family_reference", ["mistral", "qwen2", "qwen3"], indirect=True)
@pytest.mark.parametrize("tp,pp", [LAYOUTS[1], LAYOUTS[2]])
def test_family_matches_hf_and_exports_as_itself(family_reference, tmp_path, tp, pp):
    """The family's logits and gradients (the q/k/v biases and q/k norms included) at TP=2 and PP=2,
    exported bit-exactly and as the same family (model_type and architectures kept)."""
    import json

    ref = family_reference
    results = run_ranks(_rank_forward_backward_roundtrip, ref["dir"], ref["tokens"], ref["labels"],
                        str(tmp_path / "out"), tp=tp, pp=pp)
    _assert_matches_hf(ref, results, tmp_path / "out", f"{ref['family']} TP={tp} PP={pp}")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((Path(ref["dir"]) / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (original["model_type"], original["architectures"])
