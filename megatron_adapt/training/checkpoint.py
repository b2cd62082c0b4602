"""Training checkpoints that a kill cannot corrupt, resumable exactly or at another layout.

    RUN/iter_0000500/model/      weights in HF layout (safetensors per pipeline stage + index):
                                 independent of TP/PP, so any layout can load them
    RUN/iter_0000500/rank_00003.pt   this rank's optimizer, LR schedule and RNG states
    RUN/iter_0000500/meta.json   iteration, consumed samples, layout — written last
    RUN/latest                   name of the newest complete checkpoint, replaced atomically

Everything is written into ``iter_N.tmp`` and renamed once every rank has finished, then
``latest`` moves. A killed save leaves only a ``.tmp`` directory, which the next save removes.
Resuming at the saved layout restores model, optimizer, schedule, data position and RNG exactly;
at another TP/PP layout the weights, schedule and data position are restored and the optimizer
state starts fresh (its shards follow the old layout), which is logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_adapt.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from megatron_adapt.training.step import unwrap

log = logging.getLogger(__name__)


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "world": dist.get_world_size()}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def save(run_dir: str | Path, iteration: int, model, optimizer, scheduler, consumed_samples: int,
         config: dict[str, Any], keep: int) -> Path:
    """Collective: every rank writes its part; global rank 0 completes the checkpoint."""
    run_dir = Path(run_dir)
    final = run_dir / f"iter_{iteration:07d}"
    tmp = run_dir / f"iter_{iteration:07d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_hf_checkpoint(unwrap(model), tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples, "layout": _layout(), "config": config}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)
        pointer_tmp = run_dir / ".latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, run_dir / "latest")
        complete = sorted(p for p in run_dir.glob("iter_???????") if (p / "meta.json").exists())
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in run_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    if rank == 0:
        log.info("saved checkpoint %s", final)
    return final


def load(path: Path, model, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore a checkpoint into a built model (and optimizer/scheduler); returns its meta."""
    meta = json.loads((path / "meta.json").read_text())
    load_hf_checkpoint(unwrap(model), path / "model")
    if optimizer is None:
        return meta
    if meta["layout"] == _layout():
        state = torch.load(path / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    else:
        log.warning("checkpoint layout %s differs from this run's %s: weights, LR schedule and data position "
                    "restored; optimizer state starts fresh", meta["layout"], _layout())
        state = torch.load(path / "rank_00000.pt", weights_only=False)
        scheduler.load_state_dict(state["scheduler"])
    return meta

