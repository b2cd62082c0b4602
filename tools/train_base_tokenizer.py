"""Train a small LLaMA-like SentencePiece BPE tokenizer (the quickstart's stand-in for LLaMA-2's).

    python tools/train_base_tokenizer.py --corpus data/sample/en_gutenberg.jsonl.xz --vocab-size 2000 \
        --output runs/quickstart/base_tokenizer/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys

from megatron_adapt.text.corpus import iter_documents
from megatron_adapt.tokenizer.train_base import train_llama_like


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", required=True)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--output", required=True)
    parser.add_argument("--text-key", default="text")
    args = parser.parse_args(argv)
    lines = [line for path in args.corpus for _, doc in iter_documents(path, args.text_key)
             for line in doc.split("\n") if line.strip()]
    path = train_llama_like(lines, args.vocab_size, args.output)
    print(f"written: {path} ({args.vocab_size} pieces from {len(lines)} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
