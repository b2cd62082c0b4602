"""SentencePiece model files as ModelProto: load (BPE only), make processors, append pieces, check.

Appending learned pieces: the base ModelProto is copied whole (pieces, ids, types, scores, trainer and normalizer specs,
byte fallback), and the new pieces are appended after it. SentencePiece BPE picks the adjacent
pair whose joined piece has the highest score, so giving every new piece a score below the base
model's lowest, decreasing in learning order, makes encoding replay the base model first and then
the learned merges in the order they were learned.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

NORMAL = model_pb2.ModelProto.SentencePiece.NORMAL
SPACE = "\u2581"
"""SentencePiece's visible space: the first character of a word-initial piece."""


class BaseModelError(ValueError):
    """The base model is not a SentencePiece BPE model this merge can extend."""


def load_model_proto(path: str | Path) -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise BaseModelError(f"{path}: not a SentencePiece model ({err})") from None
    if not proto.pieces:
        raise BaseModelError(f"{path}: not a SentencePiece model (no pieces)")
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        kind = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise BaseModelError(f"{path}: model_type is {kind}; only BPE models can be extended")
    return proto


def processor(proto: model_pb2.ModelProto, add_dummy_prefix: bool | None = None) -> spm.SentencePieceProcessor:
    if add_dummy_prefix is not None:
        proto = _copy(proto)
        proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _copy(proto: model_pb2.ModelProto) -> model_pb2.ModelProto:
    out = model_pb2.ModelProto()
    out.CopyFrom(proto)
    return out


def merge_pieces(base: model_pb2.ModelProto, new_pieces: list[str]) -> model_pb2.ModelProto:
    """Base model + ``new_pieces`` (in priority order) as one BPE model."""
    merged = _copy(base)
    existing = {p.piece for p in base.pieces}
    lowest = min(p.score for p in base.pieces if p.type == NORMAL)
    for rank, piece in enumerate(new_pieces, start=1):
        if piece in existing:
            raise ValueError(f"piece {piece!r} is already in the base model")
        existing.add(piece)
        merged.pieces.add(piece=piece, score=lowest - rank, type=NORMAL)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


def unreachable_pieces(model: model_pb2.ModelProto, first_id: int) -> list[int]:
    """Ids ≥ first_id whose piece, encoded alone, does not give back exactly that id."""
    sp = processor(model, add_dummy_prefix=False)
    ids = list(range(first_id, len(model.pieces)))
    texts = [model.pieces[i].piece.replace(SPACE, " ") for i in ids]
    encoded = sp.encode(texts, out_type=int)
    return [i for i, got in zip(ids, encoded) if got != [i]]
