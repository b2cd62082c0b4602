"""Tokenizer encoding at corpus scale, exact: SentencePiece with a chunk cache when the model allows
it, byte-level BPE through the ``tokenizers`` library's batch encode (Rust, multi-threaded).

For LLaMA-style BPE models no piece has "▁" after a non-space character, so no merge crosses the
point where a space follows a word, and a text's ids are the concatenation of its chunks' ids
(``csrc/chunk_encoder.cpp``). Words repeat, so a cache of chunk ids replaces most of the encoding
work; SentencePiece's multithreaded batch encode handles only chunks not seen before. Models
without that property (other normalizers, whitespace-suffix pieces) use the plain batch encode.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from megatron_adapt import _native
from megatron_adapt.tokenizer.load import load_tokenizer, locate
from megatron_adapt.tokenizer.sentencepiece_model import SPACE

log = logging.getLogger(__name__)


def chunks_are_independent(proto: model_pb2.ModelProto) -> bool:
    """True when encoding a text equals concatenating the encodings of its space chunks."""
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces or not spec.escape_whitespaces:
        return False
    if proto.trainer_spec.treat_whitespace_as_suffix:
        return False
    for p in proto.pieces:
        if SPACE in p.piece.lstrip(SPACE):
            return False
    return True


class FastEncoder:
    """``encode(texts) -> (ids int32[total], lengths int64[len(texts)])``, equal to SentencePiece."""

    def __init__(self, model_file: str, threads: int, max_cache_entries: int = 4_000_000,
                 max_chunk_bytes: int = 64) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.threads = threads
        self.vocab_size, self.eos_id = self.sp.get_piece_size(), self.sp.eos_id()
        proto = model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        self.cached = chunks_are_independent(proto)
        if self.cached:
            chunk_proto = model_pb2.ModelProto()
            chunk_proto.CopyFrom(proto)
            chunk_proto.normalizer_spec.add_dummy_prefix = False
            self._chunk_sp = spm.SentencePieceProcessor(model_proto=chunk_proto.SerializeToString())
            self._native = _native.ChunkEncoder(proto.normalizer_spec.add_dummy_prefix,
                                                max_cache_entries, max_chunk_bytes)
        else:
            log.info("%s: pieces may span spaces; encoding without the chunk cache", model_file)

    def _encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        return self._chunk_sp.encode(chunks, out_type=int, num_threads=self.threads)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.cached:
            return self._native.encode(texts, self._encode_chunks)
        return _flatten(self.sp.encode(texts, out_type=int, num_threads=self.threads))


def _flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for i in ids for t in i), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


class ByteLevelEncoder:
    """``encode(texts)`` as ``FastEncoder``'s, for a byte-level BPE ``tokenizer.json``. The library
    runs its own thread pool (size: ``RAYON_NUM_THREADS``, set here from ``threads`` if unset)."""

    def __init__(self, tokenizer_file: str, threads: int) -> None:
        if threads > 0:
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        text = load_tokenizer(tokenizer_file)
        self.tokenizer = text.hf_tokenizer
        self.vocab_size = text.vocab_size
        self.eos_id = -1 if text.eos_id is None else text.eos_id  # as SentencePiece reports none

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return _flatten([e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)])


def make_encoder(tokenizer: str, threads: int) -> FastEncoder | ByteLevelEncoder:
    """The encoder for a tokenizer file or directory (``tokenizer.load.locate``)."""
    kind, path = locate(tokenizer)
    return FastEncoder(str(path), threads) if kind == "sentencepiece" else ByteLevelEncoder(str(path), threads)
