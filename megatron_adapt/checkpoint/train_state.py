"""A run's training state, saved and restored through megatron-core distributed checkpointing.

Every tensor is stored as a slice of its global (unsharded) tensor, so a checkpoint loads at any
TP/PP/DP layout with its optimizer state (fp32 master weights, Adam moments; sharded the same way
with or without the distributed optimizer); only the RNG states, which belong to ranks, are
restored just at the layout they were saved from. Where the files go and what makes a checkpoint
complete is ``checkpoint.format``'s.
"""

from __future__ import annotations

import logging
import queue
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
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_adapt.checkpoint.format import (
    WEIGHTS_DIST,
    CheckpointMeta,
    OptimizerFormat,
    OptimizerKind,
    commit,
    in_adapter_checkpoint,
    iteration_name,
    staging_dir,
    weights_dir,
    weights_kind,
)
from megatron_adapt.checkpoint.hf import load_hf_checkpoint
from megatron_adapt.model.build import unwrap
from megatron_adapt.model.lora import is_adapter_key
from megatron_adapt.model.vocab import trainable_row_shards

log = logging.getLogger(__name__)


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "cp": parallel_state.get_context_parallel_world_size(),
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


def _rng_object() -> ShardedObject:
    return ShardedObject("rng_state", rng_state(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)




def _model_state(module, adapters_only: bool) -> dict[str, Any]:
    """The model's sharded state: with LoRA adapters either only them and the vocabulary tables
    (what a LoRA run trains and saves) or everything but the adapters (a whole-model checkpoint
    it starts from)."""
    state = module.sharded_state_dict()
    if module.lora is None:
        return state
    if adapters_only:
        return {k: v for k, v in state.items() if in_adapter_checkpoint(k)}
    return {k: v for k, v in state.items() if not is_adapter_key(k)}


def sharded_state(model, optimizer=None, with_rng: bool = False, loading: bool = False,
                  adapters_only: bool = False, optimizer_format: OptimizerFormat = "fully_reshardable") -> dict[str, Any]:
    """What a checkpoint holds for this rank, as megatron-core sharded tensors and objects."""
    module = unwrap(model)
    state: dict[str, Any] = {"model": _model_state(module, adapters_only)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] | trainable_row_shards(module),
                                                          is_loading=loading,
                                                          metadata={"distrib_optim_sharding_type": optimizer_format})
    if with_rng:
        state["rng"] = _rng_object()
    return state


def _dp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def write_dist(state: dict[str, Any], directory: Path) -> None:
    """Collective: save ``state`` with the replicated tensors' writes spread over DP ranks."""
    # The save is synchronous: the writer's results come back within this process. megatron-core's
    # default channel is a multiprocessing Manager (made for its asynchronous writers), a spawned
    # server that imports torch on the first save of a run: seconds of nothing per run.
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())
    dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)


def save(run_dir: str | Path, iteration: int, model, optimizer=None, scheduler=None, consumed_samples: int = 0,
         run_config: dict[str, Any] | None = None, keep: int = 0,
         optimizer_format: OptimizerFormat = "fully_reshardable") -> Path:
    """Collective: every rank writes its part; global rank 0 completes the checkpoint.

    Without an optimizer only the weights are saved: a checkpoint to start a stage from.
    """
    staged = staging_dir(run_dir, iteration)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staged, ignore_errors=True)
        (staged / WEIGHTS_DIST).mkdir(parents=True)
    dist.barrier()
    resumable = optimizer is not None
    adapters = unwrap(model).lora is not None
    write_dist(sharded_state(model, optimizer, with_rng=resumable, adapters_only=adapters,
                             optimizer_format=optimizer_format), staged / WEIGHTS_DIST)
    final = Path(run_dir) / iteration_name(iteration)
    if rank == 0:
        meta = CheckpointMeta(iteration=iteration, consumed_samples=consumed_samples, layout=_layout(),
                              contents=["adapters" if adapters else "model"] + (["optimizer", "rng"] if resumable else []),
                              optimizer=optimizer_kind(optimizer) if resumable else None,
                              optimizer_format=optimizer_format,
                              scheduler=scheduler.state_dict() if scheduler is not None else None,
                              run_config=run_config or {})
        commit(run_dir, meta, unwrap(model).architecture, keep)
    dist.barrier()
    if rank == 0:
        log.info("saved checkpoint %s", final)
    return final


def optimizer_kind(optimizer) -> OptimizerKind:
    """'distributed' (state sharded over DP) or 'replicated': their checkpoints do not mix."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    return "distributed" if isinstance(inner, DistributedOptimizer) else "replicated"


def load(path: Path, model, optimizer=None, scheduler=None) -> CheckpointMeta:
    """Restore a checkpoint into a built model (and optimizer/scheduler); returns its meta.

    The model alone is what a new stage starts from; with the optimizer it is a resume.
    """
    meta = CheckpointMeta.read(path)
    if optimizer is not None and not meta.resumable:
        raise FileNotFoundError(f"{path} holds no optimizer state (a converted or weights-only checkpoint): "
                                "start from it with model.init_from instead of resuming")
    if weights_kind(path) == "hf":  # a converted start
        load_hf_checkpoint(unwrap(model), weights_dir(path))
        return meta
    same_layout = ({"cp": 1} | meta.layout) == _layout()  # checkpoints from before CP have no "cp"
    directory = str(path / WEIGHTS_DIST)
    state = sharded_state(model, optimizer, with_rng=optimizer is not None and same_layout, loading=True,
                          adapters_only=meta.adapters_only, optimizer_format=meta.optimizer_format)
    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(directory), _dp_group())
    loaded = dist_checkpointing.load(state, directory, sharded_strategy=strategy)
    # Under LoRA a checkpoint holds a part of the model (the adapters, or the base); the rest stays.
    unwrap(model).load_state_dict(loaded["model"], strict=unwrap(model).lora is None)
    if optimizer is None:
        return meta
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(meta.scheduler)
    if same_layout:
        set_rng_state(loaded["rng"])
    else:
        log.warning("checkpoint layout %s differs from this run's %s: weights, optimizer state, LR schedule and "
                    "data position restored; RNG streams start from the seed", meta.layout, _layout())
    return meta
