#!/usr/bin/env bash
# Continued pretraining of a 7B LLaMA on DGX nodes (8 GPUs each) under Slurm.
#
#   sbatch --nodes=8 launch/pretrain_7b.sh configs/stage2_7b.yaml [--set train.steps=50000 ...]
#
# The run is checked first (megatron_adapt.pretrain --check, one task): a bad config or a missing
# file is refused before the nodes' GPUs start.
#
# Slurm sends SIGUSR2 to this batch shell ten minutes before the time limit (B:USR2@600); its trap
# writes RUN/stop, which the workers poll at each step boundary: they agree, save a checkpoint,
# write RUN/stopped and exit. Only then is the job requeued (at most MAX_REQUEUES times, counted
# by Slurm's SLURM_RESTART_COUNT), and the same command resumes. A crash is never requeued: it
# would fail again, forever. Nothing depends on torchrun relaying signals, which older torch
# versions do not do for SIGUSR2 and whose 30 s shutdown grace (before torch 2.12) is shorter
# than a 7B save.
#SBATCH --job-name=megatron-adapt
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@600
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
# On several nodes NCCL and megatron-core's gloo groups must use the nodes' fabric interface, not
# whichever comes first (docker0, a management NIC): SOCKET_IFNAME=ib0 (or the node's name for it).
if [ -n "${SOCKET_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}
fi
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=8 WANDB_MODE=${WANDB_MODE:-offline}
MAX_REQUEUES=${MAX_REQUEUES:-20}

echo "job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES nodes, master $MASTER_ADDR, run $RUN_DIR, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
LAUNCH=($PYTHON -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS_PER_NODE"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID")

stop() { echo "signal: asking the run to save and stop"; touch "$RUN_DIR/stop"; }
trap stop USR2 TERM
set +e
"${SRUN[@]}" "${LAUNCH[@]}" "${TRAIN[@]}" &
step=$!
while :; do   # a trapped signal interrupts wait (status > 128) while the step goes on
    wait "$step"; status=$?
    kill -0 "$step" 2>/dev/null || break
done
set -e
if [ -f "$RUN_DIR/done" ]; then
    echo "training complete"
elif [ -f "$RUN_DIR/stopped" ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "stopped on request at $(cat "$RUN_DIR/latest"); requeueing (restart ${SLURM_RESTART_COUNT:-0} of $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID"
elif [ -f "$RUN_DIR/stopped" ]; then
    echo "stopped on request, but the job was requeued $MAX_REQUEUES times already (MAX_REQUEUES): not again"
    exit 3
else
    echo "the run failed (exit $status)$([ -f "$RUN_DIR/latest" ] && echo "; its last checkpoint: $(cat "$RUN_DIR/latest")"); not requeued"
    exit "$status"
fi
