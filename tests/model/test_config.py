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
    ("model_type", "gemma2", "model_type='gemma2'"),
    ("model_type", "qwen3_moe", "model_type='qwen3_moe'"),
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


QWEN25_05B = {  # Qwen/Qwen2.5-0.5B's config.json
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
    "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B = {  # Qwen/Qwen3-0.6B's config.json
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16,
    "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
}


@pytest.mark.parametrize("hf, traits", [(QWEN25_05B, (True, False)), (QWEN3_06B, (False, True))], ids=["qwen2", "qwen3"])
def test_qwen_configs_name_their_traits(hf, traits):
    """Qwen2.5 has q/k/v biases (whatever its sliding_window size says while use_sliding_window is
    false); Qwen3 has per-head q/k norms; both reach megatron-core as add_qkv_bias / qk_layernorm."""
    arch = LlamaArchitecture.from_hf_config(hf)
    assert (arch.qkv_bias, arch.qk_norm) == traits
    assert (arch.head_dim, arch.tie_word_embeddings) == (hf.get("head_dim") or 64, True)
    tc = arch.transformer_config()
    assert (tc.add_qkv_bias, tc.qk_layernorm, tc.add_bias_linear) == (*traits, False)
    assert LlamaArchitecture.from_hf_config(arch.to_hf_config()) == arch


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_exported_config_builds_the_tensors_the_mapping_writes(family):
    """transformers builds, from the config an export writes, a model whose tensors are exactly
    those ``hf_shapes`` describes (names and shapes): biases and q/k norms where, and only where,
    the family has them."""
    import transformers

    from megatron_adapt.model.config import FAMILIES
    from megatron_adapt.model.weights import hf_shapes

    tiny = dict(LLAMA2_7B, architectures=[FAMILIES[family].hf_class], model_type=family, hidden_size=64,
                intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                vocab_size=300, head_dim=16, tie_word_embeddings=family == "qwen2")
    arch = LlamaArchitecture.from_hf_config(tiny)
    config = transformers.AutoConfig.for_model(**arch.to_hf_config())
    model = transformers.AutoModelForCausalLM.from_config(config)
    built = {n: tuple(t.shape) for n, t in model.state_dict().items() if not n.endswith("rotary_emb.inv_freq")}
    if arch.tie_word_embeddings:
        built.pop("lm_head.weight")
    assert built == hf_shapes(arch), f"{family}: HF's tensors differ from the mapping's"


@pytest.mark.parametrize("field, value, needle", [
    ("use_sliding_window", True, "use_sliding_window=True"),
    ("layer_types", ["full_attention"] * 23 + ["sliding_attention"], "'sliding_attention'"),
])
def test_qwen_sliding_window_is_refused_by_name(field, value, needle):
    with pytest.raises(UnsupportedConfigError, match=needle):
        LlamaArchitecture.from_hf_config(dict(QWEN25_05B, **{field: value}))


def test_qwen3_attention_bias_is_refused_by_name():
    """Qwen3's attention_bias would add biases to o_proj too, which the layout here lacks."""
    with pytest.raises(UnsupportedConfigError, match="attention_bias=True"):
        LlamaArchitecture.from_hf_config(dict(QWEN3_06B, attention_bias=True))
