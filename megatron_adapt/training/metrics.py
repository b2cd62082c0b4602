"""Training metrics: throughput figures, and the sinks they go to (log, metrics.jsonl, wandb,
tensorboard) from the one rank that holds the loss."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megatron_adapt.training.config import Config, to_dict

log = logging.getLogger(__name__)


class MetricsSink:
    """RUN/metrics.jsonl, and wandb (offline unless WANDB_MODE says otherwise) and tensorboard
    where configured. Inactive on every rank but the one given ``active``."""

    def __init__(self, config: Config, active: bool) -> None:
        self.active, self.wandb, self.tb = active, None, None
        self.path = Path(config.checkpoint.save) / "metrics.jsonl"
        if not active:
            return
        if config.logging.wandb_project:
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            self.wandb = wandb.init(project=config.logging.wandb_project, name=config.logging.wandb_run or None,
                                    dir=config.checkpoint.save, config=to_dict(config), resume="allow")
        if config.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(config.checkpoint.save) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard requested but not installed; skipping it")

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)


class Throughput:
    """Tokens/s and TFLOP/s per device since the last report (and MFU against ``peak_tflops``)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, devices: int, peak_tflops: float | None,
                 now: float) -> None:
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.devices, self.peak_tflops, self.since = devices, peak_tflops, now

    def report(self, steps: int, now: float) -> dict[str, float]:
        tokens_per_s = steps * self.tokens_per_step / (now - self.since) / self.devices
        self.since = now
        tflops = tokens_per_s * self.flops_per_token / 1e12
        out = {"tokens_per_s_per_device": tokens_per_s, "tflops_per_device": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out
