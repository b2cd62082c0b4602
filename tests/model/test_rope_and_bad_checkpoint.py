"""RoPE variants equal HF; a checkpoint that does not fit the config is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_adapt.checkpoint.hf import load_hf_checkpoint
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.weights import CheckpointMismatchError
from tests.multiprocess import run_ranks

SEQ = 128
ROPE_VARIANTS = {
    "theta500k": {"rope_type": "default", "rope_theta": 500000.0},
    "linear2": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
}


def _tiny(rope: dict) -> LlamaForCausalLM:
    """A random model whose attention is sharp enough that RoPE's low frequencies matter."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=300, max_position_embeddings=SEQ,
        rope_parameters=rope)).float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    return model


def _megatron_logits(dirs: list[str], tokens: torch.Tensor) -> list:
    out = []
    for d in dirs:
        model = build_llama(LlamaArchitecture.from_hf_config(d), seq_length=SEQ)
        try:
            load_hf_checkpoint(model, d)
        except CheckpointMismatchError as err:
            out.append(str(err))
            continue
        positions = torch.arange(SEQ).unsqueeze(0)
        with torch.no_grad():
            out.append(model(tokens, positions, attention_mask=None)[..., :300])
    return out


@pytest.mark.distributed
def test_rope_variants_and_shape_mismatch(tmp_path):
    tokens = torch.randint(0, 300, (1, SEQ), generator=torch.Generator().manual_seed(3))
    dirs, refs = [], []
    for name, rope in ROPE_VARIANTS.items():
        model = _tiny(rope)
        model.save_pretrained(tmp_path / name)
        dirs.append(str(tmp_path / name))
        refs.append(model(tokens).logits.detach())
    # Scaling must change HF's logits, or matching them would prove nothing.
    separation = (refs[2] - refs[0]).abs().max().item()
    assert separation > 1e-2, f"llama3 scaling changed the reference by only {separation:.1e}"

    broken = _tiny(ROPE_VARIANTS["theta500k"])
    broken.save_pretrained(tmp_path / "broken")
    config = (tmp_path / "broken" / "config.json")
    config.write_text(config.read_text().replace('"intermediate_size": 128', '"intermediate_size": 96'))
    dirs.append(str(tmp_path / "broken"))

    (results,) = run_ranks(_megatron_logits, dirs, tokens)
    for name, ref, got in zip(ROPE_VARIANTS, refs, results):
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-4, f"rope {name}: logits differ from HF by {diff:.3e}"
    message = results[-1]
    assert "model.layers.0.mlp.gate_proj.weight" in message, message
    assert "(128, 64)" in message and "(96, 64)" in message, message
