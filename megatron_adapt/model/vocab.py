"""The vocabulary layers (embedding table, output layer), declared when the model is built.

megatron-core's GPTModel creates its VocabParallelEmbedding and output ColumnParallelLinear itself
and has no spec to swap them, so ``build.LlamaGPTModel`` adopts the two instances into the
subclasses below right after megatron-core made them, before any weight is loaded. Everything that
treats these layers differently asks one marker type, ``VocabRows``, and its typed attributes.

Two build arguments of ``build.LlamaGPTModel`` say what they do, one each:

- **Row split** (``first_trainable_row``; stage 1 trains only the rows of added tokens). A gradient mask would still
  allocate a gradient and optimizer state for every row (16 bytes per parameter with Adam in mixed
  precision) and let weight decay move the masked rows. Instead each TP rank's slice keeps all its
  rows in one buffer, and only the added rows are a Parameter, a view of those rows. ``weight``
  returns the whole slice through an autograd function whose backward hands back the trainable
  rows' gradient only. ``state_dict`` still holds one ordinary ``weight``, so checkpoints and the
  HF export do not know about the split.
- **Tied** (``tie_word_embeddings``): megatron-core's output layer owns no table on the first
  stage; ours reads the embedding's (``VocabOutput.table``), so the row split and fused loss apply
  to the one table. With PP > 1 the last stage holds a copy, and megatron-core all-reduces the
  gradient of ``LlamaGPTModel.shared_embedding_or_output_weight()`` between the two stages — the
  trainable rows when split, so both copies of the new rows take the same steps and the frozen
  rows, buffers on both stages, never move.
- **Fused kernels** (``fused_vocab``): the embedding looks its ids up with
  ``kernels.embedding.vocab_embedding`` over the two tables (no gradient for the frozen one); the
  output layer is not called: the model's last stage returns its final hidden states and
  ``model.loss.fused_loss_sum`` applies this layer's weight inside
  ``kernels.linear_cross_entropy`` (no [tokens, vocab] logits tensor).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megatron_adapt.kernels.embedding import vocab_embedding


def vocab_slice_start(rows_per_rank: int) -> int:
    """Global id of this TP rank's first vocabulary row (the padded vocabulary splits evenly)."""
    return parallel_state.get_tensor_model_parallel_rank() * rows_per_rank


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


class VocabRows:
    """Marker of the two vocabulary layers, mixed in before megatron-core's class."""

    vocab_start: int
    """Global id of this rank's first row."""
    new_rows: tuple[int, int] | None
    """Global ids [first, end) of the rows that train when the table is row-split; None otherwise."""
    trainable_span: tuple[int, int]
    """Rows [start, stop) of this rank's slice that train (all of them when not split)."""

    @property
    def weight(self) -> torch.Tensor:
        if self.new_rows is None:
            return self._parameters.get("weight")  # None: a tied output layer on the embedding's stage
        return _JoinRows.apply(self.trainable_rows, self.all_rows, *self.trainable_span)

    def _adopt(self, first_trainable_row: int | None, true_vocab_size: int) -> None:
        weight = self._parameters["weight"]
        self.vocab_start = vocab_slice_start(weight.shape[0])
        self.new_rows = None
        self.trainable_span = (0, weight.shape[0])
        if first_trainable_row is not None:
            self._split_rows(weight, first_trainable_row, true_vocab_size)

    def _split_rows(self, weight: torch.nn.Parameter, first: int, end: int) -> None:
        rows = weight.shape[0]
        start = min(max(first - self.vocab_start, 0), rows)
        stop = min(max(end - self.vocab_start, start), rows)
        del self._parameters["weight"]
        self.register_buffer("all_rows", weight.data, persistent=True)
        # Trainable even with no rows (a slice without added tokens): every TP rank must build the
        # same autograd graph, or the backward pass's collectives would not pair up.
        self.trainable_rows = torch.nn.Parameter(weight.data[start:stop], requires_grad=True)
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "shared", "shared_embedding", "zero_out_wgrad",
                     "is_embedding_or_output_parameter"):
            if hasattr(weight, attr):
                setattr(self.trainable_rows, attr, getattr(weight, attr))
        self.new_rows, self.trainable_span = (first, end), (start, stop)
        self._register_state_dict_hook(_state_dict_hook)
        self._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)


def _state_dict_hook(module: VocabRows, state_dict, prefix, local_metadata) -> None:
    start, stop = module.trainable_span
    full = module.all_rows.detach().clone()
    full[start:stop] = module.trainable_rows.detach()
    state_dict.pop(prefix + "trainable_rows", None)
    state_dict.pop(prefix + "all_rows", None)
    state_dict[prefix + "weight"] = full


def _load_state_dict_pre_hook(module: VocabRows, state_dict, prefix, *args) -> None:
    weight = state_dict.pop(prefix + "weight", None)
    if weight is not None:
        start, stop = module.trainable_span
        state_dict[prefix + "all_rows"] = weight
        state_dict[prefix + "trainable_rows"] = weight[start:stop]


class VocabEmbedding(VocabRows, VocabParallelEmbedding):
    """The word embedding: megatron-core's lookup, or with ``fused`` one op over both tables."""

    fused: bool = False

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(input_)
        table, trainable, (start, _) = vocab_tables(self)
        output = vocab_embedding(input_, table, trainable, self.vocab_start, start)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(output.transpose(0, 1).contiguous(),
                                                             group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(output, group=self.tp_group)


class VocabOutput(VocabRows, ColumnParallelLinear):
    """The output layer: megatron-core's, its weight read from ``table`` (itself, or the embedding
    it is tied to on the same stage)."""

    def _adopt(self, first_trainable_row: int | None, true_vocab_size: int, table: VocabEmbedding | None = None) -> None:
        self.__dict__["_table"] = table  # not a submodule: the embedding stays the embedding's
        if table is None:
            super()._adopt(first_trainable_row, true_vocab_size)
        else:
            self.new_rows = None
        if self.table.new_rows is not None:
            # Gradient-accumulation fusion (apex) writes the weight gradient into the weight's
            # ``main_grad``; a row-split weight is the joined rows, which have none: the gradient
            # goes through autograd to the trainable rows' Parameter instead.
            self.gradient_accumulation_fusion = False

    @property
    def table(self) -> VocabRows:
        """The layer holding the output weight: this one, or the embedding it is tied to."""
        return self.__dict__["_table"] or self

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        # ``weight`` is what megatron-core passes for tied embeddings: our model hands it the
        # trainable Parameter (for its gradient all-reduce), so the table is read here instead.
        return super().forward(input_, self.table.weight, runtime_gather_output)


def adopt_vocab_layer(layer: torch.nn.Module, first_trainable_row: int | None, true_vocab_size: int,
                      table: VocabEmbedding | None = None) -> VocabRows:
    """Turn megatron-core's freshly built embedding or output layer into ours (weights untouched):
    rows from ``first_trainable_row`` on train alone (None: all). An output layer tied to the
    embedding on the same stage gets that embedding as ``table``."""
    if isinstance(layer, VocabParallelEmbedding):
        layer.__class__ = VocabEmbedding
        layer._adopt(first_trainable_row, true_vocab_size)
    elif isinstance(layer, ColumnParallelLinear):
        layer.__class__ = VocabOutput
        layer._adopt(first_trainable_row, true_vocab_size, table)
    else:
        raise TypeError(f"{type(layer).__name__} is not a vocabulary layer megatron-core builds")
    return layer


def vocab_tables(layer: VocabRows) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(whole slice, trainable rows, their span in the slice): for a row-split layer the trainable
    rows are their own Parameter; otherwise the whole weight trains."""
    if layer.new_rows is not None:
        _sync_rows(layer.trainable_rows, layer.all_rows, *layer.trainable_span)
        return layer.all_rows, layer.trainable_rows, layer.trainable_span
    weight = layer.weight
    return weight.detach(), weight, layer.trainable_span


def vocab_layers(model: torch.nn.Module) -> list[VocabRows]:
    """The embedding and output layer on this rank's pipeline stage (in that order)."""
    layers = []
    if getattr(model, "pre_process", False):
        layers.append(model.embedding.word_embeddings)
    if getattr(model, "post_process", False):
        layers.append(model.output_layer)
    return layers


def trainable_table_param(layer: torch.nn.Module) -> torch.Tensor | None:
    """The Parameter that trains in a vocabulary table: its added rows when split, else the weight."""
    if isinstance(layer, VocabRows) and layer.new_rows is not None:
        return layer.trainable_rows
    return layer._parameters.get("weight")  # None: a tied output layer on the embedding's stage


def trainable_row_shards(model: torch.nn.Module) -> dict[str, ShardedTensor]:
    """Where each row-split layer's trainable rows sit in the checkpoint, for the optimizer.

    megatron-core finds a parameter's optimizer state a home by looking the parameter up in the
    model's sharded state dict; ``trainable_rows`` is not there (the model saves one ``weight``).
    Its state is keyed as a slice of a global tensor of all added rows, which is the same for every
    TP layout, so stage-1 optimizer state reshards like any other.
    """
    shards = {}
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, layer in model.named_modules():
        if not isinstance(layer, VocabRows) or layer.new_rows is None:
            continue
        rows = layer.trainable_rows
        first, end = layer.new_rows
        offset = min(max(layer.vocab_start + layer.trainable_span[0] - first, 0), end - first)  # empty: clamped
        key, copy = f"{name}.weight.added_rows", 0
        if tied and isinstance(layer, VocabOutput):  # the last stage's copy of the embedding's rows
            key, copy = "embedding.word_embeddings.weight.added_rows", 1
        if rows.numel() == 0:  # a TP rank without added rows writes nothing: as a main replica its
            copy = 1           # (key, offset) would be the first rows' and torch may keep its empty write
        shards[f"{name}.trainable_rows"] = ShardedTensor(
            key=key, data=rows, dtype=rows.dtype, local_shape=tuple(rows.shape),
            global_shape=(end - first, rows.shape[1]), global_offset=(offset, 0), axis_fragmentations=None,
            replica_id=(copy, 0, dp_rank))
    return shards
