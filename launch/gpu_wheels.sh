#!/usr/bin/env bash
# The wheels a GPU machine without network needs beyond its image (torch, triton, transformers,
# peft, sentencepiece, pybind11, pytest are there; megatron-core and gguf are not;
# zstandard (only for .zst corpora) and wandb (only with logging.wandb_project) are not needed there), into .whl/,
# for `SETUP=wheels bash launch/gpu_check.sh` there. Run on a machine that reaches PyPI.
#   PY_VERSION=3.12 bash launch/gpu_wheels.sh      # the GPU machine's Python (python3 --version there)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --dest .whl \
    --python-version "${PY_VERSION:-3.12}" --implementation cp --platform "${PLATFORM:-manylinux_2_28_x86_64}" \
    "megatron-core>=0.16,<0.17" "gguf>=0.10"
du -sh .whl && ls .whl
