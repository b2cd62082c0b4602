"""The C++ two-table vocab-range embedding op equals its float64 PyTorch reference, forward and
backward, and its backward does not depend on the thread count."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_adapt.kernels.embedding import vocab_embedding, vocab_embedding_reference


@pytest.mark.parametrize("start,rows,t0,t1", [(0, 37, 0, 37), (37, 40, 11, 40), (77, 23, 5, 9), (0, 37, 37, 37)],
                         ids=["first-all-trainable", "middle-boundary-inside", "last-few", "none-trainable"])
def test_matches_float64_reference(start, rows, t0, t1):
    gen = torch.Generator().manual_seed(start + t0)
    ids = torch.randint(0, 100, (3, 41), generator=gen)  # hits ids inside and outside the slice
    ids[0, :5] = torch.tensor([start, start + rows - 1, start + rows, start + t0, start + max(t1 - 1, 0)])
    table = torch.randn(rows, 130, generator=gen)  # 130: a partial column block
    trainable = (table[t0:t1] + 1.0).requires_grad_()  # distinct values: the lookup must take these rows
    grad_out = torch.randn(3, 41, 130, generator=gen)

    out = vocab_embedding(ids, table, trainable, start, t0)
    grad = torch.autograd.grad(out, trainable, grad_out)[0] if t1 > t0 else None

    trainable64 = trainable.detach().double().requires_grad_()
    ref = vocab_embedding_reference(ids, table.double(), trainable64, start, t0)
    assert torch.equal(out.double(), ref), "forward rows differ from the reference lookup"
    if grad is not None:
        (ref_grad,) = torch.autograd.grad(ref, trainable64, grad_out.double())
        err = (grad.double() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)
        assert err <= 1e-6, f"trainable rows' gradient relative error {err:.2e}"


_BACKWARD_SCRIPT = """
import sys, torch
from megatron_adapt.kernels.embedding import vocab_embedding_backward
gen = torch.Generator().manual_seed(7)
ids = torch.randint(0, 50, (4096,), generator=gen)  # many repeats of each row
grad = vocab_embedding_backward(ids, torch.randn(4096, 256, generator=gen), 0, 10, 40)
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
        vocab_embedding(torch.zeros(2, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.float16),
                        torch.zeros(1, 4, dtype=torch.float16), 0, 0)
