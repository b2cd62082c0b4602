"""launch/pretrain_7b.sh through a Slurm job's life on this machine: ``srun`` and ``scontrol``
stand-ins on PATH, the real torchrun, two gloo ranks, the tiny recipe.

- The README's command (``--set`` overrides after the config) is refused before any worker starts
  when a file is missing, and nothing is written.
- Slurm's SIGUSR2 before the time limit (sent, as Slurm does, to the job step's processes, not the
  batch shell) stops the run at a step boundary with a checkpoint; the script requeues the job;
  the requeued job (the same command) resumes and finishes, and the script says so.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.test_resume import _losses

ROOT = Path(__file__).resolve().parents[2]
SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done   # srun's own options
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
case $1 in
    show) echo localhost ;;
    requeue) echo "$2" >> "$SCONTROL_REQUEUED" ;;
esac
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(tmp_path: Path, recipe: Path, *sets: str) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="node001", GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()),
               SCONTROL_REQUEUED=str(tmp_path / "requeued"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(["bash", str(ROOT / "launch" / "pretrain_7b.sh"), str(recipe / "config.yaml"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_the_job_step(job: subprocess.Popen, signum: int) -> None:
    """What Slurm's --signal does without ``B:``: the step's processes (torchrun and its workers)."""
    children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        grandchildren = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
        for target in (pid, *grandchildren):
            os.kill(int(target), signum)


@pytest.mark.distributed
def test_refused_before_any_worker_starts(recipe, tmp_path):
    run = tmp_path / "run"
    job = _job(tmp_path, recipe, f"checkpoint.save={run}", f"model.hf_dir={tmp_path / 'nope'}")
    out, err = job.communicate(timeout=300)
    assert job.returncode == 2, f"exit {job.returncode}:\n{out}\n{err[-2000:]}"
    assert "nothing was started" in out and "model.hf_dir" in err, f"{out}\n{err[-2000:]}"
    assert "job 4242 on" not in out and "initialized gloo" not in err, "the launch went ahead"
    assert not run.exists(), "a refused run wrote its run directory"


@pytest.mark.distributed
def test_time_limit_signal_saves_requeues_and_the_requeued_job_finishes(recipe, tmp_path):
    run = tmp_path / "run"
    sets = (f"checkpoint.save={run}", "train.steps=12")
    job = _job(tmp_path, recipe, *sets)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and job.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            _signal_the_job_step(job, signal.SIGUSR2)
            break
        time.sleep(0.05)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, f"the batch script failed (exit {job.returncode}):\n{out}\n{err[-3000:]}"
    assert "requeueing" in out, f"the script did not requeue:\n{out}\n{err[-3000:]}"
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    saved = int((run / "latest").read_text().strip().split("_")[1])
    assert 3 <= saved < 12 and not (run / "done").exists(), f"saved at step {saved}"

    job = _job(tmp_path, recipe, *sets)  # the requeued job: the same command
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0 and "training complete" in out, f"exit {job.returncode}:\n{out}\n{err[-3000:]}"
    assert sorted(_losses(run)) == list(range(1, 13)), "the requeued job did not continue to step 12"
    assert (tmp_path / "requeued").read_text().split() == ["4242"], "a finished job was requeued"
