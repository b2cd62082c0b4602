"""Output projection + cross entropy, forward + backward: blocked (no logits) vs unfused PyTorch.

    python bench/linear_cross_entropy.py --tokens 2048 --hidden 1024 --vocab 48000 --trainable 16000

Each variant runs in a fresh process (peak RSS is per process, ``ru_maxrss``, minus the RSS before
the first step); time is the median of --repeats steps after one warm-up. "stage 1" gives the
weight gradient for the last --trainable rows only (the added vocabulary); "stage 2" for all rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(variant: str, n: int, h: int, v: int, trainable: int, repeats: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(n, h) * 0.5
    weight = torch.randn(v, h) * 0.02
    labels = torch.randint(0, v, (n,))
    span = (v - trainable, v) if variant.endswith("stage1") else (0, v)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        h_ = hidden.clone().requires_grad_()
        if variant.startswith("unfused"):
            w = weight.clone().requires_grad_()
            loss = torch.nn.functional.cross_entropy((h_ @ w.T).float(), labels, reduction="sum")
        else:
            w = torch.nn.Parameter(weight[span[0]:span[1]].clone())
            loss = linear_cross_entropy(h_, w, weight, labels, 0, v, span).sum()
        loss.backward()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"seconds": statistics.median(times), "extra_mib": peak / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=48000)
    parser.add_argument("--trainable", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.hidden, args.vocab, args.trainable, args.repeats)
    results = {}
    for variant in ("unfused", "blocked-stage2", "blocked-stage1"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--hidden",
                              str(args.hidden), "--vocab", str(args.vocab), "--trainable", str(args.trainable),
                              "--repeats", str(args.repeats)], check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} (trainable {args.trainable}), fp32; "
          f"logits alone = {logits_mib:.0f} MiB")
    print(f"{'':18}{'fwd+bwd s':>11}{'extra MiB':>11}{'time vs unfused':>17}{'memory vs unfused':>19}")
    ref = results["unfused"]
    for name, r in results.items():
        print(f"{name:18}{r['seconds']:>11.3f}{r['extra_mib']:>11.0f}{r['seconds'] / ref['seconds']:>16.2f}x"
              f"{r['extra_mib'] / ref['extra_mib']:>18.2f}x")


if __name__ == "__main__":
    main()
