"""Extend a BPE tokenizer with a new language: the pipeline behind ``tools/extend_tokenizer.py``.

Corpus lines are split by a stable hash into training lines and held-out lines (never seen by
training). Training learns pieces on top of the base tokenizer's segmentation (``bpe_extend``),
appends them (``sentencepiece_model.merge_pieces`` for a SentencePiece model, appended merges for
a byte-level BPE ``tokenizer.json``: ``byte_level_bpe``), removes any piece that encoding cannot
reach, and writes the tokenizer files and a report measured on the held-out lines. The
output directory is assembled under a temporary name and renamed into place at the end, so a
failed run leaves nothing behind that looks like a tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tokenizers import Tokenizer
from tqdm import tqdm

from megatron_adapt.atomic import atomic_dir
from megatron_adapt.text.corpus import BadLine, iter_documents
from megatron_adapt.text.heldout import is_heldout
from megatron_adapt.tokenizer import bpe_extend, byte_level_bpe, sentencepiece_model
from megatron_adapt.tokenizer.hf_files import write_hf_files
from megatron_adapt.tokenizer.languages import profile
from megatron_adapt.tokenizer.load import locate

log = logging.getLogger(__name__)


@dataclass
class ExtendConfig:
    base_model: Path
    """Tokenizer to extend: a SentencePiece BPE ``tokenizer.model`` (LLaMA-2's), or a byte-level BPE
    ``tokenizer.json`` (LLaMA-3, SmolLM2), or a directory holding one (``load.locate``)."""
    corpus: list[Path]
    """New-language text: plain text or JSONL, optionally .gz/.xz/.zst."""
    num_new_tokens: int | list[int]
    """Upper bound on added pieces (fewer are added if pairs run out or pieces are unreachable);
    several sizes: one learning, a tokenizer for each size in ``OUT/<size>/`` and the sweep."""
    output_dir: Path
    lang: str | None = None
    """Language code choosing the profile in ``languages.py`` (normalization, ASCII pieces, scripts)."""
    scripts: list[str] | None = None
    """Override the profile's scripts (Unicode script names, e.g. LATIN, CJK; ["any"]: no restriction)."""
    english: list[Path] = field(default_factory=list)
    """English text: its base segmentation is protected, and held-out lines measure the change."""
    text_key: str = "text"
    normalize: str | None = None
    """Override the profile's normalization: 'vi', 'nfc' or 'none'."""
    heldout_per_mille: int = 10
    """Lines held out for measurement, per thousand (stable hash of file, line, paragraph)."""
    max_eval_lines: int = 5000
    min_frequency: int = 1
    """Drop word runs seen fewer times (a speed knob for very large corpora)."""
    threads: int = 0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.base_model, self.output_dir = Path(self.base_model), Path(self.output_dir)
        self.corpus, self.english = [Path(p) for p in self.corpus], [Path(p) for p in self.english]
        if any(n <= 0 for n in self.sizes):
            raise ValueError(f"--num-new-tokens must be positive, got {self.num_new_tokens}")
        if not self.corpus:
            raise ValueError("no corpus file given")
        if not self.base_model.exists():
            raise FileNotFoundError(f"{self.base_model}: no such file or directory")
        for path in [*self.corpus, *self.english]:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
        if not 0 < self.heldout_per_mille < 1000:
            raise ValueError(f"heldout_per_mille must be in 1..999, got {self.heldout_per_mille}")

    @property
    def sizes(self) -> list[int]:
        sizes = self.num_new_tokens if isinstance(self.num_new_tokens, list) else [self.num_new_tokens]
        return sorted(set(sizes))


@dataclass
class CorpusSplit:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)


def split_lines(paths: list[Path], text_key: str, per_mille: int, progress: bool) -> CorpusSplit:
    """Every non-empty paragraph line of the corpus, assigned to train or held-out by hash."""
    split = CorpusSplit()
    for path in paths:
        docs = iter_documents(path, text_key, on_bad=split.bad_lines.append)
        for lineno, text in tqdm(docs, desc=f"reading {path.name}", unit="doc", disable=not progress):
            for j, line in enumerate(text.split("\n")):
                if not line.strip():
                    continue
                heldout = is_heldout(f"{path.name}:{lineno}:{j}", per_mille)
                (split.heldout if heldout else split.train).append(line)
    return split


def compression(base_sp, ext_sp, lines: list[str]) -> dict[str, float]:
    """Tokens per whitespace word and characters per token, base vs extended.

    Tokens per word is the usual fertility for spaced scripts; characters per token also speaks
    for scripts written without spaces (Chinese)."""
    words = max(sum(len(line.split()) for line in lines), 1)
    chars = sum(len(line) for line in lines)
    base = sum(len(ids) for ids in base_sp.encode(lines))
    ext = sum(len(ids) for ids in ext_sp.encode(lines))
    return {"base": base / words, "extended": ext / words,
            "chars_per_token_base": chars / max(base, 1), "chars_per_token_extended": chars / max(ext, 1)}


def _refuse_existing(config: ExtendConfig) -> None:
    out = config.output_dir
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


def _remove_unreachable(pieces: list[str], components: dict[str, tuple[str, str]],
                        unreachable_of: Callable[[list[str]], set[str]]) -> tuple[list[str], list[str]]:
    """Drop pieces encoding cannot reach and every piece built from them, until none are left."""
    dropped: list[str] = []
    while True:
        bad = unreachable_of(pieces)
        if not bad:
            return pieces, dropped
        keep = []
        for piece in pieces:  # in learning order, so components are decided before their pieces
            if piece in bad or any(c in bad for c in components.get(piece, ())):
                bad.add(piece)
                dropped.append(piece)
            else:
                keep.append(piece)
        pieces = keep


class _Batch:
    """``encode(lines)`` → id lists of a tokenizers.Tokenizer, without special tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, lines: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(lines, add_special_tokens=False)]


@dataclass
class _Extended:
    """What each kind's extension hands the common measuring and writing."""

    base_vocab_size: int
    vocab_size: int
    added: int
    new_characters: int
    dropped: int
    unreachable: int
    base: object
    extended: object
    """Base and extended encoders: ``encode(lines)`` → id lists."""
    write: Callable[[Path], None]
    english_protected_pairs: int
    added_texts: list[str]
    """The added pieces' text (a partial character as U+FFFD), for the script breakdown."""


@dataclass
class _Learned:
    """One learning run: its pieces in learning order, and the tokenizer of any prefix of them."""

    pieces: list[str]
    build: Callable[[list[str]], _Extended]


def _learn_sentencepiece(config: ExtendConfig, lang, train: list[str], english: list[str], budget: int) -> _Learned:
    base = sentencepiece_model.load_model_proto(config.base_model)
    segmenter = bpe_extend.BaseSegmenter(sentencepiece_model.processor(base, add_dummy_prefix=False), config.threads)
    forbidden = bpe_extend.forbidden_pairs(segmenter, list(bpe_extend.count_words(english)))
    counts = bpe_extend.count_words(train, lang.normalize)
    counts = Counter({w: c for w, c in counts.items() if c >= config.min_frequency})
    counts = bpe_extend.keep_scripts(counts, lang.scripts)
    max_length = base.trainer_spec.max_sentencepiece_length or 16
    result = bpe_extend.learn_pieces(
        counts, segmenter, budget,
        functools.partial(bpe_extend.mergeable, max_length=max_length, ascii_piece=lang.ascii_piece),
        forbidden, lang.character_coverage, progress=config.progress)
    new_chars = set(result.new_chars)

    def unreachable_of(pieces: list[str]) -> set[str]:
        model = sentencepiece_model.merge_pieces(base, pieces)
        return {model.pieces[i].piece for i in sentencepiece_model.unreachable_pieces(model, len(base.pieces))}

    def build(learned: list[str]) -> _Extended:
        pieces, dropped = _remove_unreachable(learned, {a + b: (a, b) for a, b in result.merges}, unreachable_of)
        model = sentencepiece_model.merge_pieces(base, pieces)

        def write(directory: Path) -> None:
            (directory / "tokenizer.model").write_bytes(model.SerializeToString())
            write_hf_files(model, directory)

        return _Extended(
            base_vocab_size=len(base.pieces), vocab_size=len(model.pieces), added=len(pieces),
            new_characters=len(new_chars.intersection(pieces)), dropped=len(dropped),
            unreachable=len(sentencepiece_model.unreachable_pieces(model, len(base.pieces))),
            base=sentencepiece_model.processor(base), extended=sentencepiece_model.processor(model), write=write,
            english_protected_pairs=len(forbidden),
            added_texts=[p.replace(sentencepiece_model.SPACE, " ") for p in pieces])

    return _Learned(result.pieces, build)


def _learn_byte_level_bpe(config: ExtendConfig, lang, train: list[str], english: list[str], budget: int) -> _Learned:
    base_spec, base = byte_level_bpe.load(config.base_model)
    segmenter = byte_level_bpe.ByteLevelSegmenter(base)
    forbidden = bpe_extend.forbidden_pairs(segmenter, list(byte_level_bpe.count_words(english, base)))
    counts = byte_level_bpe.count_words(train, base, lang.normalize)
    counts = Counter({w: c for w, c in counts.items() if c >= config.min_frequency})
    counts = bpe_extend.keep_scripts(counts, lang.scripts, byte_level_bpe.token_text)
    result = bpe_extend.learn_pieces(counts, segmenter, budget,
                                     byte_level_bpe.piece_rule(lang.ascii_piece, lang.scripts), forbidden,
                                     character_coverage=1.0, progress=config.progress)
    first = byte_level_bpe.first_new_id(base_spec)
    merges = {a + b: (a, b) for a, b in result.merges}

    def tokenizer_of(pieces: list[str]) -> Tokenizer:
        spec = byte_level_bpe.extended_spec(base_spec, [merges[p] for p in pieces])
        return Tokenizer.from_str(json.dumps(spec))

    def unreachable_of(pieces: list[str]) -> set[str]:
        return set(byte_level_bpe.unreachable(tokenizer_of(pieces), first))

    def build(learned: list[str]) -> _Extended:
        reachable, dropped = _remove_unreachable(learned, merges, unreachable_of)
        pieces = byte_level_bpe.without_idle_stepping_stones(reachable, merges)
        kept = set(pieces)
        dropped += [p for p in reachable if p not in kept]
        spec = byte_level_bpe.extended_spec(base_spec, [merges[p] for p in pieces])
        extended = Tokenizer.from_str(json.dumps(spec))

        def write(directory: Path) -> None:
            (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
            for name in byte_level_bpe.COMPANION_FILES:
                if (config.base_model.parent / name).is_file():
                    shutil.copy(config.base_model.parent / name, directory / name)

        return _Extended(
            base_vocab_size=first, vocab_size=first + len(pieces), added=len(pieces), new_characters=0,
            dropped=len(dropped), unreachable=len(byte_level_bpe.unreachable(extended, first)),
            base=_Batch(base), extended=_Batch(extended), write=write, english_protected_pairs=len(forbidden),
            added_texts=[byte_level_bpe.token_text(p) for p in pieces])

    return _Learned(result.pieces, build)


def extend_tokenizer(config: ExtendConfig) -> dict:
    """Run the whole extension; returns the report also written to OUT/report.json (several sizes:
    ``{"sizes": {size: report}}``, written as OUT/sweep.json beside OUT/<size>/ and the plot)."""
    start = time.time()
    lang = profile(config.lang, config.normalize, config.scripts)
    kind, config.base_model = locate(config.base_model)
    learn = _learn_sentencepiece if kind == "sentencepiece" else _learn_byte_level_bpe
    if kind == "sentencepiece":
        sentencepiece_model.load_model_proto(config.base_model)  # refuse a bad model before reading corpora
    else:
        byte_level_bpe.load(config.base_model)
    _refuse_existing(config)
    sizes = config.sizes
    with atomic_dir(config.output_dir) as tmp:
        corpus = split_lines(config.corpus, config.text_key, config.heldout_per_mille, config.progress)
        if not corpus.train:
            raise ValueError(f"corpus {', '.join(map(str, config.corpus))} has no text lines")
        english = split_lines(config.english, config.text_key, config.heldout_per_mille, config.progress)
        learned = learn(config, lang, corpus.train, english.train, sizes[-1])
        normalize = lang.normalize or (lambda s: s)
        heldout = [normalize(line) for line in corpus.heldout[: config.max_eval_lines]]
        en_heldout = english.heldout[: config.max_eval_lines]
        if not en_heldout:
            log.warning("no English text given (--english): English tokenization is not protected or measured")
        reports = {}
        for size in sizes:
            ext = learned.build(learned.pieces[:size])
            if ext.dropped:
                log.info("size %d: dropped %d pieces: unreachable ones, pieces built from them, partial characters "
                         "nothing builds on", size, ext.dropped)
            report = _measure(ext, kind, lang, heldout, en_heldout, corpus, english)
            report["requested"] = size
            directory = tmp if len(sizes) == 1 else tmp / str(size)
            directory.mkdir(exist_ok=True)
            ext.write(directory)
            reports[size] = report
        config_record = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) and v
                             and isinstance(v[0], Path) else v) for k, v in dataclasses.asdict(config).items()}
        seconds = round(time.time() - start, 1)
        for size, report in reports.items():
            report.update(seconds=seconds, config=config_record)
            directory = tmp if len(sizes) == 1 else tmp / str(size)
            (directory / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        if len(sizes) == 1:
            return reports[sizes[0]]
        sweep = {"sizes": reports, "seconds": seconds}
        (tmp / "sweep.json").write_text(json.dumps(sweep, indent=2, ensure_ascii=False))
        plot_sweep(reports, tmp / "sweep.png")
    return sweep


def _measure(ext: _Extended, kind: str, lang, heldout: list[str], en_heldout: list[str],
             corpus: CorpusSplit, english: CorpusSplit) -> dict:
    """One extended tokenizer's report: sizes, held-out fertility, English identity, scripts."""
    report = {
        "tokenizer_kind": kind,
        "base_vocab_size": ext.base_vocab_size, "vocab_size": ext.vocab_size, "added": ext.added,
        "embedding_rows_added": ext.vocab_size - ext.base_vocab_size,
        "unreachable_added": ext.unreachable,
        "new_characters": ext.new_characters, "dropped_unreachable": ext.dropped,
        "fertility": {lang.name: compression(ext.base, ext.extended, heldout)},
        "heldout_in_scripts": None,
        "english_identical_fraction": None,
        "heldout_lines": {lang.name: len(heldout), "en": len(en_heldout)},
        "bad_lines": len(corpus.bad_lines) + len(english.bad_lines),
        "bad_line_examples": [str(b) for b in (corpus.bad_lines + english.bad_lines)[:10]],
        "normalization": lang.normalization, "english_protected_pairs": ext.english_protected_pairs,
        "scripts": sorted(lang.scripts) if lang.scripts is not None else "any",
        "added_scripts": added_scripts(ext.added_texts),
    }
    if lang.scripts is not None:  # the language's own text: lines without foreign-script names
        in_scripts = [line for line in heldout if bpe_extend.in_scripts(line, lang.scripts)]
        report["fertility"][in_scripts_key(lang)] = compression(ext.base, ext.extended, in_scripts)
        report["heldout_in_scripts"] = len(in_scripts)
    if en_heldout:
        same = sum(a == b for a, b in zip(ext.base.encode(en_heldout), ext.extended.encode(en_heldout)))
        report["english_identical_fraction"] = same / len(en_heldout)
        report["fertility"]["en"] = compression(ext.base, ext.extended, en_heldout)
    return report


def in_scripts_key(lang) -> str:
    """The fertility entry of the held-out lines written in the language's scripts only."""
    return f"{lang.name} ({'+'.join(sorted(lang.scripts))} lines)"


def plot_sweep(reports: dict[int, dict], path: Path) -> None:
    """Tokens per word of each held-out text against the pieces added, one line per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(reports)
    fig, ax = plt.subplots(figsize=(6, 4))
    for text in reports[sizes[0]]["fertility"]:
        ax.plot([reports[s]["added"] for s in sizes], [reports[s]["fertility"][text]["extended"] for s in sizes],
                marker="o", label=text)
    ax.set_xlabel("pieces added")
    ax.set_ylabel("tokens per word (held-out)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def added_scripts(texts: list[str]) -> dict[str, int]:
    """How many added pieces have letters of each script ("PARTIAL": the first bytes of one
    character; "NONE": no letters), most first."""
    labels = Counter("PARTIAL" if "\ufffd" in t else bpe_extend.script_label(t) for t in texts)
    return dict(labels.most_common())


def iter_sweep_summary(sweep: dict) -> Iterator[str]:
    """One row per size: pieces and rows added, held-out tokens/word, English identity."""
    reports = sweep["sizes"]
    texts = list(next(iter(reports.values()))["fertility"])
    yield f"{'requested':>10}{'added':>8}{'rows':>8}" + "".join(f"{t:>22}" for t in texts) + f"{'English same':>14}"
    for size, r in reports.items():
        identical = r["english_identical_fraction"]
        yield (f"{size:>10}{r['added']:>8}{r['embedding_rows_added']:>8}"
               + "".join(f"{r['fertility'][t]['extended']:>22.3f}" for t in texts)
               + f"{'n/a' if identical is None else f'{identical:.2%}':>14}")


def iter_summary(report: dict) -> Iterator[str]:
    """The report as a small table, for the tool's closing summary."""
    yield f"{'base vocab':<28}{report['base_vocab_size']:>12}"
    yield f"{'extended vocab':<28}{report['vocab_size']:>12}"
    yield f"{'added pieces':<28}{report['added']:>12}"
    yield f"{'  of which new characters':<28}{report['new_characters']:>12}"
    yield f"{'unreachable added':<28}{report['unreachable_added']:>12}"
    yield f"{'tokens/word (chars/token)':<28}{'base':>16}{'extended':>16}"
    for lang, f in report["fertility"].items():
        base = f"{f['base']:.3f} ({f['chars_per_token_base']:.2f})"
        ext = f"{f['extended']:.3f} ({f['chars_per_token_extended']:.2f})"
        yield f"{'  ' + lang:<28}{base:>16}{ext:>16}"
    added = max(report["added"], 1)
    breakdown = ", ".join(f"{name} {n} ({n / added:.1%})" for name, n in list(report["added_scripts"].items())[:5])
    yield f"{'added pieces by script':<28}{breakdown}"
    identical = report["english_identical_fraction"]
    yield f"{'English lines identical':<28}{'n/a' if identical is None else f'{identical:.2%}':>12}"
    if report["bad_lines"]:
        yield f"{'bad input lines skipped':<28}{report['bad_lines']:>12}"
