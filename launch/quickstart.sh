#!/usr/bin/env bash
# The main job on its embedded default: the whole recipe on CPU on the bundled sample (data/sample),
# the same commands as the README's cluster recipe (megatron_adapt/recipe.py) with the tiny configs:
#   base tokenizer and tiny LLaMA (stand-ins for LLaMA-2) → extend with Vietnamese → preprocess →
#   blends → stage 1 (new rows only, TP=2) → stage 2 (all weights, PP=2) → SFT (VBD-Chat's template)
#   → export both → evaluate → generate with each export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export OMP_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-offline} PYTHONWARNINGS=ignore
exec .venv/bin/python tools/recipe.py quickstart --work "${WORK:-runs/quickstart}"
