"""Freeze policies: which parameters a training stage updates.

Stage 1 trains only the rows of added tokens. That split is a property of the vocabulary layers,
declared when the model is built (``FreezePolicy.vocab_layout`` → ``model.vocab.VocabLayout``);
this module then switches ``requires_grad`` off for everything else, and for any parameter a
pattern names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Literal, get_args

import torch

from megatron_adapt.model.vocab import VocabLayout

log = logging.getLogger(__name__)

TrainWhat = Literal["all", "new_vocab_rows"]


@dataclasses.dataclass
class FreezePolicy:
    """What a training stage updates."""

    train: TrainWhat = "all"
    """'all' (stage 2) or 'new_vocab_rows' (stage 1: only the rows of added tokens)."""
    freeze: list[str] = dataclasses.field(default_factory=list)
    """fnmatch patterns of parameter names to freeze as well, e.g. 'decoder.layers.0.*'."""

    def __post_init__(self) -> None:
        if self.train not in get_args(TrainWhat):
            raise ValueError(f"freeze policy train={self.train!r}: expected 'all' or 'new_vocab_rows'")

    def vocab_layout(self, base_vocab_size: int, fused: bool = False) -> VocabLayout:
        """The vocabulary layers this policy needs (rows from ``base_vocab_size`` on train in stage 1)."""
        first = base_vocab_size if self.train == "new_vocab_rows" else None
        return VocabLayout(first_trainable=first, fused=fused)


def apply_freeze_policy(model: torch.nn.Module, policy: FreezePolicy) -> int:
    """Set what trains; returns this rank's trainable parameter count."""
    if policy.train == "new_vocab_rows":
        layout = getattr(model, "vocab_layout", None)
        if layout is None or layout.first_trainable is None:
            raise ValueError("train=new_vocab_rows needs a model built with the vocabulary rows split "
                             "(build_llama(..., vocab=policy.vocab_layout(base_vocab_size)))")
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith(".trainable_rows")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.freeze):
            param.requires_grad = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("freeze policy %s: %d trainable parameters on this rank", policy, trainable)
    return trainable
