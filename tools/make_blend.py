"""Write a training data blend from per-group weights.

    python tools/make_blend.py --group vi=100:data/vi.shards --group en=40:data/en --output data/stage2.json

Each --group is NAME=WEIGHT:PATH, PATH a dataset prefix or a directory of shards; weights are
relative (100 and 40 give 71% and 29% of training tokens). Prints the blend as a table.
"""

from __future__ import annotations

import argparse
import sys

from megatron_adapt.data.blend import make_blend, save_blend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", required=True, metavar="NAME=WEIGHT:PATH")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    groups = {}
    for spec in args.group:
        try:
            name, rest = spec.split("=", 1)
            weight, path = rest.split(":", 1)
            groups[name] = (float(weight), path)
        except ValueError:
            print(f"error: --group {spec!r} is not NAME=WEIGHT:PATH", file=sys.stderr)
            return 2
    try:
        entries = make_blend(groups)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_blend(entries, args.output)
    for e in entries:
        print(f"{e.group:8}{e.weight:10.4f}{e.tokens:>16,}  {e.prefix}")
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
