"""Hugging Face byte-level BPE tokenizers (``tokenizer.json``: LLaMA-3.x, SmolLM2, GPT-2 style).

Such a tokenizer pre-tokenizes text into words spelled in the ByteLevel alphabet (every UTF-8 byte
one printable character, a space "Ġ"), then applies its merges by rank. Extending it mirrors the
SentencePiece path: new merges are learned on the base tokenizer's own segmentation of each
pre-tokenized word (``bpe_extend.learn_pieces``) and appended after the base merges, the new
tokens taking ids after the highest existing id. A new merge then only fires once no base merge
applies, so base ids, merges and special tokens stay as they were, and each new token is reached
by the merges that built it (checked by ``unreachable``).

There is no byte fallback to replace: every character is already reachable through its bytes,
and a learned merge may join bytes of a character the base never merged.
"""

from __future__ import annotations

import copy
import functools
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from megatron_adapt.tokenizer.bpe_extend import in_scripts, mergeable
from megatron_adapt.tokenizer.sentencepiece_model import SPACE

# The files a Hugging Face tokenizer directory may hold beside tokenizer.json that stay valid
# when merges are appended (vocab.json / merges.txt of slow tokenizers would be stale: not copied).
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")


class NotByteLevelBPEError(ValueError):
    """The tokenizer.json is not a byte-level BPE tokenizer this module can extend."""


@functools.cache
def _char_to_byte() -> dict[str, int]:
    """GPT-2's reversible byte-to-character table (transformers' own), inverted."""
    return {c: b for b, c in bytes_to_unicode().items()}


def piece_bytes(piece: str) -> bytes:
    """The bytes a ByteLevel-alphabet token stands for."""
    table = _char_to_byte()
    return bytes(table[c] for c in piece)


def load(path: str | Path) -> tuple[dict, Tokenizer]:
    """(the tokenizer.json as a dict, the tokenizer) after checking it is byte-level BPE."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise NotByteLevelBPEError(f"{path}: not a Hugging Face tokenizer.json ({err})") from None
    kind = (spec.get("model") or {}).get("type") if isinstance(spec, dict) else None
    if kind != "BPE":
        raise NotByteLevelBPEError(f"{path}: model type is {kind}, not BPE (only BPE tokenizers can be extended "
                                   "by appending merges)")
    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise NotByteLevelBPEError(
            f"{path}: BPE without a ByteLevel pre-tokenizer (pre_tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}); for a SentencePiece-style model pass its "
            "tokenizer.model instead")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # the tokenizers library raises its own exception type
        raise NotByteLevelBPEError(f"{path}: the tokenizers library cannot load it ({err})") from None
    return spec, tokenizer


def first_new_id(spec: dict) -> int:
    """One past the highest id in use, base vocabulary and added/special tokens alike."""
    ids = [*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]
    return max(ids) + 1


def merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """The merges in rank order, whichever of the two serializations the file uses."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"]["merges"]]


def extended_spec(base: dict, merges: list[tuple[str, str]]) -> dict:
    """The base tokenizer.json with ``merges`` appended and their tokens given the next ids.

    The tokenizers library gives an added token that is not in the model's vocabulary the id
    ``len(vocab) + k`` when it loads a file, whatever id the file records: LLaMA-3's specials keep
    128000… only because its vocabulary has exactly 128000 entries. Once new tokens follow them that
    count no longer matches, so such tokens are entered into the vocabulary under their own ids.
    """
    spec = copy.deepcopy(base)
    vocab, next_id = spec["model"]["vocab"], first_new_id(base)
    for token in spec.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    as_lists = bool(spec["model"]["merges"]) and isinstance(spec["model"]["merges"][0], list)
    for a, b in merges:
        vocab[a + b] = next_id
        next_id += 1
        spec["model"]["merges"].append([a, b] if as_lists else f"{a} {b}")
    return spec


class ByteLevelSegmenter:
    """The base tokenizer's tokens for pre-tokenized words (``bpe_extend.learn_pieces``'s view)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.model = tokenizer.model
        self.pieces = list(tokenizer.get_vocab(with_added_tokens=False))

    def segment(self, words: list[str]) -> list[list[str]]:
        return [[t.value for t in self.model.tokenize(w)] for w in words]


def count_words(texts: Iterable[str], tokenizer: Tokenizer,
                normalize: Callable[[str], str] | None = None) -> Counter:
    """Frequencies of the pre-tokenized words of whitespace words, each read as following a space.

    Pre-tokens never span whitespace (only a leading space joins a word), so pre-tokenizing each
    distinct whitespace word once gives the words of whole texts at a fraction of the cost.
    """
    words: Counter = Counter()
    for text in texts:
        words.update((normalize(text) if normalize else text).split())
    pre, norm = tokenizer.pre_tokenizer, tokenizer.normalizer
    counts: Counter = Counter()
    for word, freq in words.items():
        text = norm.normalize_str(" " + word) if norm else " " + word
        for piece, _ in pre.pre_tokenize_str(text):
            counts[piece] += freq
    return counts


def lone_partial_character(data: bytes) -> bool:
    """Is ``data`` the first bytes of one UTF-8 character, and nothing else?"""
    if not data or not 0xC0 <= data[0] < 0xF8:
        return False
    length = 2 if data[0] < 0xE0 else 3 if data[0] < 0xF0 else 4
    return len(data) < length and all(0x80 <= b < 0xC0 for b in data[1:])


def splits_a_character(data: bytes) -> bool:
    """Does a token of these bytes start or end inside a UTF-8 character?"""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def without_idle_stepping_stones(pieces: list[str], components: dict[str, tuple[str, str]]) -> list[str]:
    """``pieces`` less those that end inside a character and build no other kept piece (learned for
    a character whose completion was not learned): such a token would only split it."""
    while True:
        used = {part for piece in pieces for part in components.get(piece, ())}
        kept = [p for p in pieces if p in used or not splits_a_character(piece_bytes(p))]
        if len(kept) == len(pieces):
            return kept
        pieces = kept


def piece_rule(ascii_piece: Callable[[str, bool], bool], scripts: frozenset[str] | None = None,
               max_length: int = 16) -> Callable[[str], bool]:
    """``bpe_extend.mergeable`` read on a token's text, whose letters must be in ``scripts``.

    A token never starts inside a UTF-8 character, and ends inside one only as the first bytes of
    one character, alone or after a space: BPE reaches a multi-byte character the base never
    merged only through such a prefix, and byte-level bases already hold space + lead byte
    tokens ("Ġá"), which a word-initial character then grows from. So no token glues a
    character's bytes to other text, and English (ASCII) text never contains one."""

    def allowed(piece: str) -> bool:
        data = piece_bytes(piece)
        if splits_a_character(data):
            return lone_partial_character(data.removeprefix(b" "))
        text = data.decode("utf-8")
        if not in_scripts(text, scripts):
            return False
        return mergeable(SPACE + text[1:] if text.startswith(" ") else text, max_length, ascii_piece)

    return allowed


def unreachable(tokenizer: Tokenizer, first_id: int) -> list[str]:
    """Tokens from ``first_id`` on that the model does not produce for their own text."""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    bad = []
    for piece, i in vocab.items():
        if i >= first_id and [t.id for t in tokenizer.model.tokenize(piece)] != [i]:
            bad.append(piece)
    return bad


def token_text(piece: str) -> str:
    """A token's text, a partial character shown as U+FFFD."""
    return piece_bytes(piece).decode("utf-8", errors="replace")


def subword_ids(base: Tokenizer, pieces: list[str]) -> list[list[int]]:
    """The base tokenization of each piece's bytes (its ByteLevel spelling, so partial characters too)."""
    return [[t.id for t in base.model.tokenize(p)] for p in pieces]
