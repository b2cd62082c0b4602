"""Train a small SentencePiece BPE tokenizer with LLaMA-2's options.

LLaMA-2's tokenizer may not be redistributed without its license, so the CPU quickstart and the
tests that need a base model of their own train a stand-in with the same trainer options (BPE,
byte fallback, identity normalization, dummy prefix, digits split, whitespace kept) on English.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import sentencepiece as spm


def train_llama_like(texts: Iterable[str], vocab_size: int, model_file: str | Path) -> Path:
    model_file = Path(model_file)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with open(model_file, "wb") as out:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            character_coverage=0.99995, byte_fallback=True, normalization_rule_name="identity",
            add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, minloglevel=2, num_threads=2)
    return model_file
