#!/usr/bin/env bash
# The main job on its embedded default, on CPU: set up ./.venv, then run what the recipe has so
# far on two local processes (see README, "The recipe").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
RUN_DIR=${RUN_DIR:-runs/quickstart}
mkdir -p "$RUN_DIR"
echo "== megatron-core LLaMA (TP=2 over gloo) vs Hugging Face, and export back to HF"
.venv/bin/torchrun --nproc-per-node 2 tools/check_against_hf.py --tp 2 \
    --work-dir "$RUN_DIR" --export-dir "$RUN_DIR/hf_export" 2> "$RUN_DIR.log" \
    || { echo "failed; log: $RUN_DIR.log"; exit 1; }
echo "artefacts: $RUN_DIR/tiny_llama_hf (HF input), $RUN_DIR/hf_export (HF output), $RUN_DIR/check.json"
