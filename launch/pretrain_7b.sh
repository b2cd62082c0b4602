#!/usr/bin/env bash
# Continued pretraining of a 7B LLaMA on DGX nodes (8 GPUs each) under Slurm.
#
#   sbatch --nodes=8 launch/pretrain_7b.sh configs/stage2_7b.yaml [--set train.steps=50000 ...]
#
# The run is checked first (megatron_adapt.pretrain --check, one task): a bad config or a missing
# file is refused before the nodes' GPUs start.
#
# Slurm sends SIGUSR2 ten minutes before the time limit (or preemption); torchrun relays it to
# the workers, which agree at the next step boundary, save a checkpoint and exit. If the run has
# not finished (no RUN/done), this script requeues the job, and the same command resumes.
#SBATCH --job-name=megatron-adapt
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@600
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/pretrain_7b.sh CONFIG.yaml [--set key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"   # logs/ is in the repository: Slurm opens --output before this runs

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
CONTAINER=${CONTAINER:-}   # e.g. nvcr.io/nvidia/pytorch:25.01-py3 via pyxis: srun --container-image
# Slurm 22.05+ srun no longer takes --cpus-per-task from the job: without this, torchrun and its
# eight workers (and their data threads) would share one core.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
SRUN=(srun --kill-on-bad-exit=1)
[ -n "$CONTAINER" ] && SRUN+=(--container-image "$CONTAINER" --container-mounts "$PWD:$PWD" --container-workdir "$PWD")
TRAIN=(-m megatron_adapt.pretrain --config "$CONFIG" "$@")
# One task checks the run (config, files, model, tokenizer, checkpoint) before every GPU starts.
RUN_DIR=$("${SRUN[@]}" --nodes=1 --ntasks=1 $PYTHON "${TRAIN[@]}" --check | tail -n1) \
    || { echo "the run was refused (above); nothing was started"; exit 2; }

export CUDA_DEVICE_MAX_CONNECTIONS=1          # megatron-core's TP overlap needs ordered kernels
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# torchrun relays these to the workers (--signals-to-handle, read from PET_*; older torch read
# TORCHELASTIC_*); without SIGUSR2 among them Slurm's warning kills torchrun and its workers.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export OMP_NUM_THREADS=8 WANDB_MODE=${WANDB_MODE:-offline}
# After relaying the signal torchrun kills workers that have not exited within this many seconds
# (default 30, too short to save a 7B checkpoint); Slurm's signal comes 600 s before the limit.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}

echo "job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES nodes, master $MASTER_ADDR, run $RUN_DIR, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
LAUNCH=($PYTHON -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS_PER_NODE"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID")

set +e
"${SRUN[@]}" "${LAUNCH[@]}" "${TRAIN[@]}"
status=$?
set -e
if [ -f "$RUN_DIR/done" ]; then
    echo "training complete"
elif [ -f "$RUN_DIR/latest" ]; then
    echo "stopped at $(cat "$RUN_DIR/latest") (exit $status); requeueing"
    scontrol requeue "$SLURM_JOB_ID"
else
    echo "failed before the first checkpoint (exit $status)"; exit "$status"
fi
