"""One logging set-up for the tools and the training entry point.

Under torchrun every rank runs the same code, so the same line came once per GPU. Only global
rank 0 logs at the chosen level; the other ranks log warnings and errors (prefixed with their
rank), unless ``MEGATRON_ADAPT_LOG_ALL_RANKS=1`` asks for everything from everyone.
megatron-core's informational chatter is kept to warnings.
"""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = ("megatron.core", "megatron.core.datasets")


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger for this process (rank from torchrun's ``RANK``)."""
    rank = int(os.environ.get("RANK", 0))
    all_ranks = os.environ.get("MEGATRON_ADAPT_LOG_ALL_RANKS") == "1"
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=level if rank == 0 or all_ranks else max(level, logging.WARNING),
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
