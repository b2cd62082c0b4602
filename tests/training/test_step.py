"""Micro-batches are made on the host; the step hands them to the model and the loss on the
model's device (a GPU run's first step failed on CPU batches before). The "meta" device stands in
for a GPU: a tensor left on the CPU shows up as a CPU device here."""

from __future__ import annotations

import torch

from megatron_adapt.training.step import _forward_step


class _DeviceProbe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(2, device="meta"))
        self.seen: dict[str, torch.device] = {}

    def forward(self, tokens, positions, attention_mask=None):
        self.seen = {"tokens": tokens.device, "positions": positions.device}
        return tokens


def test_batch_reaches_the_model_and_the_loss_on_the_models_device():
    model = _DeviceProbe()
    batch = {"tokens": torch.randint(0, 9, (2, 8)), "labels": torch.randint(0, 9, (2, 8)),
             "loss_mask": torch.ones(2, 8, dtype=torch.long)}
    _, loss_func = _forward_step(None, iter([batch]), model)
    meta = torch.device("meta")
    assert model.seen == {"tokens": meta, "positions": meta}, f"model inputs on {model.seen}"
    loss_batch = loss_func.args[1]
    assert {k: v.device for k, v in loss_batch.items()} == dict.fromkeys(batch, meta), "loss inputs off the device"
