"""launch/pretrain_7b.sh through a Slurm job's life on this machine: ``srun`` and ``scontrol``
stand-ins on PATH, the real torchrun, two gloo ranks, the tiny recipe.

- The README's command (``--set`` overrides after the config) is refused before any worker starts
  when a file is missing, and nothing is written.
- Slurm's SIGUSR2 before the time limit, sent to the batch shell only (``--signal=B:USR2@600``,
  so torchrun never sees it, whatever its torch version relays), makes the script's trap write
  RUN/stop; the run saves at a step boundary and marks RUN/stopped; the script requeues; the
  requeued job (the same command) resumes and finishes. With SLURM_RESTART_COUNT at the cap the
  script does not requeue.
- A run that crashes after its first checkpoint is not requeued (it would crash again, forever).
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


def _job(tmp_path: Path, recipe: Path, *sets: str, restarts: int = 0) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="node001", GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()),
               SCONTROL_REQUEUED=str(tmp_path / "requeued"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               SLURM_RESTART_COUNT=str(restarts), MAX_REQUEUES="3")
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(["bash", str(ROOT / "launch" / "pretrain_7b.sh"), str(recipe / "config.yaml"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers(job: subprocess.Popen) -> list[int]:
    """The training processes under the batch script (the srun stand-in execs torchrun)."""
    launcher = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for parent in launcher
            for pid in subprocess.run(["pgrep", "-P", parent], capture_output=True, text=True).stdout.split()]


def _after_steps(job: subprocess.Popen, run: Path, steps: int, action) -> None:
    """``action()`` once this job has logged ``steps`` more steps (metrics.jsonl carries earlier jobs' too)."""
    deadline, metrics = time.time() + 300, run / "metrics.jsonl"
    lines = (len(metrics.read_text().splitlines()) if metrics.exists() else 0) + steps
    while time.time() < deadline and job.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            action()
            return
        time.sleep(0.05)


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
    _after_steps(job, run, 3, lambda: os.kill(job.pid, signal.SIGUSR2))  # the batch shell only
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, f"the batch script failed (exit {job.returncode}):\n{out}\n{err[-3000:]}"
    assert "requeueing" in out, f"the script did not requeue:\n{out}\n{err[-3000:]}"
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    saved = int((run / "latest").read_text().strip().split("_")[1])
    assert 3 <= saved < 12 and not (run / "done").exists(), f"saved at step {saved}"
    assert (run / "stopped").read_text() == str(saved)

    job = _job(tmp_path, recipe, *sets, restarts=3)  # requeued MAX_REQUEUES times already
    _after_steps(job, run, 2, lambda: os.kill(job.pid, signal.SIGUSR2))
    out, err = job.communicate(timeout=300)
    assert job.returncode == 3 and "not again" in out, f"exit {job.returncode}:\n{out}\n{err[-3000:]}"
    assert (tmp_path / "requeued").read_text().split() == ["4242"], "the job was requeued past MAX_REQUEUES"

    job = _job(tmp_path, recipe, *sets, restarts=1)  # requeued by hand: the same command
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0 and "training complete" in out, f"exit {job.returncode}:\n{out}\n{err[-3000:]}"
    assert sorted(_losses(run)) == list(range(1, 13)), "the requeued jobs did not continue to step 12"
    assert (tmp_path / "requeued").read_text().split() == ["4242"], "a finished job was requeued"
    assert not (run / "stopped").exists() and not (run / "stop").exists()


@pytest.mark.distributed
def test_a_crash_after_a_checkpoint_is_not_requeued(recipe, tmp_path):
    run = tmp_path / "run"
    job = _job(tmp_path, recipe, f"checkpoint.save={run}", "train.steps=40", "checkpoint.save_interval=2")

    def crash() -> None:
        while not (run / "latest").exists():
            time.sleep(0.05)
        os.kill(_workers(job)[-1], signal.SIGKILL)

    _after_steps(job, run, 3, crash)
    out, err = job.communicate(timeout=300)
    assert job.returncode != 0 and "not requeued" in out, f"exit {job.returncode}:\n{out}\n{err[-3000:]}"
    assert not (tmp_path / "requeued").exists(), "a crashed run was requeued"
