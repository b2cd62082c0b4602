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


def test_gpu_check_dry_run_sets_up_from_wheels_and_names_what_it_skipped(tmp_path):
    """The short-lease path without a GPU: SETUP=wheels installs the carried wheels (no index, no
    dependencies), the package imports, and gpu_check.json names each part skipped."""
    import importlib.metadata

    wheels = tmp_path / "whl"
    version = importlib.metadata.version("gguf")  # a pure-Python dependency, already at this version
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
                               str(wheels), f"gguf=={version}"], capture_output=True, text=True, timeout=300)
    if download.returncode:
        pytest.skip(f"no package index reachable to fetch a wheel: {download.stderr[-300:]}")
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, SETUP="wheels", WHEELS=str(wheels), DRY_RUN="1",
                                                PYTHON=sys.executable))
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run_skipped"] == ["tests", "kernels", "throughput"], summary
    assert summary["tests_exit_code"] is None and summary["throughput_exit_code"] is None
    assert "megatron.core 0.16" in (out / "environment.txt").read_text()
