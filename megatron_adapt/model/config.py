"""The LLaMA-family architecture as read from a Hugging Face ``config.json``.

One dataclass carries everything megatron-core needs to build the model and everything the
weight mapping needs to lay tensors out. The families differ from LLaMA in a few named traits
(``Family``: biases on q/k/v, per-head norms of q and k), each of which megatron-core has. Reading
refuses configs that would silently build a different network (other biases, activations,
sliding windows, unknown RoPE scaling), because a model that loads without error but computes
something else loses days, not seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Family:
    """What an HF family adds to LLaMA's decoder."""

    hf_class: str
    qkv_bias: bool = False
    """Biases on q_proj, k_proj and v_proj (none on o_proj or the MLP): megatron-core's ``add_qkv_bias``."""
    qk_norm: bool = False
    """An RMSNorm over each head of q and of k before RoPE (one weight [head_dim] each, shared by
    the heads): megatron-core's ``qk_layernorm``."""


FAMILIES = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM"),  # without a sliding window: a LLaMA
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True),  # Qwen2 and Qwen2.5
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True),
}
"""model_type → its traits; every other model_type is refused."""
SUPPORTED_ARCHITECTURES = tuple(f.hf_class for f in FAMILIES.values())

# megatron-core implements Llama-3 RoPE scaling with these constants only.
_MCORE_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


class UnsupportedConfigError(ValueError):
    """A config.json describes a model this project cannot build faithfully."""


@dataclasses.dataclass(frozen=True)
class LlamaArchitecture:
    """Shape and numerics of a LLaMA-family decoder."""

    vocab_size: int
    """True vocabulary size (rows the tokenizer can produce); padding is added on top."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str | None = None
    """None, "linear" or "llama3" (megatron-core's fixed llama3 constants)."""
    rope_scaling_factor: float = 1.0
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str = "float32"
    tie_word_embeddings: bool = False
    """One table for input embedding and output layer (small models: SmolLM2, LLaMA-3.2 1B/3B)."""
    model_type: str = "llama"
    """The HF family (``FAMILIES``), kept so that an export is the family it came from."""

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling not in (None, "linear", "llama3"):
            raise UnsupportedConfigError(f"rope_scaling type {self.rope_scaling!r} is not supported")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.family.qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def padded_vocab_size(self, tp_size: int, divisible_by: int = 128) -> int:
        """Rows of the embedding/output tables: a multiple of divisible_by × TP, as Megatron pads."""
        multiple = divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_parallel_layout(self, tp_size: int, pp_size: int) -> None:
        """Refuse a TP/PP split that would cut a head group or leave a stage without layers."""
        for what, n in (("num_key_value_heads", self.num_key_value_heads),
                        ("num_attention_heads", self.num_attention_heads),
                        ("intermediate_size", self.intermediate_size)):
            if n % tp_size:
                raise UnsupportedConfigError(f"tensor parallel size {tp_size} does not divide {what}={n}")
        if self.num_layers % pp_size:
            raise UnsupportedConfigError(
                f"pipeline parallel size {pp_size} does not divide num_hidden_layers={self.num_layers}")

    def training_flops_per_token(self, seq_length: int) -> float:
        """Forward + backward FLOPs per token: 6 × matmul parameters (the embedding lookup is none)
        + causal attention's score and value products at ``seq_length``."""
        h, f, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attention = h * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        params = layers * (attention + 3 * h * f) + self.vocab_size * h
        return 6 * params + 12 * layers * h * seq_length  # biases and norms: negligible

    def with_vocab_size(self, vocab_size: int) -> "LlamaArchitecture":
        return dataclasses.replace(self, vocab_size=vocab_size)

    # --- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> "LlamaArchitecture":
        source = "config"
        if not isinstance(config, dict):
            source = str(config)
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
                source = str(path)
            config = json.loads(path.read_text())
        return _from_hf_dict(config, source)

    def to_hf_config(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling == "linear":
            rope.update(rope_type="linear", factor=self.rope_scaling_factor)
        elif self.rope_scaling == "llama3":
            rope.update(rope_type="llama3", factor=self.rope_scaling_factor, **_MCORE_LLAMA3_SCALING)
        config = {
            "architectures": [self.family.hf_class], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": None if rope["rope_type"] == "default" else rope,
            "rope_parameters": rope,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype, "dtype": self.torch_dtype,
        }
        if self.model_type == "mistral":
            config["sliding_window"] = None
        if self.model_type in ("qwen2", "qwen3"):
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        if self.model_type == "qwen2":
            del config["attention_bias"]  # Qwen2's q/k/v biases are not a config field
        return config

    # --- megatron-core ---------------------------------------------------------------------------

    def transformer_config(self, tp_size: int = 1, pp_size: int = 1,
                           params_dtype: torch.dtype = torch.float32, **overrides: Any):
        """megatron-core TransformerConfig for this architecture (no dropout; biases on q/k/v only
        where the family has them)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_parallel_layout(tp_size, pp_size)
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads, kv_channels=self.head_dim,
            normalization="RMSNorm", layernorm_epsilon=self.rms_norm_eps,
            gated_linear_unit=True, activation_func=F.silu,
            add_bias_linear=False, add_qkv_bias=self.qkv_bias, qk_layernorm=self.qk_norm,
            hidden_dropout=0.0, attention_dropout=0.0,
            persist_layer_norm=False, gradient_accumulation_fusion=False, **gpu_fusions(),
            tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size,
            params_dtype=params_dtype, pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
            use_cpu_initialization=not torch.cuda.is_available(),  # on GPUs straight into device memory
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


@functools.cache
def gpu_module_available(name: str) -> bool:
    """Whether an optional GPU acceleration (TransformerEngine, an apex kernel) can be used here:
    importable, and CUDA present to be of any use."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def gpu_fusions() -> dict[str, bool]:
    """megatron-core's fused kernels where this machine has them, as Megatron-LM's LLaMA setting
    uses them: SwiGLU and bias-dropout-add (megatron-core's own jit fusions, CUDA), RoPE (TE's
    kernel) and the masked softmax of the local spec's attention (the compiled CUDA extension).
    All off on CPU, where they do not exist."""
    cuda = torch.cuda.is_available()
    return {"bias_activation_fusion": cuda, "bias_dropout_fusion": cuda,
            "apply_rope_fusion": gpu_module_available("transformer_engine"),
            "masked_softmax_fusion": gpu_module_available("scaled_upper_triang_masked_softmax_cuda")}


def _refuse_sliding_windows(cfg: dict[str, Any], family: str, source: str) -> None:
    """megatron-core's attention here is full causal: a model that attends through a window must
    not build as one that does not. Mistral's window is on when set; Qwen's only with
    ``use_sliding_window`` (its ``sliding_window`` is then a size nobody uses)."""
    why = ("megatron-core's attention here is full causal; configs build only without a window "
           "(Mistral: sliding_window null; Qwen: use_sliding_window false)")
    if family == "mistral" and cfg.get("sliding_window") is not None:
        raise UnsupportedConfigError(f"{source}: field sliding_window={cfg['sliding_window']!r} is not supported: {why}")
    if family in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window"):
            raise UnsupportedConfigError(f"{source}: field use_sliding_window=True is not supported: {why}")
        windowed = [t for t in cfg.get("layer_types") or [] if t != "full_attention"]
        if windowed:
            raise UnsupportedConfigError(f"{source}: field layer_types has {windowed[0]!r} layers: {why}")


def _from_hf_dict(cfg: dict[str, Any], source: str) -> LlamaArchitecture:
    archs = cfg.get("architectures") or []
    family = cfg.get("model_type")
    if family not in FAMILIES or any(a != FAMILIES[family].hf_class for a in archs):
        raise UnsupportedConfigError(
            f"{source}: model_type={family!r}, architectures={archs}; supported: "
            + ", ".join(f"{f.hf_class} (model_type {name!r})" for name, f in FAMILIES.items()))
    _refuse_sliding_windows(cfg, family, source)
    refusals = {
        "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
        "mlp_bias": (bool(cfg.get("mlp_bias", False)), False),
    }
    if family != "qwen2":  # Qwen2 has its q/k/v biases whatever the field says (HF ignores it)
        refusals["attention_bias"] = (bool(cfg.get("attention_bias", False)), False)
    for field, (value, wanted) in refusals.items():
        if value != wanted:
            raise UnsupportedConfigError(f"{source}: field {field}={value!r} is not supported "
                                         f"(the {FAMILIES[family].hf_class} layout here needs {wanted!r})")
    heads = int(cfg["num_attention_heads"])
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling, factor = None, 1.0
    if rope_type == "linear":
        scaling, factor = "linear", float(rope["factor"])
    elif rope_type == "llama3":
        for key, value in _MCORE_LLAMA3_SCALING.items():
            if float(rope.get(key, value)) != value:
                raise UnsupportedConfigError(
                    f"{source}: rope scaling field {key}={rope[key]} differs from the value "
                    f"{value} that megatron-core's llama3 scaling hard-codes")
        scaling, factor = "llama3", float(rope["factor"])
    elif rope_type != "default":
        raise UnsupportedConfigError(f"{source}: field rope_type={rope_type!r} is not supported "
                                     "(default, linear, llama3)")
    try:
        return LlamaArchitecture(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=theta,
            rope_scaling=scaling, rope_scaling_factor=factor,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), model_type=family,
        )
    except KeyError as missing:
        raise UnsupportedConfigError(f"{source}: required field {missing.args[0]} is missing") from None
