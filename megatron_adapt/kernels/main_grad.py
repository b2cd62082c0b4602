"""Where the fused ops' weight gradients go: unrounded into megatron-core's fp32 gradient buffer.

Both fused vocabulary ops compute the trainable rows' gradient in fp32. Returned through autograd
it would be rounded to the parameter's dtype (bf16) once per micro-batch before megatron-core's
DDP adds it to the fp32 ``main_grad``; gradient-accumulation fusion avoids that for linear layers
by writing into ``main_grad`` itself and marking ``grad_added_to_main_grad``, which DDP's hook
then respects. The fused ops do the same.
"""

from __future__ import annotations

import torch


def rows_gradient(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What autograd hands ``param`` (a table's trainable rows) for its fp32 gradient ``grad``.

    Under megatron-core's DDP (an fp32 ``main_grad`` and the ``grad_added_to_main_grad`` flag),
    ``grad`` is added to ``main_grad`` as it is and autograd gets zeros, which the DDP hook does not
    add again; a parameter used twice (tied embedding and output) gets both ops' gradients there.
    Elsewhere (no DDP): ``grad`` in the parameter's dtype."""
    main = getattr(param, "main_grad", None)
    if main is None or main.dtype != torch.float32 or not hasattr(param, "grad_added_to_main_grad"):
        return grad.to(param.dtype)
    main.add_(grad)
    param.grad_added_to_main_grad = True
    return torch.zeros_like(param)
