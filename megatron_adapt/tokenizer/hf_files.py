"""Hugging Face tokenizer files that encode exactly like a SentencePiece BPE model.

transformers' own SentencePiece conversion ranks merges by piece id and (in 5.x, for the
LlamaTokenizer class) rebuilds a Metaspace pre-tokenizer; both differ from SentencePiece on some
inputs (LLaMA's "▁▁" piece is early by id but last by score; a leading space loses its dummy
prefix). This writer builds the `tokenizers` pipeline from the model itself: merges ranked by
score, the dummy prefix and whitespace escaping as SentencePiece's identity normalizer does them,
byte fallback, and BOS added like LLaMA. ``tokenizer_class`` is PreTrainedTokenizerFast, which
both transformers 4.x and 5.x load from tokenizer.json unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers.tokenization_utils_base import generate_merges

from megatron_adapt.tokenizer.sentencepiece_model import SPACE


def build_tokenizer(proto: model_pb2.ModelProto) -> Tokenizer:
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces:
        raise ValueError(f"normalizer {spec.name!r} (remove_extra_whitespaces={spec.remove_extra_whitespaces})"
                         " has no exact tokenizers equivalent here; LLaMA's is identity")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == model_pb2.ModelProto.SentencePiece.NORMAL}
    trainer = proto.trainer_spec
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab, scores),
                                     unk_token=trainer.unk_piece, fuse_unk=True,
                                     byte_fallback=trainer.byte_fallback))
    steps = [normalizers.Replace(" ", SPACE)]
    if spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1 if spec.add_dummy_prefix else 0, right=0)])
    special = [p.piece for p in proto.pieces
               if p.type in (model_pb2.ModelProto.SentencePiece.CONTROL, model_pb2.ModelProto.SentencePiece.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = trainer.bos_piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)])
    return tokenizer


def write_hf_files(proto: model_pb2.ModelProto, directory: str | Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in ``directory``."""
    directory = Path(directory)
    trainer = proto.trainer_spec
    build_tokenizer(proto).save(str(directory / "tokenizer.json"))
    specials = {"bos_token": trainer.bos_piece, "eos_token": trainer.eos_piece, "unk_token": trainer.unk_piece}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))
