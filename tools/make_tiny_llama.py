"""Make a small random LLaMA in HF format over a tokenizer (the quickstart's base model).

    python tools/make_tiny_llama.py --tokenizer runs/quickstart/base_tokenizer/tokenizer.model \
        --output runs/quickstart/base_llama --hidden 128 --layers 4 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
import shutil
import sys

import sentencepiece as spm

from megatron_adapt.model.tiny import make_tiny_llama


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="SentencePiece model (copied into the output)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=344)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    out = make_tiny_llama(args.output, sp.get_piece_size(), args.hidden, args.intermediate, args.layers, args.heads,
                          args.kv_heads, args.max_positions, sp.bos_id(), sp.eos_id(), args.seed)
    shutil.copy(args.tokenizer, out / "tokenizer.model")
    print(f"written: {out} (vocab {sp.get_piece_size()}, hidden {args.hidden}, {args.layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
