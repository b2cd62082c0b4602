"""The torch-free indexed writer produces the bytes megatron-core's own builder does."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_adapt.data.indexed import IndexedWriter, read_index


@pytest.mark.parametrize("chunk", [IndexedWriter._CHUNK, 7], ids=["one-chunk", "pointers-in-chunks-of-7"])
def test_byte_identical_to_megatron_builder(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(IndexedWriter, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    shards = [[rng.integers(0, 48000, rng.integers(1, 300)) for _ in range(n)] for n in (17, 1, 40)]
    for k, docs in enumerate(shards):
        ours, theirs = IndexedWriter(tmp_path / f"o{k}.bin", np.uint16), IndexedDatasetBuilder(str(tmp_path / f"m{k}.bin"), np.uint16)
        for d in docs:
            ours.add_document(d)
            theirs.add_document(torch.from_numpy(d), [len(d)])
        ours.finalize(tmp_path / f"o{k}.idx")
        theirs.finalize(str(tmp_path / f"m{k}.idx"))
        for ext in ("bin", "idx"):
            assert (tmp_path / f"o{k}.{ext}").read_bytes() == (tmp_path / f"m{k}.{ext}").read_bytes(), f"shard {k}.{ext}"

    ours, theirs = IndexedWriter(tmp_path / "o.bin", np.uint16), IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    for k in range(len(shards)):
        ours.add_dataset(tmp_path / f"o{k}")
        theirs.add_index(str(tmp_path / f"m{k}"))
    ours.finalize(tmp_path / "o.idx")
    theirs.finalize(str(tmp_path / "m.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"o.{ext}").read_bytes() == (tmp_path / f"m.{ext}").read_bytes(), f"merged .{ext} differs"

    dataset = IndexedDataset(str(tmp_path / "o"))
    flat = [d for docs in shards for d in docs]
    assert len(dataset) == len(flat) and all(np.array_equal(dataset[i], d) for i, d in enumerate(flat))
    dtype, lengths, documents = read_index(tmp_path / "o.idx")
    assert dtype is np.uint16 and lengths.tolist() == [len(d) for d in flat] and documents[-1] == len(flat)


def test_empty_dataset(tmp_path):
    writer = IndexedWriter(tmp_path / "e.bin", np.int32)
    writer.finalize(tmp_path / "e.idx")
    dtype, lengths, documents = read_index(tmp_path / "e.idx")
    assert dtype is np.int32 and len(lengths) == 0 and documents.tolist() == [0]

