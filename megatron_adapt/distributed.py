"""Process-group and megatron-core parallel-state set-up shared by training, tools and tests, and the
few scalar collectives the training loop needs."""

from __future__ import annotations

import datetime
import logging
import math
import os
import tempfile
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

if TYPE_CHECKING:
    from megatron_adapt.training.step import StepLoss

log = logging.getLogger(__name__)


def initialize(tp_size: int = 1, pp_size: int = 1, seed: int = 1234,
               init_method: str | None = None, rank: int | None = None,
               world_size: int | None = None, cp_size: int = 1, timeout_minutes: int = 60) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) and carve it into TP/PP/CP/DP groups.

    Rank and world size come from torchrun's environment unless given. On a CPU-only process the
    CUDA redirection in ``cpu_shim`` is switched on first, since megatron-core needs it.
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        from megatron_adapt import cpu_shim

        cpu_shim.enable()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if init_method is None and world_size == 1 and "MASTER_ADDR" not in os.environ:
        init_method = f"file://{tempfile.mkstemp(prefix='megatron-adapt-store-')[1]}"  # plain `python -m`
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes))
    if world_size % (tp_size * pp_size * cp_size):
        raise ValueError(f"world size {world_size} is not a multiple of TP×PP×CP = {tp_size}×{pp_size}×{cp_size}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size,
                                             context_parallel_size=cp_size, distributed_timeout_minutes=timeout_minutes)
    model_parallel_cuda_manual_seed(seed)
    if rank == 0:
        log.info("initialized %s: world %d = TP %d × PP %d × CP %d × DP %d", dist.get_backend(), world_size,
                 tp_size, pp_size, cp_size, world_size // (tp_size * pp_size * cp_size))


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (so that all ranks stop at the same step)."""
    tensor = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def data_parallel_loss(loss: "StepLoss | None") -> float:
    """The mean loss per target token over the data-parallel group's micro-batches (NaN off the
    last pipeline stage, where ``loss`` is None): ranks' sums and token counts are added, so a rank
    whose micro-batches hold fewer targets weighs less, as it does in the gradient. Under context
    parallelism each rank holds a part of every sequence's tokens: the CP group is summed too."""
    if loss is None:
        return math.nan
    tensor = torch.tensor([loss.total, loss.tokens], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    total, tokens = tensor.tolist()
    return total / max(tokens, 1.0)
