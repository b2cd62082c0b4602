"""Memory of the indexed-dataset writer per document, at corpus scale.

    python bench/indexed_writer_memory.py --documents 10000000

Writes N short documents (1–8 tokens, uint16) through ``data.indexed.IndexedWriter`` and reports
the resident memory it added: after the documents (what a shard holds while it is written) and the
peak through ``finalize`` (the index written), in bytes per document. The index itself takes 12
bytes per document on disk (int32 length + int64 pointer) plus 8 per document index.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from megatron_adapt.data.indexed import IndexedWriter, read_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=10_000_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 60000, rng.integers(1, 9)).astype(np.uint16) for _ in range(4096)]
    process = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        before = process.memory_info().rss
        start = time.perf_counter()
        writer = IndexedWriter(Path(tmp) / "d.bin", np.uint16)
        for i in range(args.documents):
            writer.add_document(pool[i & 4095])
        added = process.memory_info().rss - before
        writer.finalize(Path(tmp) / "d.idx")
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        _, lengths, documents = read_index(Path(tmp) / "d.idx")
        assert len(lengths) == args.documents and documents[-1] == args.documents
    n = args.documents
    print(f"{'documents':<32}{n:>14,}")
    print(f"{'RSS added after the documents':<32}{added / 2**20:>11.1f} MiB  {added / n:6.1f} B/doc")
    print(f"{'peak RSS added incl. finalize':<32}{peak / 2**20:>11.1f} MiB  {peak / n:6.1f} B/doc")
    print(f"{'seconds':<32}{seconds:>14.1f}")


if __name__ == "__main__":
    main()
