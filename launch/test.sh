#!/usr/bin/env bash
# Set up ./.venv and run the test-suite (CPU only; distributed tests spawn local gloo processes).
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not distributed"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pytest "$@"
