"""The one place that knows how Hugging Face LLaMA-family tensors map onto megatron-core's GPTModel.

Every megatron-core parameter of a rank is described by a rule: which HF tensors it is made of and
how they are laid out across tensor-parallel ranks. Loading applies a rule forward for this rank's
shard; exporting gathers the shards of the TP group and applies it backward. Vocabulary resizing
and checkpoint conversion build on these two directions instead of knowing the layout themselves.

megatron-core layouts (per TP rank r of t):
- linear_qkv: for each KV group g the rows [q heads of g | k_g | v_g]; rank r holds groups
  r·G/t … (r+1)·G/t − 1 contiguously. Its bias (Qwen2) is laid out the same way.
- q_layernorm, k_layernorm (Qwen3): one weight [head_dim] each, replicated.
- linear_fc1: [gate rows of shard r | up rows of shard r] (the GLU splits the output in halves).
- linear_proj, linear_fc2: column shards (row-parallel linears).
- LoRA adapters (``model.lora``'s rules), one per HF module as PEFT has them: on a column-parallel linear
  (q/k/v in linear_qkv, gate/up in linear_fc1) A is replicated and B holds this rank's rows of the
  HF output; on a row-parallel one (o in linear_proj, down in linear_fc2) A holds this rank's
  columns of the HF input and B is replicated.
- embedding / output layer: row shards of the vocabulary padded to a multiple of 128·t.
- tied embeddings (``tie_word_embeddings``): HF has no ``lm_head.weight``; megatron-core's output
  layer uses the embedding's table, or with PP > 1 keeps a copy on the last stage that loads from
  ``model.embed_tokens.weight`` and is never exported or checkpointed a second time.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.lora import (
    LoraConfig,
    adapter_hf_shapes,
    adapter_layer_rules,
    adapter_state_keys,
    is_adapter_key,
)
from megatron_adapt.model.vocab import VocabRows, vocab_tables

Tensor = torch.Tensor


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor is missing or has a shape other than the architecture implies."""


Layout = Literal["replicated", "vocab_rows", "rows", "columns", "qkv", "gate_up"]
"""How a megatron-core tensor is laid out across TP ranks, and made of its HF tensors (above)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one megatron-core parameter is made of HF tensors."""

    hf_names: tuple[str, ...]
    layout: Layout


_LAYER_RULES: dict[str, tuple[tuple[str, ...], Layout]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "columns"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "columns"),
} | adapter_layer_rules()
_QKV_BIAS_RULES: dict[str, tuple[tuple[str, ...], Layout]] = {
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
}
_QK_NORM_RULES: dict[str, tuple[tuple[str, ...], Layout]] = {
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "replicated"),
}
_TOP_RULES: dict[str, Rule] = {
    "embedding.word_embeddings.weight": Rule(("model.embed_tokens.weight",), "vocab_rows"),
    "output_layer.weight": Rule(("lm_head.weight",), "vocab_rows"),
    "decoder.final_layernorm.weight": Rule(("model.norm.weight",), "replicated"),
}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def layer_rules(arch: LlamaArchitecture) -> dict[str, tuple[tuple[str, ...], Layout]]:
    """Layer tensor suffix → (HF suffixes, layout), for the family's traits."""
    return (_LAYER_RULES | (_QKV_BIAS_RULES if arch.qkv_bias else {})
            | (_QK_NORM_RULES if arch.qk_norm else {}))


OUTPUT_COPY = "output_layer.weight"
"""With tied embeddings and PP > 1: the last stage's copy of the embedding table."""


def hf_shapes(arch: LlamaArchitecture, lora: LoraConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint (LlamaForCausalLM or a family's) with its shape, and of
    its PEFT LoRA adapters, ``model.layers.N.<module>.lora_A/B.weight``, with ``lora``."""
    h, hd = arch.hidden_size, arch.head_dim
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (arch.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (arch.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, arch.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (arch.intermediate_size, h),
            p + "mlp.up_proj.weight": (arch.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, arch.intermediate_size),
        }
        if arch.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (arch.num_attention_heads * hd,),
                       p + "self_attn.k_proj.bias": (arch.num_key_value_heads * hd,),
                       p + "self_attn.v_proj.bias": (arch.num_key_value_heads * hd,)}
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if lora is not None:
            shapes |= adapter_hf_shapes(p, shapes, lora)
    return shapes


def _grad(param: torch.Tensor) -> torch.Tensor | None:
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, Callable[[], Tensor | None]]]:
    """(name, whole tensor, gradient getter) for every weight of this rank's model piece.

    A row-split vocabulary layer (``model.vocab``) appears as its one ``weight`` (all rows), its
    gradient zero on the frozen rows.
    """
    split = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, VocabRows) and m.new_rows is not None}
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0] + "."
        if owner not in split:
            yield name, param, lambda p=param: _grad(p)
        elif name.endswith(".trainable_rows"):
            layer = split[owner]

            def full_grad(layer=layer, param=param) -> Tensor | None:
                grad = _grad(param)
                if grad is None:
                    return None
                full = torch.zeros_like(layer.all_rows)
                full[slice(*layer.trainable_span)] = grad
                return full

            # the whole slice with the trainable rows written in: the distributed optimizer keeps
            # them in its own buffer, and a forward pass is what otherwise copies them back
            yield owner + "weight", vocab_tables(layer)[0], full_grad


def rules(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, Callable, Rule]]:
    """(megatron name, tensor, gradient getter, rule) for every weight of this rank's model piece."""
    global_layer = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    tied = model.architecture.tie_word_embeddings
    by_suffix = layer_rules(model.architecture)
    for name, param, grad in named_weights(model):
        if name == OUTPUT_COPY and tied:
            yield name, param, grad, _TOP_RULES["embedding.word_embeddings.weight"]
            continue
        if name in _TOP_RULES:
            yield name, param, grad, _TOP_RULES[name]
            continue
        match = _LAYER_NAME.match(name)
        if not match or match.group(2) not in by_suffix:
            raise KeyError(f"megatron-core parameter {name} has no HF mapping")
        hf_suffixes, layout = by_suffix[match.group(2)]
        prefix = f"model.layers.{global_layer[int(match.group(1))]}."
        yield name, param, grad, Rule(tuple(prefix + s for s in hf_suffixes), layout)


def checkpoint_rules(arch: LlamaArchitecture, lora: LoraConfig | None = None) -> Iterator[tuple[str, int | None, Rule]]:
    """(distributed-checkpoint key, layer or None, rule) for every tensor of the whole model, and
    of its LoRA adapters with ``lora``.

    megatron-core's distributed checkpoint stores each layer tensor for all layers as one global
    tensor with a leading layer axis, under its TransformerEngine name (the local spec maps its
    layer-norm names onto those), and every tensor unsharded (as at TP=1).
    """
    adapter_keys = adapter_state_keys(lora.targets) if lora is not None else set()
    for name, rule in _TOP_RULES.items():
        if not (name == OUTPUT_COPY and arch.tie_word_embeddings):
            yield name, None, rule
    for i in range(arch.num_layers):
        for suffix, (hf_suffixes, layout) in layer_rules(arch).items():
            if is_adapter_key(suffix) and suffix not in adapter_keys:
                continue
            yield f"decoder.layers.{suffix}", i, Rule(tuple(f"model.layers.{i}.{s}" for s in hf_suffixes), layout)


# --- HF → this rank's shard -----------------------------------------------------------------------

def shard_from_hf(rule: Rule, tensors: list[Tensor], arch: LlamaArchitecture,
                  padded_vocab: int, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's megatron-core tensor made of the HF tensors named by ``rule``."""
    if rule.layout == "replicated":
        return tensors[0]
    if rule.layout == "vocab_rows":
        full = tensors[0]
        padded = full.new_zeros((padded_vocab, full.shape[1]))
        padded[: full.shape[0]] = full
        return padded.chunk(tp_size, dim=0)[tp_rank]
    if rule.layout == "columns":
        return tensors[0].chunk(tp_size, dim=1)[tp_rank]
    if rule.layout == "rows":
        return tensors[0].chunk(tp_size, dim=0)[tp_rank]
    if rule.layout == "gate_up":
        gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in tensors)
        return torch.cat([gate, up], dim=0)
    if rule.layout == "qkv":
        return _interleave_qkv(*tensors, arch).chunk(tp_size, dim=0)[tp_rank]
    raise ValueError(rule.layout)


def _interleave_qkv(q: Tensor, k: Tensor, v: Tensor, arch: LlamaArchitecture) -> Tensor:
    """Weights [rows, hidden] or biases [rows] alike."""
    groups, hd, rest = arch.num_key_value_heads, arch.head_dim, q.shape[1:]
    q = q.view(groups, arch.q_per_kv * hd, *rest)
    k, v = k.view(groups, hd, *rest), v.view(groups, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


# --- TP shards → HF -----------------------------------------------------------------------------

def hf_from_shards(rule: Rule, shards: list[Tensor], arch: LlamaArchitecture) -> list[Tensor]:
    """The HF tensors named by ``rule`` from the shards of all TP ranks (in rank order)."""
    if rule.layout == "replicated":
        return [shards[0]]
    if rule.layout == "vocab_rows":
        return [torch.cat(shards, dim=0)[: arch.vocab_size]]
    if rule.layout == "columns":
        return [torch.cat(shards, dim=1)]
    if rule.layout == "rows":
        return [torch.cat(shards, dim=0)]
    if rule.layout == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if rule.layout == "qkv":
        hd, rest = arch.head_dim, shards[0].shape[1:]
        full = torch.cat(shards, dim=0).view(arch.num_key_value_heads, -1, *rest)
        q, k, v = full.split([arch.q_per_kv * hd, hd, hd], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    raise ValueError(rule.layout)


# --- whole-model directions --------------------------------------------------------------------

def load_hf_state(model: torch.nn.Module, get_tensor: Callable[[str], Tensor], adapters: bool = False) -> None:
    """Fill this rank's parameters from HF tensors, checking every shape against the architecture.

    ``get_tensor(name)`` returns an HF tensor (a dict's ``__getitem__`` or a checkpoint reader).
    LoRA adapters keep their initialization unless ``adapters`` (PEFT names, ``hf_shapes``).
    """
    arch: LlamaArchitecture = model.architecture
    expected = hf_shapes(arch, model.lora)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for _, param, _, rule in rules(model):
            if is_adapter_key(rule.hf_names[0]) and not adapters:
                continue
            tensors = []
            for hf_name in rule.hf_names:
                try:
                    tensor = get_tensor(hf_name)
                except KeyError:
                    raise CheckpointMismatchError(f"checkpoint has no tensor {hf_name}") from None
                if tuple(tensor.shape) != expected[hf_name]:
                    raise CheckpointMismatchError(
                        f"tensor {hf_name}: checkpoint shape {tuple(tensor.shape)} != "
                        f"shape {expected[hf_name]} implied by the config")
                tensors.append(tensor)
            shard = shard_from_hf(rule, tensors, arch, model.vocab_size, tp_rank, tp_size)
            param.copy_(shard.to(param.dtype))


def export_hf_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The HF tensors of this rank's pipeline stage, gathered over its TP group. Collective over
    the TP group."""
    return _gather_hf(model, lambda param, grad: param)


def export_hf_grads(model: torch.nn.Module) -> dict[str, Tensor]:
    """The gradients of ``export_hf_state``'s tensors in the same HF layout (zero where there is
    none), so that tests compare gradients with HF's directly. Collective over the TP group."""
    def gradient(param: Tensor, grad: Callable[[], Tensor | None]) -> Tensor:
        local = grad()
        return torch.zeros_like(param) if local is None else local
    return _gather_hf(model, gradient)


def _gather_hf(model: torch.nn.Module, local_of: Callable[[Tensor, Callable], Tensor]) -> dict[str, Tensor]:
    arch: LlamaArchitecture = model.architecture
    group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out: dict[str, Tensor] = {}
    for name, param, grad, rule in rules(model):
        if name == OUTPUT_COPY and arch.tie_word_embeddings:
            continue  # the first stage exports the table (and after the grad all-reduce its gradient)
        local = local_of(param, grad).detach().contiguous()
        shards = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(shards, local, group=group)
        for hf_name, tensor in zip(rule.hf_names, hf_from_shards(rule, shards, arch)):
            out[hf_name] = tensor.clone()
    return out
