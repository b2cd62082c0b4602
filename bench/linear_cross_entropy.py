"""Output projection + cross entropy, forward + backward: the fused op (no logits) vs unfused PyTorch.

    python bench/linear_cross_entropy.py                      # CPU: the C++ op, fp32
    python bench/linear_cross_entropy.py --device cuda --dtype bf16 --hidden 4096 \\
        --tokens 8192 16384 32768                              # GPU: the Triton kernels (+ Liger, CCE if installed)

Each variant runs in a fresh process. Extra memory is what one forward + backward adds on top of
its inputs and parameters (gradients included): on CUDA ``max_memory_allocated`` above the
allocation before the step, on CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) above its RSS before the step. Working memory is extra memory less the
gradients the step returns (hidden states' and the weight rows'), which every path must hold.
Time is the median of --repeats steps after one warm-up. "stage1" computes the weight gradient
for the last --trainable rows only (the added vocabulary), "stage2" for all rows; the unfused path,
Liger-Kernel and Apple's cut-cross-entropy (cce) always compute all rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str, n: int, h: int, v: int, trainable: int, repeats: int, device: str, dtype_name: str,
          chunk: int | None) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy

    dtype = getattr(torch, DTYPES[dtype_name])
    torch.manual_seed(0)
    hidden = (torch.randn(n, h) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h) * 0.02).to(device, dtype)
    labels = torch.randint(0, v, (n,), device=device)
    span = (v - trainable, v) if variant.endswith("stage1") else (0, v)
    if variant.startswith("fused"):  # stage 1: the added rows are a Parameter of their own
        param = weight if span == (0, v) else weight[span[0]:span[1]].clone()
    else:
        param = weight
    param.requires_grad_()
    if variant == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    elif variant == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

    def step() -> None:
        if variant == "unfused":
            loss = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")
        elif variant == "liger":
            loss = liger(weight, hidden, labels)
        elif variant == "cce":
            loss = cce(hidden, weight, labels, reduction="sum")
        else:
            loss, _ = linear_cross_entropy(hidden, param, weight, labels, 0, v, span, chunk=chunk)
        loss.backward()
        hidden.grad = param.grad = None

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss("VmHWM")
    gradients = (hidden.numel() + param.numel()) * hidden.element_size()  # what every path must return
    print(json.dumps({"seconds": statistics.median(times), "extra_mib": (peak - base) / 2**20,
                      "working_mib": (peak - base - gradients) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=48000)
    parser.add_argument("--trainable", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--chunk", type=int, help="tokens per chunk of the fused op (default: its own rule)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tokens[0], args.hidden, args.vocab, args.trainable, args.repeats,
                     args.device, args.dtype, args.chunk)
    variants = ["unfused", "fused-stage2", "fused-stage1"]
    if args.device == "cuda":
        for variant, module, name in (("liger", "liger_kernel", "Liger-Kernel"), ("cce", "cut_cross_entropy",
                                                                                  "Apple's cut-cross-entropy")):
            try:
                __import__(module)
                variants.append(variant)
            except ImportError:
                print(f"{name} not installed: no {variant} row")
    print(f"H={args.hidden} V={args.vocab} (trainable {args.trainable}), {args.dtype} on {args.device}")
    print(f"{'tokens':>7} {'variant':14}{'fwd+bwd ms':>12}{'extra MiB':>11}{'working MiB':>13}"
          f"{'time vs unfused':>17}{'working vs unfused':>20}")
    table = []
    for n in args.tokens:
        results = {}
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(n), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--trainable", str(args.trainable), "--repeats", str(args.repeats),
                   "--device", args.device, "--dtype", args.dtype]
            cmd += ["--chunk", str(args.chunk)] if args.chunk else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
        ref = results["unfused"]
        for name, r in results.items():
            print(f"{n:>7} {name:14}{r['seconds'] * 1e3:>12.1f}{r['extra_mib']:>11.0f}{r['working_mib']:>13.0f}"
                  f"{r['seconds'] / ref['seconds']:>16.2f}x{r['working_mib'] / ref['working_mib']:>19.3f}x")
            table.append(dict(tokens=n, variant=name, **r))
    if args.json:
        args.json.write_text(json.dumps(dict(vars(args), json=str(args.json), results=table), indent=1))


if __name__ == "__main__":
    main()
