"""Freeze policies: which parameters a training stage updates.

Stage 1 trains only the rows of added tokens. That split is a property of the vocabulary layers,
declared when the model is built (``FreezePolicy.first_trainable_row`` → ``build_llama``);
this module then switches ``requires_grad`` off for everything else, and for any parameter a
pattern names. Input (embedding) and output rows can be named apart, for staged schedules such as
EEVE's (new input rows → new input and output rows → whole vocabulary → everything), each stage a
config starting from the previous stage's checkpoint.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Literal, get_args

import torch

from megatron_adapt.model.lora import is_adapter_key
from megatron_adapt.model.vocab import trainable_table_param

log = logging.getLogger(__name__)

TrainWhat = Literal["all", "new_vocab_rows", "new_input_rows", "new_output_rows", "vocab", "none"]
VOCAB_PARTS: dict[str, tuple[str, ...]] = {
    "new_vocab_rows": ("input", "output"), "new_input_rows": ("input",), "new_output_rows": ("output",),
    "vocab": ("input", "output"), "none": ()}
"""Which vocabulary tables train under each policy other than 'all' (nothing else does)."""


@dataclasses.dataclass
class FreezePolicy:
    """What a training stage updates."""

    train: TrainWhat = "all"
    """'all' (stage 2); 'new_vocab_rows' (stage 1: only the rows of added tokens, in the embedding
    and the output layer); 'new_input_rows' or 'new_output_rows' (the added rows of one of the two);
    'vocab' (both whole tables, the transformer frozen); 'none' (no base parameter: LoRA adapters
    only). LoRA adapters (``model.lora``) always train."""
    freeze: list[str] = dataclasses.field(default_factory=list)
    """fnmatch patterns of parameter names to freeze as well, e.g. 'decoder.layers.0.*'."""

    def __post_init__(self) -> None:
        if self.train not in get_args(TrainWhat):
            raise ValueError(f"freeze policy train={self.train!r}: expected one of {', '.join(get_args(TrainWhat))}")

    @property
    def new_rows_only(self) -> bool:
        return self.train.startswith("new_")

    def first_trainable_row(self, base_vocab_size: int) -> int | None:
        """The row split this policy needs when the model is built: rows from ``base_vocab_size`` on
        train alone, or None (no split)."""
        return base_vocab_size if self.new_rows_only else None


def apply_freeze_policy(model: torch.nn.Module, policy: FreezePolicy) -> int:
    """Set what trains; returns this rank's trainable parameter count."""
    if policy.train != "all":
        if policy.new_rows_only and model.first_trainable_row is None:
            raise ValueError(f"train={policy.train} needs a model built with the vocabulary rows split "
                             "(build_llama(..., first_trainable_row=policy.first_trainable_row(base_vocab_size)))")
        parts = VOCAB_PARTS[policy.train]
        if getattr(model, "share_embeddings_and_output_weights", False) and len(parts) == 1:
            raise ValueError(f"train={policy.train}: the model ties its embedding and output layer, so input "
                             "and output rows are one table; use new_vocab_rows")
        for param in model.parameters():
            param.requires_grad = False
        tables = {"input": model.embedding.word_embeddings if model.pre_process else None,
                  "output": model.output_layer if model.post_process else None}
        for part in parts:
            if tables[part] is not None and (param := trainable_table_param(tables[part])) is not None:
                param.requires_grad = True
    for name, param in model.named_parameters():
        if is_adapter_key(name):
            param.requires_grad = True
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.freeze):
            param.requires_grad = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("freeze policy %s: %d trainable parameters on this rank", policy, trainable)
    return trainable
