#!/usr/bin/env bash
# Continued pretraining on one machine: all its GPUs (or NPROC CPU processes over gloo).
#   bash launch/pretrain_local.sh configs/stage1_7b.yaml --set train.steps=100
set -euo pipefail
CONFIG=${1:?usage: launch/pretrain_local.sh CONFIG.yaml [--set key=value ...]}
shift
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} WANDB_MODE=${WANDB_MODE:-offline}
TRAIN=(-m megatron_adapt.pretrain --config "$CONFIG" "$@")
python "${TRAIN[@]}" --check >/dev/null || exit 2   # refused before any worker starts
exec torchrun --standalone --nproc-per-node "$NPROC" "${TRAIN[@]}"
