"""The C++ vocab-range embedding op equals its float64 PyTorch reference, forward and backward."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_adapt.kernels.embedding import vocab_range_embedding, vocab_range_embedding_reference


@pytest.mark.parametrize("start,rows", [(0, 37), (37, 40), (77, 23)], ids=["first", "middle", "last"])
def test_matches_float64_reference(start, rows):
    gen = torch.Generator().manual_seed(start)
    ids = torch.randint(0, 100, (3, 41), generator=gen)  # hits ids inside and outside the slice
    ids[0, :3] = torch.tensor([start, start + rows - 1, start + rows])  # both edges and one past
    weight = torch.randn(rows, 130, generator=gen, requires_grad=True)  # 130: a partial column block
    grad_out = torch.randn(3, 41, 130, generator=gen)

    out = vocab_range_embedding(ids, weight, start)
    (grad,) = torch.autograd.grad(out, weight, grad_out)

    weight64 = weight.detach().double().requires_grad_()
    ref = vocab_range_embedding_reference(ids, weight64, start)
    (ref_grad,) = torch.autograd.grad(ref, weight64, grad_out.double())
    assert torch.equal(out.double(), ref), "forward rows differ from the reference lookup"
    err = (grad.double() - ref_grad).norm() / ref_grad.norm()
    assert err <= 1e-6, f"weight gradient relative error {err:.2e}"


_BACKWARD_SCRIPT = """
import sys, torch
from megatron_adapt.kernels.embedding import vocab_range_embedding_backward
gen = torch.Generator().manual_seed(7)
ids = torch.randint(0, 50, (4096,), generator=gen)  # many repeats of each row
grad = vocab_range_embedding_backward(ids, torch.randn(4096, 256, generator=gen), 0, 50)
torch.save(grad, sys.argv[1])
"""


def test_backward_is_deterministic_across_thread_counts(tmp_path):
    results = []
    for threads in ("1", "2"):
        out = tmp_path / f"grad{threads}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", _BACKWARD_SCRIPT, str(out)], env=env, check=True)
        results.append(torch.load(out))
    assert torch.equal(results[0], results[1]), "backward depends on the number of OpenMP threads"


def test_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        vocab_range_embedding(torch.zeros(2, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.float16), 0)
