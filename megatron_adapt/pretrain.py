"""Continued pretraining entry point.

    torchrun --nproc-per-node 8 -m megatron_adapt.pretrain --config configs/stage1_7b.yaml \
        --set train.steps=2000 --set checkpoint.save=runs/stage1

Re-running the same command resumes from the run's latest complete checkpoint. ``--check`` refuses
what the run would refuse (config, files, model, tokenizer, checkpoint) and prints the run
directory, without training: launch scripts call it before asking for GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_adapt.log_setup import setup_logging
from megatron_adapt.training.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file (configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. optim.lr=3e-4 (repeatable)")
    parser.add_argument("--check", action="store_true", help="check the run and print its directory; no training")
    args = parser.parse_args(argv)
    # megatron-core's TP and SP overlap assume kernels run in issue order: one hardware queue
    # (read when CUDA starts, so here; the launch scripts set it too).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    setup_logging()
    from megatron_adapt.training.loop import train
    from megatron_adapt.training.plan import plan_run

    try:  # everything refusable is refused here, before any model is built
        config = load_config(args.config, args.set)
        plan = plan_run(config)
    except (ValueError, OSError) as err:  # ConfigError and the model/tokenizer checks are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(config.checkpoint.save)
        return 0
    train(config, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
