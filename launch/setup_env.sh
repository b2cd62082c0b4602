#!/usr/bin/env bash
# Create ./.venv with PyTorch and megatron-adapt (editable, with the test extras). Idempotent.
# PYTHON picks the interpreter (3.10+); TORCH_SPEC the torch requirement (a CUDA build on GPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import megatron_adapt._native, megatron.core, torch; print('environment ready: torch', torch.__version__)"
