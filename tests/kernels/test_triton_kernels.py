"""The Triton kernels (embedding, linear + cross entropy) on CPU under TRITON_INTERPRET=1 equal
the float64 references; the checks live in triton_interpret_checks.py, run in a process of their
own because the interpreter must be chosen before triton is imported."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interpret_checks.py"))],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"Triton kernel check failed:\n{proc.stderr[-3000:]}"
