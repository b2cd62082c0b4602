"""launch/gpu_check.sh on a machine without a GPU, and the throughput benchmark it runs, at a CPU size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: gpu_check would run")
def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU on this machine" in proc.stdout and "nothing was run" in proc.stdout
    assert not out.exists(), "gpu_check wrote results without a GPU"


def test_throughput_benchmark_runs_the_training_step(tmp_path):
    """The tiny shape on the CPU: the benchmark builds the loop's model (random weights) and times it."""
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "training_throughput.py"), "--runs", "tiny:stage1",
                           "--seq", "64", "--micro-batches", "2", "--steps", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert result["run"] == "tiny:stage1" and result["tokens_per_s_per_device"] > 0 and result["mfu"] is None
    assert "tiny:stage1" in proc.stdout
