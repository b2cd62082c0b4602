"""Tokenize corpora into megatron-core indexed datasets (OUT.bin/OUT.idx + OUT.stats.json).

    python tools/preprocess_data.py --input 'corpus/vi/*.jsonl.zst' --tokenizer-model tok/vi/tokenizer.model \
        --output-prefix data/vi --workers 16 --append-eod --normalize vi
    python tools/preprocess_data.py --parallel train.en train.vi --source-lang en --target-lang vi \
        --tokenizer-model tok/vi/tokenizer.model --output-prefix data/translation --append-eod
    python tools/preprocess_data.py --instructions chat.jsonl --chat-template vbd --tokenizer-model ... \
        --output-prefix data/chat

One shard per input file under OUT.shards/ (a rerun skips complete shards); in a Slurm job array
each task takes every N-th file (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT) and the task that
completes the last shard merges them. Templated inputs also write OUT_targetmask.bin/.idx.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_adapt.data.chat import TEMPLATE_NAMES
from megatron_adapt.data.preprocess import PreprocessConfig, preprocess
from megatron_adapt.log_setup import setup_logging
from megatron_adapt.text.corpus import BadInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="text/JSONL files or globs (.gz/.xz/.bz2/.zst ok)")
    source.add_argument("--parallel", nargs=2, metavar=("SOURCE", "TARGET"), help="aligned sentence files")
    source.add_argument("--instructions", nargs=1, help="JSONL of conversations: {messages: [{role, content}...]}, "
                        "ShareGPT {conversations: [{from, value}...]} or {instruction, input, output}")
    parser.add_argument("--tokenizer-model", required=True, help="tokenizer: a SentencePiece tokenizer.model, a byte-level BPE tokenizer.json, or a directory with one")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="encode threads")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--append-eod", action="store_true", help="end every document with </s>")
    parser.add_argument("--normalize", choices=["vi", "nfc", "none"], default=None)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line")
    parser.add_argument("--chat-template", choices=TEMPLATE_NAMES, default="vbd",
                        help="--instructions: vbd (VBD-Chat's USER:/ASSISTANT:), llama2 ([INST]) or tokenizer "
                        "(the tokenizer's own Jinja chat_template); loss on assistant turns only")
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="vi")
    parser.add_argument("--one-direction", action="store_true", help="parallel: source→target only")
    parser.add_argument("--shard-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    parser.add_argument("--num-shards", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    parser.add_argument("--no-merge", action="store_true", help="leave the shards; do not write OUT")
    args = parser.parse_args(argv)
    setup_logging()
    kind, inputs = ("parallel", args.parallel) if args.parallel else \
        ("instructions", args.instructions) if args.instructions else ("text", args.input)
    try:
        stats = preprocess(PreprocessConfig(
            inputs=inputs, tokenizer_model=args.tokenizer_model, output_prefix=args.output_prefix,
            workers=args.workers, kind=kind, text_key=args.text_key, append_eod=args.append_eod,
            normalize=args.normalize, strict=args.strict, chat_template=args.chat_template, source_lang=args.source_lang,
            target_lang=args.target_lang, both_directions=not args.one_direction,
            shard_index=args.shard_index, num_shards=args.num_shards, merge=not args.no_merge))
    except (BadInputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stats is None:
        print(f"shards written under {args.output_prefix}.shards/; merge pending other tasks")
        return 0
    print(f"{stats['documents']:,} documents, {stats['tokens']:,} tokens from {stats['input_bytes'] / 1e6:,.1f} MB "
          f"in {stats['shards']} shard(s); {stats['bad_lines']} bad lines; {stats['tokens_per_second']:,} tokens/s")
    for example in stats["bad_line_examples"][:5]:
        print(f"  bad: {example}")
    print(f"written: {args.output_prefix}.bin, .idx, .stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
