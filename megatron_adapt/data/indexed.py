"""Writer of megatron-core's indexed dataset format (PREFIX.bin + PREFIX.idx), without torch.

megatron-core's own ``IndexedDatasetBuilder`` lives in a package whose import takes seconds
(it loads the tensor-parallel layers and probes for TransformerEngine), paid again by every task
of a preprocessing job array. This writer produces byte-identical files (tested against the
builder) and megatron-core's ``IndexedDataset`` reads them. Each document is one sequence.

.idx layout: b"MMIDIDX\\x00\\x00", version <Q=1, dtype code <B, sequence count <Q, document
count <Q, sequence lengths int32[n], sequence byte pointers int64[n], document indices int64[d].

A templated dataset (translation, instructions) has a companion ``PREFIX_targetmask`` of the same
sequence lengths in uint8: 1 where a token is a target the loss counts, 0 for prompt tokens.
"""

from __future__ import annotations

import array
import shutil
import struct
from pathlib import Path

import numpy as np

MASK_SUFFIX = "_targetmask"
"""``PREFIX + MASK_SUFFIX`` is the target-mask companion of dataset PREFIX."""
_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}


def optimal_dtype(vocab_size: int) -> type:
    """The token dtype megatron-core picks for a vocabulary (``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def read_index(idx_path: str | Path) -> tuple[type, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, document indices) of an .idx file."""
    with open(idx_path, "rb") as f:
        if f.read(9) != _HEADER or struct.unpack("<Q", f.read(8))[0] != 1:
            raise ValueError(f"{idx_path}: not a megatron-core index (version 1)")
        code = struct.unpack("<B", f.read(1))[0]
        n_sequences, n_documents = struct.unpack("<QQ", f.read(16))
        lengths = np.frombuffer(f.read(4 * n_sequences), dtype=np.int32)
        f.seek(8 * n_sequences, 1)
        documents = np.frombuffer(f.read(8 * n_documents), dtype=np.int64)
    dtype = next(t for t, c in _DTYPE_CODES.items() if c == code)
    return dtype, lengths, documents


class IndexedWriter:
    """Append documents to PREFIX.bin; ``finalize`` writes PREFIX.idx.

    Memory stays at what the index itself needs: each document's length (4 bytes) and end (8 bytes)
    go into growable machine arrays, not one Python object per document (a 100M-document shard
    would otherwise need tens of GB); sequence pointers are computed in chunks while writing the index.
    """

    _CHUNK = 1 << 20

    def __init__(self, bin_path: str | Path, dtype: type) -> None:
        self.dtype = dtype
        self.data = open(bin_path, "wb")
        self.lengths = array.array("i")
        self.document_ends = array.array("q")

    def add_document(self, ids: np.ndarray) -> None:
        self.data.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.lengths.append(len(ids))
        self.document_ends.append(len(self.lengths))

    def add_dataset(self, prefix: str | Path) -> None:
        """Append a whole dataset (merging shards)."""
        dtype, lengths, documents = read_index(f"{prefix}.idx")
        if dtype != self.dtype:
            raise ValueError(f"{prefix}.idx holds {np.dtype(dtype).name}, this dataset {np.dtype(self.dtype).name}")
        offset = len(self.lengths)
        self.lengths.frombytes(lengths.astype(np.int32).tobytes())
        self.document_ends.frombytes((documents[1:] + offset).astype(np.int64).tobytes())
        with open(f"{prefix}.bin", "rb") as f:
            shutil.copyfileobj(f, self.data, length=16 << 20)

    def finalize(self, idx_path: str | Path) -> None:
        self.data.close()
        lengths = np.frombuffer(self.lengths, dtype=np.int32) if self.lengths else np.zeros(0, np.int32)
        n, itemsize = len(lengths), np.dtype(self.dtype).itemsize
        with open(idx_path, "wb") as f:
            f.write(_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<QQ", n, len(self.document_ends) + 1))
            f.write(lengths.tobytes())
            start = 0  # byte offset of the chunk's first sequence
            for i in range(0, n, self._CHUNK):
                sizes = lengths[i:i + self._CHUNK].astype(np.int64) * itemsize
                pointers = np.cumsum(sizes) - sizes + start
                f.write(pointers.tobytes())
                start += int(sizes.sum())
            f.write(np.zeros(1, np.int64).tobytes())
            f.write(memoryview(self.document_ends).cast("B"))
