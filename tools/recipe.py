"""The recipe's commands: run the CPU main job, or print the cluster block the README shows.

    python tools/recipe.py quickstart [--work runs/quickstart]   # the whole recipe on the bundled sample
    python tools/recipe.py show                                  # the commands for LLaMA-2-7B under Slurm

Both come from ``megatron_adapt.recipe``; the quickstart runs each command as written, from the
repository root, with its output under WORK (a log per step in WORK/logs/).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from megatron_adapt import recipe

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_WORK, CLUSTER_BASE = "runs/vi-7b", "checkpoints/Llama-2-7b-hf"


def quickstart(work: Path) -> int:
    steps = recipe.quickstart_steps()
    start = time.time()
    for stale in ("data", "stage1", "stage2", "sft", "logs"):  # a rerun starts the runs afresh
        shutil.rmtree(work / stale, ignore_errors=True)

    def report(_: int, step: recipe.Step, output: str) -> None:
        if output.strip():
            print(output.rstrip())
        if step.trains:
            print(f"{Path(step.output).name}: {recipe.loss_summary(step.output.replace('$WORK', str(work)))}")

    try:
        recipe.run(steps, ROOT, work, work / "base_llama", log_dir=work / "logs", on_step=report,
                   on_start=lambda index, step: print(f"\n== {index}/{len(steps)} {step.title}", flush=True))
    except RuntimeError as err:
        print(f"failed: {err}", file=sys.stderr)
        return 1
    print(f"\ndone in {time.time() - start:.0f} s. Artefacts under {work}/:")
    print("  tokenizer/ (extended tokenizer, report.json)   data/ (indexed datasets, blends)")
    print("  stage1/ stage2/ sft/ (checkpoints, metrics.jsonl)   logs/ (one per step)")
    print("  release/ (HF model)   release-chat/ (HF chat model)   evaluation.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("quickstart", help="the whole recipe on CPU on the bundled sample")
    run.add_argument("--work", default="runs/quickstart", help="where every output goes (replaced)")
    sub.add_parser("show", help="print the cluster recipe (LLaMA-2-7B, Slurm)")
    args = parser.parse_args(argv)
    if args.command == "show":
        print(recipe.render(recipe.recipe_steps(recipe.CLUSTER), CLUSTER_WORK, CLUSTER_BASE))
        return 0
    return quickstart(Path(args.work).resolve())


if __name__ == "__main__":
    sys.exit(main())
