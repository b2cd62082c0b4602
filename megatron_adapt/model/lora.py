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

Adapters are created full-size from a generator seeded by layer and module, then sharded, so a
run starts from the same adapters at any TP/PP layout. B starts at zero (PEFT's default), A with
PEFT's Kaiming-uniform.
"""

from __future__ import annotations

import dataclasses
import functools
import math

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
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.weights import LORA_TARGETS

ALL_TARGETS = tuple(LORA_TARGETS)


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


class LoraPair(torch.nn.Module):
    """One HF module's adapter on this rank: ``A`` [rank, in], ``B`` [out, rank] (local shards)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(a)
        self.B = torch.nn.Parameter(b)


def _full_adapter(config: LoraConfig, layer: int, target: str, in_features: int, out_features: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + layer * 101 + ALL_TARGETS.index(target))
    a = torch.empty(config.rank, in_features)
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), PEFT's init of lora_A
    a.uniform_(-bound, bound, generator=generator)
    return a.to(dtype), torch.zeros(out_features, config.rank, dtype=dtype)


class _LoraLinear:
    """Mixed in before a built linear layer's own class (megatron-core's or TransformerEngine's);
    ``add_lora`` turns the layer into that subclass. Both classes take the layer's input first and
    return (output, bias), so one forward serves them."""

    lora: torch.nn.ModuleDict
    lora_scaling: float
    lora_dropout: float
    lora_sequence_parallel: bool
    lora_base_axes: dict[str, int]
    """The base layer's state-dict entries split over TP → their split axis."""
    lora_split_factor: str
    """The adapter factor split like the base weight (B for column-parallel, A for row-parallel)."""

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

    lora_parts: tuple[str, ...]
    """The HF modules this linear fuses, in the order of its output (q, k, v or gate, up)."""
    lora_part_sizes: tuple[int, ...]
    """Their output rows on this rank."""
    lora_groups: int
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


@functools.cache
def _with_adapters(mixin: type, base: type) -> type:
    """``base`` (a linear layer class) with ``mixin`` first: LoraColumnParallelLinear, LoraTERowParallelLinear, …"""
    return type("Lora" + base.__name__, (mixin, base), {"__module__": __name__})


def _adaptable(parallel: str) -> tuple[type, ...]:
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


def _hf_sizes(arch: LlamaArchitecture) -> dict[str, tuple[int, int]]:
    """(out, in) of each HF module."""
    h, hd = arch.hidden_size, arch.head_dim
    return {"q_proj": (arch.num_attention_heads * hd, h), "k_proj": (arch.num_key_value_heads * hd, h),
            "v_proj": (arch.num_key_value_heads * hd, h), "o_proj": (h, arch.num_attention_heads * hd),
            "gate_proj": (arch.intermediate_size, h), "up_proj": (arch.intermediate_size, h),
            "down_proj": (h, arch.intermediate_size)}


def add_lora(model: torch.nn.Module, config: LoraConfig) -> None:
    """Give this rank's transformer layers their adapters (weights of the base layers untouched)."""
    arch: LlamaArchitecture = model.architecture
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sizes = _hf_sizes(arch)
    dtype = model.config.params_dtype
    fused_parts = {"self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
                   "mlp.linear_fc1": ("gate_proj", "up_proj")}
    for layer in model.decoder.layers:
        global_layer = layer.layer_number - 1
        linears = {}
        for target in config.targets:
            linear_name, _, parallel = LORA_TARGETS[target]
            linears.setdefault(linear_name, (parallel, []))[1].append(target)
        for linear_name, (parallel, targets) in linears.items():
            module = layer.get_submodule(linear_name)
            adaptable = _adaptable(parallel)
            if type(module) not in adaptable:
                raise ValueError(f"train.lora: {linear_name} is {type(module).__name__}; adapters attach to "
                                 + " or ".join(cls.__name__ for cls in adaptable))
            mixin = LoraColumnParallel if parallel == "column" else LoraRowParallel
            split_axis = mixin.lora_base_axes["weight"]
            module.__class__ = _with_adapters(mixin, type(module))
            module.lora = torch.nn.ModuleDict()
            module.lora_scaling, module.lora_dropout = config.scaling, config.dropout
            module.lora_sequence_parallel = model.config.sequence_parallel and tp > 1
            for target in targets:
                out_features, in_features = sizes[target]
                a, b = _full_adapter(config, global_layer, target, in_features, out_features, dtype)
                device = module.weight.device
                if parallel == "column":
                    b = b.chunk(tp, dim=0)[tp_rank]
                else:
                    a = a.chunk(tp, dim=1)[tp_rank]
                pair = LoraPair(a.to(device).contiguous(), b.to(device).contiguous())
                sharded, replicated = (pair.B, pair.A) if parallel == "column" else (pair.A, pair.B)
                tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, split_axis, 1)
                # Under sequence parallelism the replicated factor sees this rank's part of the
                # sequence only: megatron-core all-reduces the gradients of such parameters over TP.
                replicated.sequence_parallel = model.config.sequence_parallel
                module.lora[target] = pair
            if parallel == "column":
                parts = fused_parts[linear_name]
                module.lora_parts = parts
                module.lora_part_sizes = tuple(sizes[p][0] // tp for p in parts)
                module.lora_groups = arch.num_key_value_heads // tp if linear_name.endswith("linear_qkv") else 0
    model.lora_config = config
