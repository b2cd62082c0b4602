#!/usr/bin/env bash
# GPU acceptance on any machine with one or more NVIDIA GPUs, in one command:
#
#   bash launch/gpu_check.sh [RESULTS_DIR]        # default results/gpu_check-<hostname>
#
# 1. set-up: ./.venv-gpu over the machine's own packages (--system-site-packages: a container's CUDA torch,
#    TE and apex; else a CUDA build of PyTorch from TORCH_SPEC, default the registry's torch),
#    megatron-adapt with its test extras, and where installable TransformerEngine, Liger-Kernel and
#    Apple's cut-cross-entropy (each optional; what is missing is said). PYTHON=/path/to/python with
#    SETUP=0 uses an existing environment instead (torch with CUDA, megatron-core and the test
#    packages already there), only building this package in place, with no download; SETUP=wheels
#    first installs the wheels in .whl/ (no index, no dependencies), for a machine with no network
#    whose image lacks megatron-core: `bash launch/gpu_wheels.sh` fills .whl/ on a machine with one.
# 2. the GPU tests (pytest -m gpu): Triton kernels vs references, fused model vs megatron-core's
#    layers, short stage-1 and stage-2 runs with a resume;
# 3. the kernel benchmark: fused linear+CE vs unfused (and Liger) at H=4096, V=48000, bf16;
# 4. the throughput runs: 7B-shaped stage 1, ~1B stage 2 and stage 1 on one GPU (tokens/s/GPU,
#    TFLOP/s, MFU).
# Everything lands in RESULTS_DIR, with gpu_check.json summing it up. Without a GPU it says so
# and exits 0 having run nothing. PARTS="tests kernels throughput" (the default) picks the parts
# of 2–4 to run, e.g. PARTS=throughput to re-measure after a change. DRY_RUN=1 does the set-up and
# writes gpu_check.json with every part skipped by name, GPU or not (the CPU tests run it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu_check-$(hostname)}

DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" != 1 ] && { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing was run."
    exit 0
fi
mkdir -p "$OUT"
[ "$DRY_RUN" = 1 ] || nvidia-smi -L | tee "$OUT/gpus.txt"

if [ "${SETUP:-1}" = 1 ]; then
    PYTHON_BASE=${PYTHON:-python3}
    # The container's packages (its CUDA torch, TransformerEngine, apex) are what users run: seen
    # from the venv, not replaced by the registry's.
    [ -x .venv-gpu/bin/python ] || "$PYTHON_BASE" -m venv --system-site-packages .venv-gpu
    PYTHON=.venv-gpu/bin/python
    $PYTHON -m pip install -q --upgrade pip
    $PYTHON -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
        || $PYTHON -m pip install -q "${TORCH_SPEC:-torch}" || { echo "gpu_check: could not install torch"; exit 1; }
    $PYTHON -m pip install -q -e ".[test]" || { echo "gpu_check: could not install megatron-adapt"; exit 1; }
    for optional in "transformer-engine[pytorch]" liger-kernel cut-cross-entropy; do
        $PYTHON -m pip install -q --no-build-isolation "$optional" >"$OUT/install-${optional%%\[*}.log" 2>&1 \
            && echo "installed $optional" || echo "not installable here: $optional (see $OUT/install-${optional%%\[*}.log)"
    done
else  # the environment as it is (no downloads: machines without a registry); build this package in place
    PYTHON=${PYTHON:-python3}
    if [ "${SETUP}" = wheels ]; then
        WHEELS=${WHEELS:-.whl}
        ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check: SETUP=wheels but $WHEELS has no wheels (launch/gpu_wheels.sh)"; exit 1; }
        $PYTHON -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || { echo "gpu_check: could not install $WHEELS"; exit 1; }
    fi
    if [ "${REBUILD:-0}" = 1 ] || ! $PYTHON -c "import megatron_adapt._native" 2>/dev/null; then
        $PYTHON -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: could not build megatron-adapt"; exit 1; }
    fi
fi
$PYTHON - <<'EOF' | tee "$OUT/environment.txt"
import importlib, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPUs", torch.cuda.device_count(), gpu)
for name in ("megatron.core", "transformer_engine", "apex", "triton", "liger_kernel", "cut_cross_entropy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "present"))
    except Exception as error:
        print(name, "absent:", type(error).__name__)
EOF

export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 WANDB_MODE=disabled
PARTS=" ${PARTS:-tests kernels throughput} "
TESTS=-1 KERNELS=-1 THROUGHPUT=-1  # -1: not run
SKIPPED=()
if [ "$DRY_RUN" = 1 ]; then
    for part in $PARTS; do SKIPPED+=("$part"); done
    PARTS=" "
    echo "gpu_check: dry run; set-up done, skipped: ${SKIPPED[*]}"
fi
if [[ $PARTS == *" tests "* ]]; then
    $PYTHON -m pytest -m gpu tests/gpu -q -rA --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
    TESTS=${PIPESTATUS[0]}
fi
if [[ $PARTS == *" kernels "* ]]; then
    $PYTHON bench/linear_cross_entropy.py --device cuda --dtype bf16 --hidden 4096 --vocab 48000 \
        --tokens 8192 16384 32768 --json "$OUT/linear_cross_entropy.json" 2>&1 | tee "$OUT/linear_cross_entropy.log"
    KERNELS=${PIPESTATUS[0]}
fi
if [[ $PARTS == *" throughput "* ]]; then
    $PYTHON bench/training_throughput.py --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
    THROUGHPUT=${PIPESTATUS[0]}
fi

$PYTHON - "$OUT" "$TESTS" "$KERNELS" "$THROUGHPUT" "${SKIPPED[*]:-}" <<'EOF'
import json, sys, pathlib, torch
out, (tests, kernels, throughput), skipped = pathlib.Path(sys.argv[1]), map(int, sys.argv[2:5]), sys.argv[5].split()
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
def code(value):
    return None if value < 0 else value  # None: that part was not run (PARTS)
summary = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "gpus": torch.cuda.device_count(), "torch": torch.__version__, "dry_run_skipped": skipped,
           "tests_exit_code": code(tests), "kernel_benchmark_exit_code": code(kernels),
           "throughput_exit_code": code(throughput),
           "linear_cross_entropy": load("linear_cross_entropy.json"), "throughput": load("throughput.json")}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(f"gpu_check: tests exit {code(tests)}, kernel benchmark exit {code(kernels)}, throughput exit "
      f"{code(throughput)} (None: not run); results in {out}/gpu_check.json")
EOF
[ "$TESTS" -le 0 ] && [ "$KERNELS" -le 0 ] && [ "$THROUGHPUT" -le 0 ]
