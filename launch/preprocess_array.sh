#!/usr/bin/env bash
# Tokenize a corpus directory on many nodes: one Slurm array task per slice of the input files.
#
#   sbatch --array=0-63 launch/preprocess_array.sh 'corpus/vi/*.jsonl.zst' tokenizers/vi/tokenizer.model data/vi
#
# Task i takes every N-th file (N = array size); each file becomes a shard under OUT.shards/, written
# atomically, so a resubmitted array skips finished shards. Whichever task completes the last shard
# merges them into OUT.bin/.idx. Extra flags: PREPROCESS_ARGS="--normalize vi --append-eod".
#SBATCH --job-name=preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
INPUT_GLOB=${1:?input glob}
TOKENIZER=${2:?tokenizer model}
OUTPUT_PREFIX=${3:?output prefix}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
echo "task ${SLURM_ARRAY_TASK_ID:-0}/${SLURM_ARRAY_TASK_COUNT:-1} on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# shellcheck disable=SC2086
exec "$PYTHON" tools/preprocess_data.py --input "$INPUT_GLOB" --tokenizer-model "$TOKENIZER" \
    --output-prefix "$OUTPUT_PREFIX" --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}" ${PREPROCESS_ARGS:-}
