"""Training throughput of the real training step: tokens/s per device, TFLOP/s and MFU.

    python bench/training_throughput.py                       # on a GPU: the three rows below
    python bench/training_throughput.py --runs 1b:stage2 --steps 5

Each run builds the model the training loop builds (``loop.build_model``: layer spec, fused
vocabulary layers, freezing, DDP, megatron-core's optimizer) with random weights and a LLaMA
shape, and times full steps (forward, backward, gradient finalization, optimizer) on random
tokens after warm-up steps. Rows, each in a fresh process:

- ``7b:stage1``: LLaMA-2-7B's shape with a 48k vocabulary, only the 16k added rows training;
- ``1b:stage2`` and ``1b:stage1``: a 1.1B shape (TinyLlama's), everything training / added rows
  only. Their tokens/s ratio is the gain of stage 1 skipping the body's weight gradients.

TFLOP/s counts the model's training FLOPs per token (6 × matmul parameters + attention) for
every row, so stage 1's figure is an equivalent rate, not the FLOPs it executes. MFU divides by
--peak-tflops (H100 SXM dense bf16: 989). ``tiny`` is a CPU-sized shape to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, ffn, layers, heads, kv heads
    "7b": (4096, 11008, 32, 32, 32),
    "1b": (2048, 5632, 22, 32, 4),
    "tiny": (64, 128, 2, 4, 2),
}
VOCAB = 48000  # LLaMA-2's 32000 + 16000 added; a third of every vocabulary here is added rows


def child(shape: str, stage: str, seq: int, micro_batch: int, micro_batches: int, steps: int, warmup: int,
          recompute: str, peak_tflops: float) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from megatron_adapt import distributed
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.training.config import Config
    from megatron_adapt.training.loop import build_model, train_step
    from megatron_adapt.training.metrics import Throughput
    from megatron_adapt.training.optim import build_optimizer, build_scheduler
    from megatron_adapt.training.plan import random_weights_plan

    cuda = torch.cuda.is_available()
    hidden, ffn, layers, heads, kv = SHAPES[shape]
    vocab = VOCAB if shape != "tiny" else 1500
    arch = LlamaArchitecture(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                             max_position_embeddings=seq)
    config = Config()
    config.data.seq_length = seq
    config.optim.bf16 = cuda
    config.optim.warmup_steps = 0
    config.train.steps = steps + warmup
    config.train.global_batch_size = micro_batch * micro_batches
    config.train.micro_batch_size = micro_batch
    config.train.recompute = recompute
    config.train.freeze.train = "all" if stage == "stage2" else "new_vocab_rows"
    distributed.initialize(1, 1)
    plan = random_weights_plan(arch, config, base_vocab=vocab - vocab // 3)
    model = build_model(config, plan, load_weights=False)
    optimizer = build_optimizer(config, model, plan.params_dtype, plan.distributed_optimizer)
    scheduler = build_scheduler(config, optimizer)
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [{"tokens": torch.randint(0, vocab, (micro_batch, seq), device=device, generator=gen),
                "labels": torch.randint(0, vocab, (micro_batch, seq), device=device, generator=gen)}
               for _ in range(micro_batches)]
    gbs = config.train.global_batch_size
    steps_timed = []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, batches, gbs)
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        if step >= warmup:  # the loop's own throughput maths, over this one step
            throughput = Throughput(gbs * seq, arch.training_flops_per_token(seq), 1, peak_tflops, start)
            steps_timed.append((end - start, throughput.report(1, end)))
    seconds, figures = sorted(steps_timed, key=lambda t: t[0])[len(steps_timed) // 2]  # the median step
    result = {"run": f"{shape}:{stage}", "seq": seq, "micro_batch": micro_batch, "micro_batches": micro_batches,
              "recompute": recompute, "step_s": seconds, "tokens_per_s_per_device": figures["tokens_per_s_per_device"],
              "tflops_per_device": figures["tflops_per_device"], "mfu": figures["mfu"] if cuda else None,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "device": torch.cuda.get_device_name() if cuda else "cpu"}
    distributed.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["7b:stage1", "1b:stage2", "1b:stage1"],
                        help="SHAPE:STAGE, SHAPE one of " + ", ".join(SHAPES))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=8, help="per step (gradient accumulation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="selective")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = (args.seq, args.micro_batch, args.micro_batches, args.steps, args.warmup, args.recompute,
                args.peak_tflops)
    if args.child:
        shape, stage = args.child.split(":")
        print("RESULT " + json.dumps(child(shape, stage, *settings)))
        return
    results = []
    for run in args.runs:
        shape, _, stage = run.partition(":")
        if shape not in SHAPES or stage not in ("stage1", "stage2"):
            parser.error(f"--runs: {run!r} is not SHAPE:stage1|stage2 with SHAPE one of {', '.join(SHAPES)}")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, __file__, "--child", run, *sys.argv[1:]], capture_output=True,
                              text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{run}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append({"run": run, "error": proc.stderr[-3000:]})
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"{'run':12} {'step s':>8} {'tokens/s/dev':>13} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['run']:12} failed")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['run']:12} {r['step_s']:8.3f} {r['tokens_per_s_per_device']:13.0f} {r['tflops_per_device']:8.1f} "
              f"{mfu:>6} {mem:>9}")
    by_run = {r["run"]: r for r in results if "error" not in r}
    for shape in SHAPES:
        s1, s2 = by_run.get(f"{shape}:stage1"), by_run.get(f"{shape}:stage2")
        if s1 and s2:
            print(f"{shape}: stage 1 / stage 2 tokens/s = {s1['tokens_per_s_per_device'] / s2['tokens_per_s_per_device']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
