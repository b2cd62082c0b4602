"""Extend a BPE tokenizer (LLaMA-2's SentencePiece model, or a byte-level BPE tokenizer.json as
LLaMA-3 and SmolLM2 have) with pieces for a new language.

    python tools/extend_tokenizer.py --base-model llama2/tokenizer.model \
        --corpus viwiki.jsonl.xz --english gutenberg.jsonl.xz \
        --num-new-tokens 16000 --lang vi --output-dir tokenizers/vi
    python tools/extend_tokenizer.py --base-model smollm2/ ...   # a directory with tokenizer.json

Every base id, merge and special token is kept; the added pieces follow, each reachable by
encoding. OUT gets the tokenizer files (tokenizer.model and HF files for a SentencePiece base,
tokenizer.json and the base's tokenizer_config.json / chat template for a byte-level BPE base;
AutoTokenizer.from_pretrained(OUT) works offline) and report.json.
"""

from __future__ import annotations

import argparse
import sys

from megatron_adapt.log_setup import setup_logging
from megatron_adapt.tokenizer.extend import ExtendConfig, extend_tokenizer, iter_summary, iter_sweep_summary


def _sizes(text: str) -> int | list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list of numbers, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", required=True, help="base tokenizer: tokenizer.model, tokenizer.json, or a directory with one")
    parser.add_argument("--corpus", nargs="+", required=True, help="new-language text/JSONL files")
    parser.add_argument("--num-new-tokens", type=_sizes, required=True,
                        help="pieces to add; a comma-separated list (4000,8000,16000) learns once and writes "
                             "OUT/<size>/ for each, with OUT/sweep.json and OUT/sweep.png")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--lang", help="language code (vi has its own profile; others use the default)")
    parser.add_argument("--scripts", help="comma-separated Unicode scripts pieces are learned from (e.g. LATIN, CJK, "
                        "TIBETAN; 'any'); default: the language's (vi: LATIN, zh: CJK, bo: TIBETAN; others: any)")
    parser.add_argument("--english", nargs="*", default=[],
                        help="English text/JSONL: protects and measures English tokenization")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--normalize", choices=["vi", "nfc", "none"], help="override the language's normalization")
    parser.add_argument("--heldout-per-mille", type=int, default=10)
    parser.add_argument("--min-frequency", type=int, default=1, help="drop rarer word runs (speed)")
    parser.add_argument("--threads", type=int, default=0, help="encoding threads (0: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = ExtendConfig(
            base_model=args.base_model, corpus=args.corpus, num_new_tokens=args.num_new_tokens,
            output_dir=args.output_dir, lang=args.lang, scripts=args.scripts.split(",") if args.scripts else None,
            english=args.english, text_key=args.text_key,
            normalize=args.normalize, heldout_per_mille=args.heldout_per_mille,
            min_frequency=args.min_frequency, threads=args.threads, overwrite=args.overwrite,
            progress=sys.stderr.isatty())
        report = extend_tokenizer(config)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(iter_sweep_summary(report) if "sizes" in report else iter_summary(report)))
    files = ", ".join(sorted(p.name for p in config.output_dir.iterdir()))
    print(f"written to {config.output_dir}: {files} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
