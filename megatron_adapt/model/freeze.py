"""Freeze policies, and vocabulary layers whose original rows are frozen without costing memory.

Stage 1 of the recipe trains only the rows of the added vocabulary. A gradient mask would still
allocate a gradient and optimizer state for all rows (16 bytes per parameter with Adam in mixed
precision) and let weight decay move the masked rows. Here each TP rank's slice of the embedding
and output weight keeps all its rows in one tensor (a buffer), and only the rows of added tokens
are a Parameter — a view of those rows. The layer's ``weight`` is a property that returns the
whole slice through an autograd function whose backward hands back the trainable rows' gradient
only, so the frozen rows have no gradient buffer, no optimizer state and cannot move.
``state_dict`` still holds one ordinary ``weight`` tensor, so checkpoints and the HF export do not
know about the split.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

log = logging.getLogger(__name__)


def _sync_rows(trainable: torch.Tensor, full: torch.Tensor, start: int, stop: int) -> None:
    """Write the trainable rows into the whole slice if they no longer alias it."""
    if trainable.data_ptr() != full[start:stop].data_ptr():  # an optimizer re-homed the param
        full.data[start:stop].copy_(trainable.data)  # .data: no version bump for saved tensors


class _JoinRows(torch.autograd.Function):
    """Forward: the whole slice (trainable rows written in if they no longer alias it).
    Backward: the gradient of the trainable rows only."""

    @staticmethod
    def forward(ctx, trainable: torch.Tensor, full: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        ctx.start, ctx.stop = start, stop
        _sync_rows(trainable, full, start, stop)
        return full.view_as(full)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start:ctx.stop], None, None, None


class _RowSplitMixin:
    """Mixed into a megatron-core VocabParallelEmbedding / ColumnParallelLinear instance."""

    @property
    def weight(self) -> torch.Tensor:
        return _JoinRows.apply(self.trainable_rows, self.all_rows, *self.trainable_span)


def _state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    start, stop = module.trainable_span
    full = module.all_rows.detach().clone()
    full[start:stop] = module.trainable_rows.detach()
    state_dict.pop(prefix + "trainable_rows", None)
    state_dict.pop(prefix + "all_rows", None)
    state_dict[prefix + "weight"] = full


def _load_state_dict_pre_hook(module, state_dict, prefix, *args) -> None:
    weight = state_dict.pop(prefix + "weight", None)
    if weight is not None:
        start, stop = module.trainable_span
        state_dict[prefix + "all_rows"] = weight
        state_dict[prefix + "trainable_rows"] = weight[start:stop]


def split_vocab_rows(layer: torch.nn.Module, vocab_start: int, first_trainable: int, end_trainable: int) -> int:
    """Make rows [first_trainable, end_trainable) of this rank's slice (which starts at global id
    ``vocab_start``) the only trainable part of ``layer.weight``. Returns the trainable row count."""
    weight = layer.weight
    rows = weight.shape[0]
    start = min(max(first_trainable - vocab_start, 0), rows)
    stop = min(max(end_trainable - vocab_start, start), rows)
    all_rows = weight.data
    del layer._parameters["weight"]
    layer.register_buffer("all_rows", all_rows, persistent=True)
    # Trainable even with no rows (a slice without added tokens): every TP rank must build the
    # same autograd graph, or the backward pass's collectives would not pair up.
    layer.trainable_rows = torch.nn.Parameter(all_rows[start:stop], requires_grad=True)
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(weight, attr):
            setattr(layer.trainable_rows, attr, getattr(weight, attr))
    layer.trainable_span = (start, stop)
    layer.new_rows_span = (first_trainable, end_trainable)
    layer.vocab_start = vocab_start
    layer.__class__ = type(f"RowSplit{type(layer).__name__}", (_RowSplitMixin, type(layer)), {})
    layer._register_state_dict_hook(_state_dict_hook)
    layer._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)
    return stop - start


def vocab_tables(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(whole slice, trainable rows, their span in the slice) of an embedding or output layer.

    For a layer split by ``split_vocab_rows`` the trainable rows are their own Parameter;
    otherwise the whole weight is trainable.
    """
    if isinstance(layer, _RowSplitMixin):
        _sync_rows(layer.trainable_rows, layer.all_rows, *layer.trainable_span)
        return layer.all_rows, layer.trainable_rows, layer.trainable_span
    weight = layer.weight
    return weight.detach(), weight, (0, weight.shape[0])


def trainable_row_shards(model: torch.nn.Module) -> dict[str, ShardedTensor]:
    """Where each row-split layer's trainable rows sit in the checkpoint, for the optimizer.

    megatron-core finds a parameter's optimizer state a home by looking the parameter up in the
    model's sharded state dict; ``trainable_rows`` is not there (the model saves one ``weight``).
    Its state is keyed as a slice of a global tensor of all added rows, which is the same for every
    TP layout, so stage-1 optimizer state reshards like any other.
    """
    shards = {}
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    for name, layer in model.named_modules():
        if not isinstance(layer, _RowSplitMixin):
            continue
        rows = layer.trainable_rows
        first, end = layer.new_rows_span
        offset = min(max(layer.vocab_start + layer.trainable_span[0] - first, 0), end - first)  # empty: clamped
        shards[f"{name}.trainable_rows"] = ShardedTensor(
            key=f"{name}.weight.added_rows", data=rows, dtype=rows.dtype, local_shape=tuple(rows.shape),
            global_shape=(end - first, rows.shape[1]), global_offset=(offset, 0), axis_fragmentations=None,
            replica_id=(0, 0, dp_rank))
    return shards


@dataclasses.dataclass
class FreezePolicy:
    """What a training stage updates."""

    train: str = "all"
    """'all' (stage 2) or 'new_vocab_rows' (stage 1: only the rows of added tokens)."""
    freeze: list[str] = dataclasses.field(default_factory=list)
    """fnmatch patterns of parameter names to freeze as well, e.g. 'decoder.layers.0.*'."""

    def __post_init__(self) -> None:
        if self.train not in ("all", "new_vocab_rows"):
            raise ValueError(f"freeze policy train={self.train!r}: expected 'all' or 'new_vocab_rows'")


def vocab_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """(layer, global id of its first row) for the embedding and output layer on this rank."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    layers = []
    if getattr(model, "pre_process", False):
        embedding = model.embedding.word_embeddings
        layers.append((embedding, embedding.vocab_start_index))
    if getattr(model, "post_process", False):
        output = model.output_layer
        layers.append((output, tp_rank * output.weight.shape[0]))
    return layers


def apply_freeze_policy(model: torch.nn.Module, policy: FreezePolicy, base_vocab_size: int | None = None) -> int:
    """Set what trains; returns this rank's trainable parameter count."""
    if policy.train == "new_vocab_rows":
        if base_vocab_size is None:
            raise ValueError("freezing the original vocabulary needs base_vocab_size")
        for param in model.parameters():
            param.requires_grad = False
        for layer, vocab_start in vocab_layers(model):
            split_vocab_rows(layer, vocab_start, base_vocab_size, model.true_vocab_size)
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.freeze):
            param.requires_grad = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("freeze policy %s: %d trainable parameters on this rank", policy, trainable)
    return trainable
