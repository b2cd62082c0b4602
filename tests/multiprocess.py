"""Run a function on several local CPU processes with real megatron-core parallel state.

``run_ranks(fn, tp=2, pp=2)`` spawns TP×PP×DP processes, joins them into a gloo group through a
file store, initializes megatron-core's TP/PP groups (with the CUDA→CPU shim), calls ``fn(*args)``
on each, and returns the per-rank results in rank order. A failure on any rank re-raises here with
that rank's traceback. ``fn`` must be importable (module level), as spawned children import it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, tp: int, pp: int, store: str, out_dir: str,
            fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # several ranks share two cores
    os.environ.setdefault("WANDB_MODE", "disabled")
    from megatron_adapt import distributed

    distributed.initialize(tp, pp, init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.destroy()


def run_ranks(fn: Callable[..., Any], *args: Any, tp: int = 1, pp: int = 1, dp: int = 1) -> list[Any]:
    world_size = tp * pp * dp
    with tempfile.TemporaryDirectory(prefix="mcore-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_worker, args=(world_size, tp, pp, store, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def sum_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """What megatron-core's ``finalize_model_grads`` does for a model without its DDP wrapper under
    sequence parallelism: parameters marked ``sequence_parallel`` saw part of the sequence on each
    TP rank, so their gradients are summed over the TP group."""
    from megatron.core import parallel_state

    if not model.config.sequence_parallel:
        return
    for param in model.parameters():
        if param.grad is not None and getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
