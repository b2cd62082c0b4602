"""Reading HF config.json: faithful fields, clear refusals of what would build another network."""

import json

import pytest
import torch

from megatron_adapt.model.config import LlamaArchitecture, UnsupportedConfigError

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rope_scaling": None, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}


def test_llama2_7b_fields_and_padding(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    arch = LlamaArchitecture.from_hf_config(tmp_path)
    assert (arch.head_dim, arch.rope_theta, arch.rope_scaling) == (128, 10000.0, None)
    assert arch.padded_vocab_size(1) == 32000 and arch.padded_vocab_size(8) == 32768
    assert arch.with_vocab_size(48001).padded_vocab_size(2) == 48128


def test_roundtrip_through_hf_config():
    arch = LlamaArchitecture.from_hf_config(dict(LLAMA2_7B, num_key_value_heads=8,
                                                 rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert LlamaArchitecture.from_hf_config(arch.to_hf_config()) == arch


@pytest.mark.parametrize("field,value,needle", [
    ("model_type", "qwen2", "model_type='qwen2'"),
    ("architectures", ["GPT2LMHeadModel"], "GPT2LMHeadModel"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}, "low_freq_factor"),
])
def test_refuses_unsupported(tmp_path, field, value, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(LLAMA2_7B, **{field: value})))
    with pytest.raises(UnsupportedConfigError) as err:
        LlamaArchitecture.from_hf_config(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_field_is_named():
    cfg = {k: v for k, v in LLAMA2_7B.items() if k != "intermediate_size"}
    with pytest.raises(UnsupportedConfigError, match="intermediate_size"):
        LlamaArchitecture.from_hf_config(cfg)


def test_parallel_layout_must_divide_heads_and_layers():
    arch = LlamaArchitecture.from_hf_config(dict(LLAMA2_7B, num_key_value_heads=8))
    with pytest.raises(UnsupportedConfigError, match="num_key_value_heads=8"):
        arch.check_parallel_layout(16, 1)
    with pytest.raises(UnsupportedConfigError, match="num_hidden_layers=32"):
        arch.check_parallel_layout(1, 3)


def test_gpu_fusions_follow_what_the_machine_has(monkeypatch):
    """Off on CPU (the kernels do not exist); on CUDA SwiGLU and bias-dropout-add fused, RoPE with
    TransformerEngine, the masked softmax with its compiled extension (Megatron-LM's LLaMA setting)."""
    from megatron_adapt.model import config

    assert not any(config.gpu_fusions().values()), "a GPU fusion is on without CUDA"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(config, "gpu_module_available", lambda name: name == "transformer_engine")
    assert config.gpu_fusions() == {"bias_activation_fusion": True, "bias_dropout_fusion": True,
                                    "apply_rope_fusion": True, "masked_softmax_fusion": False}


def test_mistral_without_sliding_window_builds_as_llama_and_stays_mistral():
    mistral = dict(LLAMA2_7B, architectures=["MistralForCausalLM"], model_type="mistral", num_key_value_heads=8,
                   rope_theta=1e6, sliding_window=None, head_dim=None)
    arch = LlamaArchitecture.from_hf_config(mistral)
    assert (arch.model_type, arch.head_dim, arch.rope_theta) == ("mistral", 128, 1e6)
    config = arch.to_hf_config()
    assert (config["model_type"], config["architectures"]) == ("mistral", ["MistralForCausalLM"])
    assert LlamaArchitecture.from_hf_config(config) == arch


def test_mistral_sliding_window_is_refused_by_name(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(LLAMA2_7B, architectures=["MistralForCausalLM"], model_type="mistral",
                                    sliding_window=4096)))
    with pytest.raises(UnsupportedConfigError, match="sliding_window=4096"):
        LlamaArchitecture.from_hf_config(path)
