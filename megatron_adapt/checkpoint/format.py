"""The run directory: how megatron-adapt checkpoints lie on disk. The one module that knows it.

    RUN/iter_0000500/dist/        megatron-core distributed checkpoint (``train_state``): weights,
                                  optimizer state and each rank's RNG states
    RUN/iter_0000000/model/       or: weights in HF layout (a start checkpoint from
                                  ``convert.hf_to_megatron``), which runs start from, never resume
    RUN/iter_0000500/config.json  the model's HF config: what the next run and the tools read
                                  before they build anything
    RUN/iter_0000500/meta.json    ``CheckpointMeta`` — written last: a checkpoint without it is
                                  incomplete
    RUN/latest                    name of the newest complete checkpoint, replaced atomically
    RUN/done                      the run reached train.steps
    RUN/stop                      written by a launcher (the Slurm script's signal trap): save at
                                  the next step boundary and exit
    RUN/stopped                   the run saved and exited on such a request (or a signal): the
                                  launcher requeues only then, never after a crash

A checkpoint is written into ``iter_N.tmp`` and renamed by ``commit`` once everything is there, so
a killed save leaves only a ``.tmp`` directory, which the next commit removes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from megatron_adapt import atomic
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.lora import is_adapter_key

META_NAME = "meta.json"
POINTER_NAME = "latest"
DONE_NAME, STOP_REQUEST_NAME, STOPPED_NAME = "done", "stop", "stopped"
WEIGHTS_DIST = "dist"
"""Subdirectory of a training checkpoint: megatron-core distributed checkpoint."""
WEIGHTS_HF = "model"
"""Subdirectory of a start checkpoint: HF-layout safetensors shards."""

OptimizerKind = Literal["distributed", "replicated"]
OptimizerFormat = Literal["dp_reshardable", "fully_reshardable"]
"""How the distributed optimizer's state is saved (megatron-core's ``distrib_optim_sharding_type``)."""
WeightsKind = Literal["dist", "hf"]
"""How a checkpoint holds its weights: megatron-core distributed (training) or HF shards (a converted start)."""


@dataclasses.dataclass
class CheckpointMeta:
    """What ``meta.json`` records of one checkpoint."""

    iteration: int
    consumed_samples: int
    layout: dict[str, int]
    """TP, PP and world size it was saved from (the RNG states belong to that layout)."""
    contents: list[str]
    """"model" (every weight) or "adapters" (a LoRA run's adapters and vocabulary tables only: the
    frozen base is its start's, named in ``config``), and for a resumable checkpoint "optimizer"
    and "rng"."""
    optimizer: OptimizerKind | None = None
    """'distributed' (state sharded over DP) or 'replicated': their states do not mix."""
    optimizer_format: OptimizerFormat = "fully_reshardable"
    """The distributed optimizer's state layout (``checkpoint.optimizer_format``); checkpoints from
    before it was recorded are fully reshardable."""
    scheduler: dict[str, Any] | None = None
    run_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The training config of the run that saved it (empty for a converted start)."""
    converted_from: dict[str, Any] | None = None
    """For a converted start (``convert.hf_to_megatron``): the HF directory ("hf_dir"), the tokenizer
    and the init method of the added rows."""

    @property
    def resumable(self) -> bool:
        return "optimizer" in self.contents

    @property
    def adapters_only(self) -> bool:
        return "adapters" in self.contents

    @property
    def tokenizer(self) -> str | None:
        """The tokenizer model the checkpoint was trained or converted with, if recorded."""
        return (self.run_config.get("model", {}).get("tokenizer")
                or (self.converted_from or {}).get("tokenizer") or None)

    @property
    def lora(self) -> dict[str, Any] | None:
        """The run's ``train.lora`` settings, if it trained adapters."""
        return self.run_config.get("train", {}).get("lora")

    @classmethod
    def read(cls, checkpoint: str | Path) -> "CheckpointMeta":
        path = Path(checkpoint) / META_NAME
        if not path.exists():
            raise FileNotFoundError(f"{checkpoint}: not a complete megatron-adapt checkpoint (no {META_NAME})")
        data = json.loads(path.read_text())
        if "config" in data:  # written before run_config and converted_from were apart
            legacy = data.pop("config")
            if "converted_from" in legacy:
                data["converted_from"] = {"hf_dir": legacy["converted_from"]} | {
                    k: v for k, v in legacy.items() if k != "converted_from"}
            else:
                data["run_config"] = legacy
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def in_adapter_checkpoint(key: str) -> bool:
    """Whether a LoRA run's checkpoint holds this (megatron-core state) key: adapters and the
    vocabulary tables (their trained rows), not the frozen base."""
    return is_adapter_key(key) or key.startswith(("embedding.", "output_layer."))


def weights_kind(checkpoint: str | Path) -> WeightsKind:
    """How a complete checkpoint (``iter_N``) holds its weights."""
    checkpoint = Path(checkpoint)
    if (checkpoint / WEIGHTS_DIST).is_dir():
        return "dist"
    if (checkpoint / WEIGHTS_HF).is_dir():
        return "hf"
    raise FileNotFoundError(f"{checkpoint}: holds neither {WEIGHTS_DIST}/ (training) nor {WEIGHTS_HF}/ (converted) weights")


def weights_dir(checkpoint: str | Path) -> Path:
    """Where a complete checkpoint's weights are: its ``dist/`` or its ``model/``."""
    return Path(checkpoint) / (WEIGHTS_DIST if weights_kind(checkpoint) == "dist" else WEIGHTS_HF)


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def staging_dir(run_dir: str | Path, iteration: int) -> Path:
    """Where checkpoint ``iteration`` is written before ``commit`` renames it into place."""
    return Path(run_dir) / f"{iteration_name(iteration)}.tmp"


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / POINTER_NAME
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not (path / META_NAME).exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A run directory's latest complete checkpoint, or the ``iter_N`` directory given."""
    checkpoint = Path(checkpoint)
    path = latest(checkpoint) if (checkpoint / POINTER_NAME).exists() else checkpoint
    CheckpointMeta.read(path)  # names a directory that is not a complete checkpoint
    return path


def commit(run_dir: str | Path, meta: CheckpointMeta, arch: LlamaArchitecture, keep: int = 0) -> Path:
    """Complete the checkpoint staged for ``meta.iteration``: config.json, meta.json last, rename,
    move ``latest``; then delete complete checkpoints beyond the newest ``keep`` (0: keep all) and
    stale staging directories. Call on one process once every rank's tensors are written."""
    run_dir = Path(run_dir)
    staged, final = staging_dir(run_dir, meta.iteration), run_dir / iteration_name(meta.iteration)
    (staged / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    (staged / META_NAME).write_text(meta.to_json())
    os.replace(staged, final)
    atomic.write_text(run_dir / POINTER_NAME, final.name)
    complete = sorted(p for p in run_dir.glob("iter_???????") if (p / META_NAME).exists())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob("iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final
