"""Learn new BPE pieces on top of a base SentencePiece BPE model's own segmentation.

Appending the pieces of a separately trained model (the usual merge) leaves many of them
unreachable: SentencePiece BPE only forms a piece by joining two adjacent symbols, and the base
model's merges run first and cut the text differently from the new model's. Here training starts
from what the base model actually produces for each word and learns merges of adjacent symbols,
most frequent pair first. The merged model gives the new pieces scores below every base piece, in
training order, so encoding first reproduces the base segmentation and then replays these merges:
each new piece is reachable by construction (``sentencepiece_model.unreachable_pieces`` checks it
on the result).

Constraints keep the base behaviour where the language is not the new one:
- a pair that occurs in the base segmentation of the English sample is never merged, so English
  text keeps its ids (the words that do change are only those with characters new to the model);
- a piece spelled only in ASCII must pass the language's rule (``languages.py``);
- pieces never mix scripts or contain digits, and stay within the base model's max piece length.
"""

from __future__ import annotations

import functools
import heapq
import logging
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import sentencepiece as spm
from tqdm import tqdm

from megatron_adapt.tokenizer.sentencepiece_model import SPACE

log = logging.getLogger(__name__)


@dataclass
class ExtensionResult:
    new_chars: list[str]
    """Characters the base model only reaches through byte fallback, added as pieces first."""
    merges: list[tuple[str, str]]
    """Learned merges in order; ``a + b`` is the new piece."""

    @property
    def pieces(self) -> list[str]:
        return self.new_chars + [a + b for a, b in self.merges]


@functools.lru_cache(maxsize=None)
def _script(ch: str) -> str:
    """A coarse Unicode script: '*' for combining marks (they join anything), 'N' for digits."""
    category = unicodedata.category(ch)
    if category.startswith("M"):
        return "*"
    if category.startswith("N"):
        return "N"
    name = unicodedata.name(ch, "")
    if category.startswith("L") or name.startswith("TIBETAN"):
        return name.split(" ", 1)[0]
    return "COMMON"


@functools.cache
def script_names() -> frozenset[str]:
    """First words of Unicode's letter names: the script names ("LATIN", "CJK", "THAI", …)."""
    names = set()
    for code in range(0x110000):
        ch = chr(code)
        if unicodedata.category(ch).startswith("L"):
            names.add(unicodedata.name(ch, "? ").split(" ", 1)[0])
    return frozenset(names - {"?"})


@functools.lru_cache(maxsize=None)
def char_script(ch: str) -> str | None:
    """The script a character belongs to: a letter's, a mark's named after one ("THAI CHARACTER
    MAI EK", "LAO VOWEL SIGN I"), Tibetan's signs ("TIBETAN MARK INTERSYLLABIC TSHEG"); None for
    what any script's text uses (digits, punctuation and symbols, combining accents, spaces)."""
    if ch.isascii():
        return "LATIN" if ch.isalpha() else None
    category = unicodedata.category(ch)
    first = unicodedata.name(ch, "").split(" ", 1)[0]
    if category.startswith("L") or (category.startswith("M") or first == "TIBETAN") and first in script_names():
        return first
    return None


def letter_scripts(text: str) -> set[str]:
    """The scripts of the characters in ``text`` that have one (``char_script``)."""
    return {script for script in map(char_script, text) if script is not None}


def in_scripts(text: str, scripts: frozenset[str] | None) -> bool:
    """Are all letters of ``text`` in ``scripts`` (None: any)?"""
    return scripts is None or letter_scripts(text) <= scripts


def script_label(text: str) -> str:
    """One name for a piece's script: its one script, "MIXED", or "NONE" (punctuation, digits)."""
    scripts = letter_scripts(text)
    return scripts.pop() if len(scripts) == 1 else "MIXED" if scripts else "NONE"


def keep_scripts(word_counts: Counter, scripts: frozenset[str] | None,
                 text_of: Callable[[str], str] = lambda w: w) -> Counter:
    """The word runs whose letters are all in ``scripts`` (``text_of`` reads a run's text)."""
    if scripts is None:
        return word_counts
    kept = Counter({w: c for w, c in word_counts.items() if in_scripts(text_of(w), scripts)})
    log.info("kept %d of %d word runs (letters in %s only)", len(kept), len(word_counts), ", ".join(sorted(scripts)))
    return kept


def mergeable(piece: str, max_length: int, ascii_piece: Callable[[str, bool], bool]) -> bool:
    """May ``piece`` be learned? One script, no digits, no inner space, not too long, and if
    spelled in ASCII only, accepted by the language's ``ascii_piece`` rule."""
    word_initial = piece.startswith(SPACE)
    body = piece[1:] if word_initial else piece
    if not body or SPACE in body or len(piece) > max_length:
        return False
    scripts = {_script(c) for c in body} - {"*"}
    if len(scripts) > 1 or "N" in scripts:
        return False
    return not body.isascii() or ascii_piece(body, word_initial)


class BaseSegmenter:
    """Base-model segmentation of words as piece strings, byte-fallback runs folded to characters.

    A word is given as its pieces will read: with a leading "▁" where it follows a space.
    ``processor`` must have its dummy prefix switched off (``sentencepiece_model.processor(..., False)``).
    """

    def __init__(self, processor: spm.SentencePieceProcessor, threads: int = 0) -> None:
        self.sp = processor
        self.threads = threads
        self.pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        self.is_byte = [processor.is_byte(i) for i in range(processor.get_piece_size())]

    def segment(self, words: list[str]) -> list[list[str]]:
        out = []
        texts = [w.replace(SPACE, " ") for w in words]
        for ids in self.sp.encode(texts, out_type=int, num_threads=self.threads):
            symbols, pending = [], bytearray()
            for i in ids:
                if self.is_byte[i]:
                    pending.append(int(self.pieces[i][3:5], 16))
                    continue
                if pending:
                    symbols.extend(pending.decode("utf-8", errors="replace"))
                    pending.clear()
                symbols.append(self.pieces[i])
            if pending:
                symbols.extend(pending.decode("utf-8", errors="replace"))
            out.append(symbols)
        return out


def script_runs(word: str) -> list[str]:
    """Split a whitespace word into runs of one script ("▁" on the first), digits one by one.

    Neither the base pieces nor learned ones cross these boundaries, so segmenting runs alone
    gives the same pieces as segmenting the sentence, and text without spaces (Chinese) still
    yields repeated units to count.
    """
    runs, current, current_script = [], SPACE, None
    for ch in word:
        script = _script(ch)
        if script == "*" or script == current_script and script != "N":
            current += ch
            continue
        if current_script is not None:
            runs.append(current)
            current = ""
        current += ch
        current_script = script
    runs.append(current)
    return runs


def count_words(texts: Iterable[str], normalize: Callable[[str], str] | None = None) -> Counter:
    """Frequencies of script runs of whitespace words, in the form ``BaseSegmenter`` takes."""
    words: Counter = Counter()
    for text in texts:
        words.update((normalize(text) if normalize else text).split())
    runs: Counter = Counter()
    for word, freq in words.items():
        for run in script_runs(word):
            runs[run] += freq
    return runs


def forbidden_pairs(segmenter: BaseSegmenter, english_words: Iterable[str]) -> set[tuple[str, str]]:
    """Adjacent symbol pairs of the base segmentation of English words: never to be merged."""
    pairs = set()
    for symbols in segmenter.segment(list(english_words)):
        pairs.update(zip(symbols, symbols[1:]))
    return pairs


def new_characters(word_counts: Counter, known: set[str], coverage: float, limit: int) -> list[str]:
    """Characters outside ``known``, most frequent first, until known + chosen characters cover
    ``coverage`` of all character occurrences (SentencePiece's character_coverage)."""
    counts: Counter = Counter()
    for word, freq in word_counts.items():
        for ch in word:
            counts[ch] += freq
    total = sum(counts.values())
    covered = sum(c for ch, c in counts.items() if ch in known or ch == SPACE)
    chosen = []
    for ch, c in sorted(((ch, c) for ch, c in counts.items() if ch not in known and ch != SPACE),
                        key=lambda item: -item[1]):
        if covered >= coverage * total or len(chosen) == limit:
            break
        chosen.append(ch)
        covered += c
    return chosen


def learn_pieces(word_counts: Counter, segmenter, num_new_pieces: int, piece_ok: Callable[[str], bool],
                 forbidden: set[tuple[str, str]] = frozenset(), character_coverage: float = 0.9999,
                 min_pair_count: int = 2, progress: bool = True) -> ExtensionResult:
    """Learn up to ``num_new_pieces`` pieces (new characters included) from word frequencies.

    ``segmenter`` gives the base tokenizer's ``pieces`` and ``segment(words)``: this class's for
    SentencePiece, ``byte_level_bpe.ByteLevelSegmenter`` for byte-level BPE (whose 256 byte
    characters leave no new ones). ``piece_ok`` says whether a joined piece may be learned
    (``mergeable`` for SentencePiece pieces). Characters beyond ``character_coverage`` stay
    byte-fallback, and no piece contains them.
    """
    vocab = set(segmenter.pieces)
    new_chars = new_characters(word_counts, vocab, character_coverage, num_new_pieces)
    vocab.update(new_chars)
    rare = {ch for w in word_counts for ch in w if len(ch) == 1 and ch not in vocab and ch != SPACE}
    words = [w for w in word_counts if not rare.intersection(w)]
    freqs = [word_counts[w] for w in words]
    segmented = segmenter.segment(words)
    log.info("%d new characters; %d word runs with rarer characters left out", len(new_chars),
             len(word_counts) - len(words))

    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, (symbols, freq) in enumerate(zip(segmented, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freq
            where[pair].add(index)

    def allowed(pair: tuple[str, str]) -> bool:
        merged = pair[0] + pair[1]
        return pair not in forbidden and merged not in vocab and piece_ok(merged)

    heap = [(-c, p) for p, c in pair_counts.items() if c >= min_pair_count and allowed(p)]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    budget = num_new_pieces - len(new_chars)
    bar = tqdm(total=budget, desc="learning pieces", unit="piece", disable=not progress)
    while heap and len(merges) < budget:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:  # stale entry: re-queue with the current count
            if count >= min_pair_count and allowed(pair):
                heapq.heappush(heap, (-count, pair))
            continue
        if not allowed(pair):
            continue
        merged = pair[0] + pair[1]
        merges.append(pair)
        vocab.add(merged)
        bar.update()
        changed: Counter = Counter()
        for index in where.pop(pair, ()):
            symbols, freq = segmented[index], freqs[index]
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            for p in zip(symbols, symbols[1:]):
                changed[p] -= freq
            for p in zip(out, out[1:]):
                changed[p] += freq
                where[p].add(index)
            segmented[index] = out
        for p, delta in changed.items():
            if delta == 0 or p == pair:
                continue
            pair_counts[p] += delta
            if delta > 0 and pair_counts[p] >= min_pair_count and allowed(p):
                heapq.heappush(heap, (-pair_counts[p], p))
        pair_counts.pop(pair, None)
    bar.close()
    return ExtensionResult(new_chars=new_chars, merges=merges)
