"""Run megatron-core on CPU processes over gloo.

megatron-core assumes CUDA in a handful of places: it asks ``torch.cuda.current_device()`` for
the device of new tensors, creates some tensors with ``device="cuda"``, synchronizes the CUDA
stream, keeps its tensor-parallel RNG streams as CUDA generator states, its gradient clipping
asserts CUDA gradients, and its default causal mask is made on CUDA. On a CPU-only
machine all of these either raise or (``torch.cuda._lazy_call``) silently never run.

``enable()`` redirects exactly those calls to the CPU for the current process. It is used by the
test-suite and the CPU smoke run only; GPU runs never import it, so nothing here can slow or
change them. Call it before building any megatron-core object.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, int):  # megatron passes torch.cuda.current_device() (an int)
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device=cuda`` arguments and ``.cuda()`` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _DropSharedRngWarning(logging.Filter):
    """megatron-core warns when the CPU RNG moves inside a CUDA RNG fork; here they are one RNG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """megatron-core's clip, minus its assertion that gradients are CUDA tensors."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _default_causal_mask(sq: int) -> torch.Tensor:
    """megatron-core's causal mask, made on the CPU. Activation recomputation re-runs attention in
    the backward pass, which runs inside this mode's handler for ``torch.autograd.backward`` —
    where the mode, as any TorchFunctionMode in its own handler, is off."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(1)


def enable() -> None:
    """Redirect megatron-core's CUDA calls to the CPU in this process (idempotent)."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_shim is for CPU-only processes; GPU runs must not enable it")

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as mcore_utils

    mcore_random._set_cuda_rng_state = _set_rng_state
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    mcore_utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = _default_causal_mask
    logging.getLogger(mcore_random.__name__).addFilter(_DropSharedRngWarning())

    _CudaToCpu().__enter__()  # stays active for the life of the process
    _ENABLED = True
