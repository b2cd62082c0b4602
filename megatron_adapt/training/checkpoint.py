"""Training checkpoints on megatron-core distributed checkpointing, marked complete last.

    RUN/iter_0000500/dist/        megatron-core distributed checkpoint (torch_dist): the weights,
                                  the optimizer (fp32 master weights, Adam moments; sharded the
                                  same way with or without the distributed optimizer) and each
                                  rank's RNG states
    RUN/iter_0000500/config.json  the model's HF config: what the next run and the tools read
                                  before they build anything
    RUN/iter_0000500/meta.json    iteration, consumed samples, LR schedule, layout — written last
    RUN/latest                    name of the newest complete checkpoint, replaced atomically

Every tensor is stored as a slice of its global (unsharded) tensor, so a checkpoint loads at any
TP/PP/DP layout with its optimizer state; only the RNG states, which belong to ranks, are
restored just at the layout they were saved from. Everything is written into ``iter_N.tmp`` and
renamed once every rank has finished; a killed save leaves only a ``.tmp`` directory, which the
next save removes.

A start checkpoint from ``tools/convert_checkpoint.py hf-to-megatron`` has ``model/`` (weights in
HF layout, which the converter streams without building the model) instead of ``dist/``; runs
start from it through ``model.init_from`` and never resume from it.
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
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_adapt.checkpoint.hf import load_hf_checkpoint
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.freeze import trainable_row_shards
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


def _rng_object() -> ShardedObject:
    return ShardedObject("rng_state", rng_state(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# The distributed optimizer's one layout that reshards across TP/PP as well as DP (megatron-core
# 0.16 refuses its older default, and 'dp_reshardable' keeps the TP/PP layout).
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def sharded_state(model, optimizer=None, with_rng: bool = False, loading: bool = False) -> dict[str, Any]:
    """What a checkpoint holds for this rank, as megatron-core sharded tensors and objects."""
    module = unwrap(model)
    state: dict[str, Any] = {"model": module.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] | trainable_row_shards(module),
                                                          is_loading=loading, metadata=_OPTIMIZER_FORMAT)
    if with_rng:
        state["rng"] = _rng_object()
    return state


def _dp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def write_dist(state: dict[str, Any], directory: Path) -> None:
    """Collective: save ``state`` with the replicated tensors' writes spread over DP ranks."""
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())
    dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)


def save(run_dir: str | Path, iteration: int, model, optimizer=None, scheduler=None, consumed_samples: int = 0,
         config: dict[str, Any] | None = None, keep: int = 0) -> Path:
    """Collective: every rank writes its part; global rank 0 completes the checkpoint.

    Without an optimizer only the weights are saved: a checkpoint to start a stage from.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"iter_{iteration:07d}"
    tmp = run_dir / f"iter_{iteration:07d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
    dist.barrier()
    resumable = optimizer is not None
    write_dist(sharded_state(model, optimizer, with_rng=resumable), tmp / "dist")
    if rank == 0:
        arch: LlamaArchitecture = unwrap(model).architecture
        (tmp / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
        meta = {"iteration": iteration, "consumed_samples": consumed_samples, "layout": _layout(),
                "contents": ["model", "optimizer", "rng"] if resumable else ["model"],
                "optimizer": optimizer_kind(optimizer) if resumable else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None, "config": config or {}}
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


def optimizer_kind(optimizer) -> str:
    """'distributed' (state sharded over DP) or 'replicated': their checkpoints do not mix."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    return "distributed" if isinstance(inner, DistributedOptimizer) else "replicated"


def load(path: Path, model, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore a checkpoint into a built model (and optimizer/scheduler); returns its meta.

    The model alone is what a new stage starts from; with the optimizer it is a resume.
    """
    meta = json.loads((path / "meta.json").read_text())
    if optimizer is not None and "optimizer" not in meta["contents"]:
        raise FileNotFoundError(f"{path} holds no optimizer state (a converted or weights-only checkpoint): "
                                "start from it with model.init_from instead of resuming")
    if not (path / "dist").exists():  # a converted start (tools/convert_checkpoint.py): HF layout
        load_hf_checkpoint(unwrap(model), path / "model")
        return meta
    same_layout = meta["layout"] == _layout()
    state = sharded_state(model, optimizer, with_rng=optimizer is not None and same_layout, loading=True)
    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path / "dist")), _dp_group())
    loaded = dist_checkpointing.load(state, str(path / "dist"), sharded_strategy=strategy)
    unwrap(model).load_state_dict(loaded["model"])
    if optimizer is None:
        return meta
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng"])
    else:
        log.warning("checkpoint layout %s differs from this run's %s: weights, optimizer state, LR schedule and "
                    "data position restored; RNG streams start from the seed", meta["layout"], _layout())
    return meta

