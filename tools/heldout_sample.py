"""Write held-out paragraphs of a corpus for evaluation, as JSONL {"text"}: paragraphs that
tools/extend_tokenizer.py never trains on either (``megatron_adapt/text/heldout.py``).

    python tools/heldout_sample.py --corpus viwiki.jsonl.xz --count 60 --lang vi --output heldout_vi.jsonl

Paragraphs between --min-chars and --max-chars, in corpus order; normalized as the language's
profile says (NFC and Vietnamese tone placement for vi), as preprocessing does for training text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_adapt.text.heldout import split_paragraphs
from megatron_adapt.tokenizer.languages import profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", required=True)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--lang", help="language profile for normalization (vi: NFC + tone placement)")
    parser.add_argument("--min-chars", type=int, default=300)
    parser.add_argument("--max-chars", type=int, default=1500)
    parser.add_argument("--heldout-per-mille", type=int, default=10, help="as given to extend_tokenizer.py")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.corpus]
    for path in paths:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    normalize = profile(args.lang).normalize or (lambda s: s)
    held = split_paragraphs(paths, args.text_key, args.heldout_per_mille).heldout
    chosen = [normalize(p) for p in held if args.min_chars <= len(p) <= args.max_chars]
    chosen = chosen[: args.count]
    if len(chosen) < args.count:
        print(f"error: only {len(chosen)} held-out paragraphs of {args.min_chars}-{args.max_chars} characters",
              file=sys.stderr)
        return 2
    Path(args.output).write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chosen),
                                 encoding="utf-8")
    print(f"written: {args.output} ({len(chosen)} paragraphs, {sum(len(t.encode()) for t in chosen)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
