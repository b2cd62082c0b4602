"""LoRA adapters on the tensor-parallel linear layers (megatron-core's or TE's), one per HF module as
PEFT has them.

megatron-core fuses q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``; PEFT, and the LoRA
recipes users bring (Tibetan-Llama2: rank 64, alpha 128 on q/k/v/o and the MLP), put a separate
A and B on each HF module. So each fused linear carries one adapter per HF module it holds, and its
delta is laid out like the fused output: adapters are PEFT's tensor for tensor, a PEFT export is a
relabelling, and a merge is ``W += alpha/rank · B @ A`` on HF tensors.

Tensor parallelism, for an input ``x`` and adapter ``B @ A``:

- column-parallel linear (its input whole on every rank, its output rows split): A is replicated,
  B holds this rank's output rows. ``x @ A.T`` enters the TP region through megatron-core's
  ``copy_to_tensor_model_parallel_region``, whose backward all-reduces, so every rank's A gets
  the whole gradient;
- row-parallel linear (its input columns split, its output all-reduced): A holds this rank's input
  columns, and ``x_r @ A_r.T`` is all-reduced (``reduce_from_tensor_model_parallel_region``)
  before the replicated B.

Under sequence parallelism the column-parallel input and the row-parallel output are this rank's
part of the sequence: the rank-r product ``x @ A.T`` is all-gathered along the sequence (column)
or reduce-scattered along it (row) in place of the copy and all-reduce, which moves r values per
token instead of the hidden size's; the replicated factor then sees part of the sequence, so its
gradient is partial and marked ``sequence_parallel`` for megatron-core to all-reduce over TP.

The adapters are declared when the model is built: ``build.layer_spec(lora=...)`` names the
adapted linear classes (``lora_linear``), whose constructor allocates this rank's A and B, and
``init_adapters`` then fills them from a generator seeded by layer and module (full size, then
sharded), so a run starts from the same adapters at any TP/PP layout. B starts at zero (PEFT's
default), A with PEFT's Kaiming-uniform.

This module owns everything LoRA names: the PEFT targets, their HF module names, the state-dict
keys of the adapters (``is_adapter_key``) and their HF tensors and shapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

Parallel = Literal["column", "row"]

LORA_TARGETS: dict[str, tuple[str, str, Parallel]] = {
    "q_proj": ("self_attention.linear_qkv", "self_attn.q_proj", "column"),
    "k_proj": ("self_attention.linear_qkv", "self_attn.k_proj", "column"),
    "v_proj": ("self_attention.linear_qkv", "self_attn.v_proj", "column"),
    "o_proj": ("self_attention.linear_proj", "self_attn.o_proj", "row"),
    "gate_proj": ("mlp.linear_fc1", "mlp.gate_proj", "column"),
    "up_proj": ("mlp.linear_fc1", "mlp.up_proj", "column"),
    "down_proj": ("mlp.linear_fc2", "mlp.down_proj", "row"),
}
"""PEFT target name → (the megatron-core linear holding it, the HF module, how that linear is split)."""
ALL_TARGETS = tuple(LORA_TARGETS)
FUSED_PARTS: dict[str, tuple[str, ...]] = {"self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
                                           "mlp.linear_fc1": ("gate_proj", "up_proj")}
"""The HF modules a column-parallel megatron-core linear fuses, in the order of its output."""


def is_adapter_key(name: str) -> bool:
    """Whether a parameter, state-dict key or HF tensor name is a LoRA adapter's
    (``….lora.q_proj.A`` in megatron-core, ``….q_proj.lora_A.weight`` in HF/PEFT)."""
    return ".lora." in name or ".lora_A." in name or ".lora_B." in name


def adapter_layer_rules() -> dict[str, tuple[tuple[str, ...], str]]:
    """Each adapter's layer-relative megatron-core name → (its HF name, its TP layout in
    ``model.weights``' terms): A replicated and B row-split on a column-parallel linear, A
    column-split and B replicated on a row-parallel one."""
    rules = {}
    for target, (linear, hf, parallel) in LORA_TARGETS.items():
        rules[f"{linear}.lora.{target}.A"] = ((f"{hf}.lora_A.weight",), "replicated" if parallel == "column" else "columns")
        rules[f"{linear}.lora.{target}.B"] = ((f"{hf}.lora_B.weight",), "rows" if parallel == "column" else "replicated")
    return rules


def adapter_state_keys(targets: tuple[str, ...] | list[str]) -> set[str]:
    """The layer-relative megatron-core names of the adapters on ``targets``."""
    return {f"{LORA_TARGETS[t][0]}.lora.{t}.{m}" for t in targets for m in "AB"}


def adapter_hf_shapes(layer_prefix: str, base_shapes: dict[str, tuple[int, ...]], config: "LoraConfig") -> dict[str, tuple[int, ...]]:
    """PEFT's adapter tensors of one layer (``model.layers.N.``) with their shapes, from the base shapes."""
    shapes = {}
    for target in config.targets:
        module = layer_prefix + LORA_TARGETS[target][1]
        out_features, in_features = base_shapes[f"{module}.weight"]
        shapes[f"{module}.lora_A.weight"] = (config.rank, in_features)
        shapes[f"{module}.lora_B.weight"] = (out_features, config.rank)
    return shapes


def adapted_module(hf_name: str, config: "LoraConfig") -> str | None:
    """The HF module of a base weight that carries an adapter (``…q_proj``), else None."""
    module = hf_name.removesuffix(".weight")
    return module if any(module.endswith("." + LORA_TARGETS[t][1]) for t in config.targets) else None


@dataclasses.dataclass
class LoraConfig:
    """LoRA on the transformer's linear layers. Base weights are then frozen; which vocabulary rows
    train beside the adapters is ``train.freeze.train``."""

    rank: int = 8
    alpha: float = 16.0
    """The delta is scaled by alpha / rank, as PEFT does."""
    dropout: float = 0.0
    """On the adapter's input, as PEFT's lora_dropout."""
    targets: list[str] = dataclasses.field(default_factory=lambda: list(ALL_TARGETS))
    """PEFT module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
    seed: int = 1234
    """Seeds the adapters' initialization (the same at any TP/PP layout)."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank={self.rank}: must be positive")
        if not self.targets:
            raise ValueError("targets: empty; name at least one of " + ", ".join(ALL_TARGETS))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"targets: {unknown[0]!r} matches no layer; expected names among "
                             + ", ".join(ALL_TARGETS))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def linears(self) -> dict[str, tuple[Parallel, tuple[str, ...]]]:
        """Each adapted megatron-core linear (layer-relative name) → (how it is split, its targets)."""
        out: dict[str, tuple[Parallel, tuple[str, ...]]] = {}
        for target in self.targets:
            linear, _, parallel = LORA_TARGETS[target]
            out[linear] = (parallel, out.get(linear, (parallel, ()))[1] + (target,))
        return out


class LoraPair(torch.nn.Module):
    """One HF module's adapter on this rank: ``A`` [rank, in], ``B`` [out, rank] (local shards)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(a)
        self.B = torch.nn.Parameter(b)


def _hf_sizes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each HF module, from megatron-core's TransformerConfig."""
    h, q, kv, ffn = (config.hidden_size, config.num_attention_heads * config.kv_channels,
                     config.num_query_groups * config.kv_channels, config.ffn_hidden_size)
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (ffn, h), "up_proj": (ffn, h), "down_proj": (h, ffn)}


class _LoraLinear:
    """Mixed in before a linear layer's own class (megatron-core's or TransformerEngine's) by
    ``lora_linear``. Both classes take the layer's input first and return (output, bias), so one
    forward serves them."""

    lora_config: ClassVar[LoraConfig]
    lora_targets: ClassVar[tuple[str, ...]]
    """The HF modules adapted on this linear."""
    lora_base_axes: ClassVar[dict[str, int]]
    """The base layer's state-dict entries split over TP → their split axis."""
    lora_split_factor: ClassVar[str]
    """The adapter factor split like the base weight (B for column-parallel, A for row-parallel)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = kwargs["config"]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.lora_scaling, self.lora_dropout = self.lora_config.scaling, self.lora_config.dropout
        self.lora_sequence_parallel = config.sequence_parallel and tp > 1
        self.lora = torch.nn.ModuleDict()
        sizes, rank, split = _hf_sizes(config), self.lora_config.rank, self.lora_base_axes["weight"]
        for target in self.lora_targets:
            out_features, in_features = sizes[target]
            if self.lora_split_factor == "B":
                out_features //= tp
            else:
                in_features //= tp
            pair = LoraPair(torch.zeros(rank, in_features, dtype=config.params_dtype, device=self.weight.device),
                            torch.zeros(out_features, rank, dtype=config.params_dtype, device=self.weight.device))
            sharded, replicated = (pair.B, pair.A) if self.lora_split_factor == "B" else (pair.A, pair.B)
            tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, split, 1)
            # Under sequence parallelism the replicated factor sees this rank's part of the
            # sequence only: megatron-core all-reduces the gradients of such parameters over TP.
            replicated.sequence_parallel = config.sequence_parallel
            self.lora[target] = pair

    def reset_adapters(self, layer: int) -> None:
        """A from the generator of (seed, global layer, module), this rank's shard of it; B zero."""
        tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for target, pair in self.lora.items():
                seed = self.lora_config.seed * 1_000_003 + layer * 101 + ALL_TARGETS.index(target)
                in_features = pair.A.shape[1] * (tp if self.lora_split_factor == "A" else 1)
                a = torch.empty(pair.A.shape[0], in_features)
                bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), PEFT's init of lora_A
                a.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
                if self.lora_split_factor == "A":
                    a = a.chunk(tp, dim=1)[tp_rank]
                pair.A.copy_(a)
                pair.B.zero_()

    def _lora_input(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        if not self.lora_dropout or not self.training:
            return x
        if sharded:  # each rank holds other columns: its own mask stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, self.lora_dropout)
        return torch.nn.functional.dropout(x, self.lora_dropout)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        split = self.lora_base_axes["weight"]
        axes = self.lora_base_axes | {f"lora.{name}.{self.lora_split_factor}": split for name in self.lora}
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   axes, sharded_offsets,
                                                   tp_group=parallel_state.get_tensor_model_parallel_group(),
                                                   dp_cp_group=metadata["dp_cp_group"])


class LoraColumnParallel(_LoraLinear):
    """linear_qkv or linear_fc1 with adapters for the HF modules it fuses."""

    lora_base_axes = {"weight": 0, "bias": 0}
    lora_split_factor = "B"
    lora_parts: ClassVar[tuple[str, ...]]
    """The HF modules this linear fuses, in the order of its output (q, k, v or gate, up)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = kwargs["config"]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        sizes = _hf_sizes(config)
        self.lora_part_sizes = tuple(sizes[p][0] // tp for p in self.lora_parts)
        """Their output rows on this rank."""
        self.lora_groups = config.num_query_groups // tp if "q_proj" in self.lora_parts else 0
        """KV groups on this rank (linear_qkv: the output is [groups, q heads | k | v] per group)."""

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        x = self._lora_input(input_, sharded=self.lora_sequence_parallel)
        deltas = {}
        for name, pair in self.lora.items():
            xa = x @ pair.A.t()
            if self.lora_sequence_parallel:  # gather the rank-r product, not the hidden states
                xa = gather_from_sequence_parallel_region(xa, tensor_parallel_output_grad=True)
            else:
                xa = copy_to_tensor_model_parallel_region(xa)
            deltas[name] = (xa @ pair.B.t()) * self.lora_scaling
        return output + self._fuse(deltas, output), bias

    def _fuse(self, deltas: dict[str, torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        """The per-module deltas laid out like this linear's output (zeros for modules without one)."""
        sizes = dict(zip(self.lora_parts, self.lora_part_sizes))
        lead = output.shape[:-1]
        parts = [deltas.get(name, output.new_zeros(*lead, sizes[name])) for name in self.lora_parts]
        if self.lora_groups:  # linear_qkv: interleave per KV group
            parts = [p.reshape(*lead, self.lora_groups, -1) for p in parts]
            return torch.cat(parts, dim=-1).reshape(output.shape)
        return torch.cat(parts, dim=-1)


class LoraRowParallel(_LoraLinear):
    """linear_proj or linear_fc2 with the adapter of its HF module."""

    lora_base_axes = {"weight": 1}
    lora_split_factor = "A"

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        x = self._lora_input(input_, sharded=True)
        for pair in self.lora.values():
            xa = x @ pair.A.t()  # a partial sum over this rank's input columns
            if self.lora_sequence_parallel:  # the output is this rank's part of the sequence
                xa = reduce_scatter_to_sequence_parallel_region(xa)
            else:
                xa = reduce_from_tensor_model_parallel_region(xa)
            output = output + (xa @ pair.B.t()) * self.lora_scaling
        return output, bias


def _adaptable(parallel: Parallel) -> tuple[type, ...]:
    """The linear classes adapters attach to: megatron-core's, and TE's plain (unfused) ones.

    TE's fused layernorm + linear (the TE spec's linear_qkv and linear_fc1) keeps the normalized
    input inside, where an adapter cannot see it; ``build.layer_spec`` unfuses it under LoRA."""
    local = ColumnParallelLinear if parallel == "column" else RowParallelLinear
    try:
        from megatron.core.extensions import transformer_engine as te_layers
    except ImportError:
        return (local,)
    if not te_layers.HAVE_TE:  # megatron-core stands mocks in for TE's classes
        return (local,)
    return (local, te_layers.TEColumnParallelLinear if parallel == "column" else te_layers.TERowParallelLinear)


def lora_linear(linear_name: str, base: type, config: LoraConfig) -> type:
    """The class a layer spec names for ``linear_name`` (``self_attention.linear_qkv``, …) to carry
    ``config``'s adapters: ``base`` (a megatron-core or TE linear) with the mixin first."""
    parallel, targets = config.linears()[linear_name]
    adaptable = _adaptable(parallel)
    if base not in adaptable:
        raise ValueError(f"train.lora: {linear_name} is {base.__name__}; adapters attach to "
                         + " or ".join(cls.__name__ for cls in adaptable))
    mixin = LoraColumnParallel if parallel == "column" else LoraRowParallel
    attrs = {"__module__": __name__, "lora_config": config, "lora_targets": targets}
    if parallel == "column":
        attrs["lora_parts"] = FUSED_PARTS[linear_name]
    return type("Lora" + base.__name__, (mixin, base), attrs)


def init_adapters(model: torch.nn.Module) -> None:
    """Initialize every adapter of this rank's layers (``reset_adapters`` with its global layer)."""
    for layer in model.decoder.layers:
        for module in layer.modules():
            if isinstance(module, _LoraLinear):
                module.reset_adapters(layer.layer_number - 1)

