"""megatron-core LLaMA built by megatron_adapt equals Hugging Face LlamaForCausalLM.

Same weights, same tokens: logits (fp32, max |diff| ≤ 1e-4) and the gradients of one backward
step, for TP=1, TP=2, PP=2 and TP=2×PP=2, the pipeline cases through megatron-core's 1F1B
schedule with two micro-batches. Also: HF → megatron → HF is bit-exact for every layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
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


@pytest.fixture(scope="module")
def mistral_reference(tmp_path_factory):
    """A random tiny Mistral (no sliding window, Mistral's RoPE base) the same way."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                           rope_theta=1e6, sliding_window=None)
    return build_reference(MistralForCausalLM, config, tmp_path_factory)


def build_reference(model_class, config, tmp_path_factory) -> dict:
    torch.manual_seed(0)
    model = model_class(config).float()
    with torch.no_grad():  # HF zero-inits nothing here, but make norms non-trivial too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
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
    loss = forward_backward(model, batches,
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


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_megatron_matches_hf(hf_reference, tmp_path, tp, pp):
    ref = hf_reference
    results = run_ranks(_rank_forward_backward_roundtrip, ref["dir"], ref["tokens"], ref["labels"],
                        str(tmp_path / "out"), tp=tp, pp=pp)

    last = [r for r in results if r["logits"] is not None]
    assert last, "no rank reported logits from the last pipeline stage"
    for r in last:
        diff = (r["logits"] - ref["logits"]).abs().max().item()
        assert diff <= 1e-4, f"TP={tp} PP={pp}: logits differ from HF by {diff:.3e}"
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), "loss differs from HF"

    grads: dict[str, torch.Tensor] = {}
    for r in results:
        grads |= r["grads"]
    assert set(grads) == set(ref["grads"]), "gradient export does not cover every HF tensor"
    for name, ref_grad in ref["grads"].items():
        scale = ref_grad.abs().max().item()
        diff = (grads[name] - ref_grad).abs().max().item()
        assert diff <= 1e-4 * max(scale, 1e-3), (
            f"TP={tp} PP={pp}: grad of {name} differs from HF by {diff:.3e} (max |grad| {scale:.3e})")

    for rank, r in enumerate(results):
        assert not r["mismatched"], f"rank {rank}: reload after save changed {r['mismatched']}"
    saved = load_file_all(tmp_path / "out")
    assert set(saved) == set(ref["weights"]), "saved checkpoint lacks or adds tensors"
    for name, tensor in ref["weights"].items():
        assert torch.equal(saved[name], tensor), f"HF→megatron→HF changed {name}"


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [LAYOUTS[1], LAYOUTS[2]])
def test_mistral_matches_hf_and_exports_as_mistral(mistral_reference, tmp_path, tp, pp):
    """MistralForCausalLM without a sliding window: HF's logits at TP=2 and PP=2, exported bit-exactly
    and as a Mistral (model_type and architectures kept)."""
    import json

    ref = mistral_reference
    results = run_ranks(_rank_forward_backward_roundtrip, ref["dir"], ref["tokens"], ref["labels"],
                        str(tmp_path / "out"), tp=tp, pp=pp)
    for r in (r for r in results if r["logits"] is not None):
        diff = (r["logits"] - ref["logits"]).abs().max().item()
        assert diff <= 1e-4, f"Mistral TP={tp} PP={pp}: logits differ from HF by {diff:.3e}"
    saved = load_file_all(tmp_path / "out")
    assert set(saved) == set(ref["weights"]) and all(torch.equal(saved[n], t) for n, t in ref["weights"].items()), \
        "HF → megatron → HF changed a Mistral tensor"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("mistral", ["MistralForCausalLM"])
