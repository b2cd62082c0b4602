"""One forward-backward pass over micro-batches through megatron-core's pipeline schedule.

A batch is a dict with ``tokens`` and ``labels`` ([b, s] int64) and optionally ``loss_mask``
([b, s], 1 where a token counts: targets of a translation prompt, say) and ``segment_ids``
([b, s], the packed document of each token: attention stays within it). Every pipeline stage
calls the same function; only the last stage computes a loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_adapt.model.build import unwrap


def _loss_func(model, batch: dict[str, torch.Tensor], on_logits: Callable | None,
               output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``output``: the last stage's logits, or its hidden states when the model's loss is fused."""
    module = unwrap(model)
    if on_logits is not None:
        if module.fused_vocab:
            raise ValueError("on_logits needs logits: build the model without the fused vocabulary kernels")
        on_logits(output.detach().clone())  # a copy: megatron-core's cross entropy overwrites its input
    loss_sum, num_tokens = module.loss_sum(output, batch["labels"], batch.get("loss_mask"))
    return loss_sum, num_tokens, {"lm_loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s], True where a query may not attend to a key: a later token or another document.

    Positions are not reset per document: RoPE scores depend only on the distance between query
    and key, so within one document the offset of its start changes nothing."""
    s = segment_ids.shape[1]
    later = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).triu(1)
    other = segment_ids[:, :, None] != segment_ids[:, None, :]
    return (other | later).unsqueeze(1)


def _forward_step(on_logits: Callable | None, data_iterator: Iterable, model):
    # Every stage draws the batch so that iterators stay aligned; only the first stage reads
    # tokens and only the last reads labels.
    device = next(model.parameters()).device  # micro-batches are made (and pinned) on the host
    batch = {key: value.to(device, non_blocking=True) for key, value in next(data_iterator).items()}
    b, s = batch["tokens"].shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    mask = document_causal_mask(batch.pop("segment_ids")) if "segment_ids" in batch else None
    # this rank's part of every sequence (no-op without context parallelism)
    batch = get_batch_on_this_cp_rank(batch | {"positions": positions})
    positions = batch.pop("positions")
    output = model(batch["tokens"], positions, attention_mask=mask)
    return output, functools.partial(_loss_func, model, batch, on_logits)


class StepLoss(NamedTuple):
    """The loss of some micro-batches: the sum over their target tokens, and how many there were."""

    total: float
    tokens: float

    @property
    def mean(self) -> float:
        return self.total / max(self.tokens, 1.0)

    def __add__(self, other: "StepLoss") -> "StepLoss":
        return StepLoss(self.total + other.total, self.tokens + other.tokens)


def forward_backward(model, batches: list[dict[str, torch.Tensor]], forward_only: bool = False,
                     on_logits: Callable[[torch.Tensor], None] | None = None) -> StepLoss | None:
    """Run the schedule over ``batches`` (one per micro-batch); gradients accumulate in the model.

    Returns the loss on the last pipeline stage, None elsewhere (one host sync per call).
    ``on_logits`` receives each micro-batch's vocab-parallel logits (last stage), for inspection.
    """
    micro_batch_size, seq_length = batches[0]["tokens"].shape
    losses = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, on_logits),
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    total, tokens = torch.stack([d["lm_loss"] for d in losses]).sum(0).tolist()
    return StepLoss(total, tokens)
