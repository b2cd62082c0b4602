"""One view of the two tokenizer kinds the recipe takes, for the code that only encodes or counts.

- ``sentencepiece``: a SentencePiece BPE ``tokenizer.model`` (LLaMA-2, Mistral v0.1); a directory
  holding one (our extended tokenizers also carry HF files beside it: the model file rules).
- ``byte_level_bpe``: a Hugging Face ``tokenizer.json`` with a BPE model and ByteLevel
  pre-tokenizer (LLaMA-3.x, SmolLM2), or a directory holding one and no ``tokenizer.model``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from megatron_adapt.tokenizer import byte_level_bpe
from megatron_adapt.tokenizer.sentencepiece_model import SPACE, load_model_proto, processor

TokenizerKind = Literal["sentencepiece", "byte_level_bpe"]


def locate(path: str | Path) -> tuple[TokenizerKind, Path]:
    """(kind, the tokenizer file) for a tokenizer file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        for name, kind in (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "byte_level_bpe")):
            if (path / name).is_file():
                return kind, path / name
        raise FileNotFoundError(f"{path}: directory has neither tokenizer.model nor tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    return ("byte_level_bpe" if path.suffix == ".json" else "sentencepiece"), path


@dataclass
class TextTokenizer:
    """Vocabulary size, EOS and token names, whichever the kind."""

    kind: TokenizerKind
    path: Path

    @functools.cached_property
    def _sp(self) -> spm.SentencePieceProcessor:
        return processor(load_model_proto(self.path))

    @functools.cached_property
    def _hf(self):
        return byte_level_bpe.load(self.path)

    @property
    def hf_tokenizer(self):
        """The ``tokenizers.Tokenizer`` of a byte-level BPE tokenizer.json."""
        return self._hf[1]

    @property
    def vocab_size(self) -> int:
        """Rows an embedding needs: one past the highest id (special tokens included)."""
        if self.kind == "sentencepiece":
            return self._sp.get_piece_size()
        return byte_level_bpe.first_new_id(self._hf[0])

    @property
    def eos_id(self) -> int | None:
        if self.kind == "sentencepiece":
            eos = self._sp.eos_id()
            return eos if eos >= 0 else None
        return _hf_eos_id(self.path, self._hf[1])

    def tokens(self, start: int = 0) -> list[str]:
        """Token strings of ids ``start`` … vocab_size − 1 ("" where an id is unused)."""
        if self.kind == "sentencepiece":
            return [self._sp.id_to_piece(i) for i in range(start, self.vocab_size)]
        tokenizer = self._hf[1]
        return [tokenizer.id_to_token(i) or "" for i in range(start, self.vocab_size)]

    def subword_ids(self, tokens: list[str]) -> list[list[int]]:
        """This (base) tokenizer's ids for the text of each of another tokenizer's tokens."""
        if self.kind == "sentencepiece":
            plain = processor(load_model_proto(self.path), add_dummy_prefix=False)
            return plain.encode([t.replace(SPACE, " ") for t in tokens], out_type=int)
        return byte_level_bpe.subword_ids(self._hf[1], tokens)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    kind, file = locate(path)
    return TextTokenizer(kind, file)


def _hf_eos_id(path: Path, tokenizer) -> int | None:
    """The end-of-text id from tokenizer_config.json beside tokenizer.json, else a usual name."""
    config = path.parent / "tokenizer_config.json"
    names = []
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        names.append(eos["content"] if isinstance(eos, dict) else eos)
    names += ["<|end_of_text|>", "<|endoftext|>", "</s>"]
    for name in names:
        if name and tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name)
    return None
