"""Run megatron-core on CPU processes over gloo.

megatron-core assumes CUDA in a handful of places: it asks ``torch.cuda.current_device()`` for
the device of new tensors, creates some tensors with ``device="cuda"``, synchronizes the CUDA
stream, keeps its tensor-parallel RNG streams as CUDA generator states, its mixed-precision
optimizer accepts parameters by their CUDA type name and its gradient clipping asserts CUDA
gradients. On a CPU-only machine all of these either raise or
(``torch.cuda._lazy_call``) silently never run.

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
    """Rewrites ``device=cuda`` arguments and ``.cuda()`` calls to the CPU, in the backward pass too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward:
            return _backward(*args, **kwargs)
        if func is torch.Tensor.backward:
            return _tensor_backward(*args, **kwargs)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # megatron's optimizer asks for
            return func(*args).replace("torch.", "torch.cuda.", 1)   # torch.cuda.BFloat16Tensor and the like
        if func is torch.Tensor.to and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None) -> None:
    """``torch.autograd.backward`` with this mode active while the autograd engine runs.

    A mode is off inside its own handler, and the handler is where a backward call arrives: run
    as is, megatron-core's autograd functions (sequence-parallel gathers, recomputed attention)
    would make their CUDA tensors unredirected. The engine entry point is not overridable, so a
    fresh instance of the mode can be active around it without calling back into this handler."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs or ())
    with _CudaToCpu():
        _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
                             inputs, allow_unreachable=True, accumulate_grad=True)


def _tensor_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None) -> None:
    _backward(self, gradient, retain_graph, create_graph, inputs)


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

    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._set_cuda_rng_state = _set_rng_state
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    logging.getLogger(mcore_random.__name__).addFilter(_DropSharedRngWarning())

    _CudaToCpu().__enter__()  # stays active for the life of the process
    _ENABLED = True
