"""Preprocessing throughput, side by side on one JSONL corpus, one tokenizer, the same cores.

    python bench/preprocess_throughput.py --corpus viwiki.jsonl --tokenizer-model tokenizer.model \
        [--megatron-lm /path/to/Megatron-LM --megatron-python /path/to/python]

Rows: the tokenizer's own batch encode alone on all cores (SentencePiece's, or for a byte-level BPE
tokenizer.json the tokenizers library's; texts already in memory: the ceiling for any tool bound to
that encoder), tools/preprocess_data.py, and Megatron-LM's
tools/preprocess_data.py (--tokenizer-type SentencePieceTokenizer, or HuggingFaceTokenizer for a
tokenizer.json directory; same --workers) when a checkout
is given. Each tool runs as a subprocess; "wall" includes interpreter start-up, "processing" is
the tool's own rate (ours: stats.json; Megatron-LM: its last "Processed ... MB/s" line, in tokens
via our token count per input byte). Ratios are against the Megatron-LM and raw-encode rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer

from megatron_adapt.tokenizer.load import locate

ROOT = Path(__file__).resolve().parents[1]


def raw_encode(corpus: Path, model: str, threads: int) -> tuple[float, int]:
    docs = [json.loads(line)["text"] for line in corpus.open()]
    kind, path = locate(model)
    if kind == "sentencepiece":
        sp = spm.SentencePieceProcessor(model_file=str(path))
        encode = functools.partial(sp.encode, num_threads=threads)
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        tokenizer = Tokenizer.from_file(str(path))
        encode = lambda texts: [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]  # noqa: E731
    encode(docs[:50])  # warm-up
    start = time.perf_counter()
    tokens = sum(map(len, encode(docs)))
    return tokens / (time.perf_counter() - start), tokens


def ours(corpus: Path, model: str, workers: int, out: Path) -> tuple[float, float, int]:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
                    "--tokenizer-model", model, "--output-prefix", str(out), "--workers", str(workers),
                    "--append-eod"], check=True, capture_output=True)
    wall = time.perf_counter() - start
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    return stats["tokens"] / wall, stats["tokens_per_second"], stats["tokens"]


def megatron(corpus: Path, model: str, workers: int, out: Path, checkout: str, python: str,
             tokens_per_byte: float) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.run([python, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(out),
                           "--tokenizer-type", "SentencePieceTokenizer" if locate(model)[0] == "sentencepiece"
                           else "HuggingFaceTokenizer", "--tokenizer-model", model,
                           "--workers", str(workers), "--append-eod", "--log-interval", "100"],
                          cwd=checkout, env=dict(os.environ, PYTHONPATH=checkout), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"Megatron-LM failed:\n{proc.stderr[-2000:]}")
    mb_s = float(re.findall(r"([\d.]+) MB/s", proc.stdout + proc.stderr)[-1])
    size = corpus.stat().st_size
    return tokens_per_byte * size / wall, tokens_per_byte * mb_s * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="uncompressed JSONL with a 'text' field")
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--megatron-lm", help="a Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument("--megatron-python", default=sys.executable, help="python with Megatron-LM's needs")
    args = parser.parse_args()
    corpus = Path(args.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        raw, _ = raw_encode(corpus, args.tokenizer_model, args.workers)
        our_wall, our_proc, tokens = ours(corpus, args.tokenizer_model, args.workers, Path(tmp) / "ours")
        rows = [("tokenizer batch encode only", None, raw), ("megatron-adapt preprocess_data", our_wall, our_proc)]
        mlm = None
        if args.megatron_lm:
            mlm = megatron(corpus, args.tokenizer_model, args.workers, Path(tmp) / "mlm", args.megatron_lm,
                           args.megatron_python, tokens / corpus.stat().st_size)
            rows.append(("Megatron-LM preprocess_data", *mlm))
    print(f"corpus {corpus.name}: {corpus.stat().st_size / 1e6:.1f} MB, {tokens:,} tokens, workers {args.workers}")
    print(f"{'':34}{'wall tok/s':>14}{'processing tok/s':>18}{'vs raw':>9}{'vs Megatron':>13}")
    for name, wall, proc in rows:
        vs_mlm = f"{proc / mlm[1]:.2f}x" if mlm else "-"
        print(f"{name:34}{(f'{wall:,.0f}' if wall else '-'):>14}{proc:>18,.0f}{proc / raw:>8.2f}x{vs_mlm:>13}")
    if mlm:
        print(f"wall-clock ratio ours / Megatron-LM: {our_wall / mlm[0]:.2f}x")


if __name__ == "__main__":
    main()
