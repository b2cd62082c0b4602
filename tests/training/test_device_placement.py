"""Every tensor the training loop hands to the model or the loss is on the model's device.

On a GPU a micro-batch left on the host (or a position or mask tensor made without ``device=``)
fails at step 1 — or, worse, costs a synchronous copy every step. CI has only the CPU, where host
and model device are the same, so here "on the host" is a mark: micro-batches come out of the data
pipeline marked, and so does any tensor our package makes with a factory function that names no
device. A move with ``.to(device)`` clears the mark, ops on marked tensors keep it. The checks
around the model's forward and its loss then fail on any marked tensor, as a device check would on
a GPU. The run covers stage 1's row-split fused vocabulary layers, the training step and evaluation.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {torch.arange, torch.ones, torch.zeros, torch.empty, torch.full, torch.tensor, torch.randn, torch.rand}


class HostTensor(torch.Tensor):
    """A tensor that has not been moved to the model's device."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda) and _names_device(args[1:], kwargs or {}):
            return result.as_subclass(torch.Tensor)
        return result


def _names_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str, int)) for a in args)


def _called_from_package() -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("torch", __name__)):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("megatron_adapt")


class MarkHostFactories(TorchFunctionMode):
    """Marks tensors that megatron_adapt's code makes without naming a device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in FACTORIES and "device" not in (kwargs or {}) and _called_from_package():
            return result.as_subclass(HostTensor)
        return result


def _host_tensors(where: str, *values) -> list[str]:
    found = []
    for i, value in enumerate(values):
        for key, tensor in (value.items() if isinstance(value, dict) else [(i, value)]):
            if isinstance(tensor, HostTensor):
                found.append(f"{where}: argument {key} {tuple(tensor.shape)}")
    return found


def _train_with_device_checks(config_path: str, save: str, out: str) -> None:
    torch.set_num_threads(1)
    from megatron_adapt.model.build import LlamaGPTModel
    from megatron_adapt.training import loop, validation
    from megatron_adapt.training.config import load_config

    stats = {"model_calls": 0, "loss_calls": 0, "marked_batches": 0, "problems": []}

    def marked(batches):
        stats["marked_batches"] += len(batches)
        return [{k: v.as_subclass(HostTensor) for k, v in batch.items()} for batch in batches]

    for module in (loop, validation):
        original = module.micro_batches
        module.micro_batches = lambda *a, _original=original: marked(_original(*a))
    forward, loss_sum = LlamaGPTModel.forward, LlamaGPTModel.loss_sum

    def checked_forward(self, *args, **kwargs):
        stats["model_calls"] += 1
        stats["problems"] += _host_tensors("model forward", *args, kwargs)
        return forward(self, *args, **kwargs)

    def checked_loss(self, output, labels, loss_mask):
        stats["loss_calls"] += 1
        stats["problems"] += _host_tensors("loss", output, labels, loss_mask)
        return loss_sum(self, output, labels, loss_mask)

    LlamaGPTModel.forward, LlamaGPTModel.loss_sum = checked_forward, checked_loss
    config = load_config(config_path, [f"checkpoint.save={save}", "parallel.tp=1", "train.steps=2", "optim.warmup_steps=1",
                                       "train.eval_interval=1", "train.eval_steps=1",
                                       "train.freeze={train: new_vocab_rows}"])
    with MarkHostFactories():
        loop.train(config)
        made = {"__name__": "megatron_adapt.control", "torch": torch}  # as if in the package's code
        exec("on_device = torch.arange(3, device='cpu'); on_host = torch.arange(3)", made)
        stats["control"] = _host_tensors("control", made["on_device"], made["on_host"])
    Path(out).write_text(json.dumps(stats))


@pytest.mark.distributed
def test_loop_gives_model_and_loss_only_device_tensors(recipe, tmp_path):
    out = tmp_path / "stats.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_train_with_device_checks, args=(str(recipe / "config.yaml"), str(tmp_path / "run"), str(out)))
    process.start()
    process.join(600)
    assert process.exitcode == 0, f"the checked training run failed (exit code {process.exitcode})"
    stats = json.loads(out.read_text())
    assert stats["problems"] == [], f"host tensors reached the model or the loss: {sorted(set(stats['problems']))}"
    # The checks ran (2 steps × 2 micro-batches, plus evaluation), the marks were made, and a tensor
    # made here without a device would have been caught.
    assert stats["model_calls"] >= 4 and stats["loss_calls"] >= 4 and stats["marked_batches"] >= 4, stats
    assert stats["control"] == ["control: argument 1 (3,)"], stats["control"]
