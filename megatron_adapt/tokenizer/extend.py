"""Extend a SentencePiece BPE tokenizer with a new language: the pipeline behind
``tools/extend_tokenizer.py``.

Corpus lines are split by a stable hash into training lines and held-out lines (never seen by
training). Training learns pieces on top of the base model's segmentation (``bpe_extend``),
merges them (``merge``), removes any piece that encoding cannot reach, and writes the
SentencePiece model, the HF tokenizer files and a report measured on the held-out lines. The
output directory is assembled under a temporary name and renamed into place at the end, so a
failed run leaves nothing behind that looks like a tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from megatron_adapt.text.corpus import BadLine, iter_documents
from megatron_adapt.tokenizer import bpe_extend, sentencepiece_model
from megatron_adapt.tokenizer.hf_files import write_hf_files
from megatron_adapt.tokenizer.languages import profile

log = logging.getLogger(__name__)


@dataclass
class ExtendConfig:
    base_model: Path
    """SentencePiece BPE model to extend (LLaMA-2's tokenizer.model)."""
    corpus: list[Path]
    """New-language text: plain text or JSONL, optionally .gz/.xz/.zst."""
    num_new_tokens: int
    """Upper bound on added pieces; fewer are added if pairs run out or pieces are unreachable."""
    output_dir: Path
    lang: str | None = None
    """Language code choosing the profile in ``languages.py`` (normalization, ASCII pieces)."""
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
        if self.num_new_tokens <= 0:
            raise ValueError(f"--num-new-tokens must be positive, got {self.num_new_tokens}")
        if not self.corpus:
            raise ValueError("no corpus file given")
        for path in [self.base_model, *self.corpus, *self.english]:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
        if not 0 < self.heldout_per_mille < 1000:
            raise ValueError(f"heldout_per_mille must be in 1..999, got {self.heldout_per_mille}")


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
                key = zlib.crc32(f"{path.name}:{lineno}:{j}".encode()) % 1000
                (split.heldout if key < per_mille else split.train).append(line)
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


def _prepare_output(config: ExtendConfig) -> Path:
    out = config.output_dir
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as err:
        raise PermissionError(f"{out}: cannot write there ({err.strerror})") from None


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _remove_unreachable(base, result: bpe_extend.ExtensionResult) -> tuple[object, list[str], list[str]]:
    """Merge, then drop pieces encoding cannot reach and every piece built from them, until none."""
    pieces = result.pieces
    components = {a + b: (a, b) for a, b in result.merges}
    dropped: list[str] = []
    while True:
        model = sentencepiece_model.merge_pieces(base, pieces)
        bad = {model.pieces[i].piece for i in sentencepiece_model.unreachable_pieces(model, len(base.pieces))}
        if not bad:
            return model, pieces, dropped
        keep = []
        for piece in pieces:  # in learning order, so components are decided before their pieces
            if piece in bad or any(c in bad for c in components.get(piece, ())):
                bad.add(piece)
                dropped.append(piece)
            else:
                keep.append(piece)
        pieces = keep


def extend_tokenizer(config: ExtendConfig) -> dict:
    """Run the whole extension; returns the report also written to OUT/report.json."""
    start = time.time()
    lang = profile(config.lang, config.normalize)
    base = sentencepiece_model.load_model_proto(config.base_model)
    tmp = _prepare_output(config)
    try:
        corpus = split_lines(config.corpus, config.text_key, config.heldout_per_mille, config.progress)
        if not corpus.train:
            raise ValueError(f"corpus {', '.join(map(str, config.corpus))} has no text lines")
        normalize = lang.normalize or (lambda s: s)
        base_sp = sentencepiece_model.processor(base)
        segmenter = bpe_extend.BaseSegmenter(sentencepiece_model.processor(base, add_dummy_prefix=False), config.threads)
        english = split_lines(config.english, config.text_key, config.heldout_per_mille, config.progress)
        forbidden = bpe_extend.forbidden_pairs(segmenter, list(bpe_extend.count_words(english.train)))
        counts = bpe_extend.count_words(corpus.train, lang.normalize)
        counts = Counter({w: c for w, c in counts.items() if c >= config.min_frequency})
        result = bpe_extend.learn_pieces(
            counts, segmenter, config.num_new_tokens, lang.ascii_piece, forbidden, lang.character_coverage,
            max_piece_length=base.trainer_spec.max_sentencepiece_length or 16, progress=config.progress)
        model, pieces, dropped = _remove_unreachable(base, result)
        if dropped:
            log.info("dropped %d unreachable pieces (and pieces built from them)", len(dropped))
        ext_sp = sentencepiece_model.processor(model)

        heldout = [normalize(line) for line in corpus.heldout[: config.max_eval_lines]]
        en_heldout = english.heldout[: config.max_eval_lines]
        report = {
            "base_vocab_size": len(base.pieces), "vocab_size": len(model.pieces), "added": len(pieces),
            "unreachable_added": len(sentencepiece_model.unreachable_pieces(model, len(base.pieces))),
            "new_characters": len(result.new_chars), "dropped_unreachable": len(dropped),
            "fertility": {lang.name: compression(base_sp, ext_sp, heldout)},
            "english_identical_fraction": None,
            "heldout_lines": {lang.name: len(heldout), "en": len(en_heldout)},
            "bad_lines": len(corpus.bad_lines) + len(english.bad_lines),
            "bad_line_examples": [str(b) for b in (corpus.bad_lines + english.bad_lines)[:10]],
            "normalization": lang.normalization, "english_protected_pairs": len(forbidden),
        }
        if en_heldout:
            same = sum(a == b for a, b in zip(base_sp.encode(en_heldout), ext_sp.encode(en_heldout)))
            report["english_identical_fraction"] = same / len(en_heldout)
            report["fertility"]["en"] = compression(base_sp, ext_sp, en_heldout)
        else:
            log.warning("no English text given (--english): English tokenization is not protected or measured")

        (tmp / "tokenizer.model").write_bytes(model.SerializeToString())
        write_hf_files(model, tmp)
        report["seconds"] = round(time.time() - start, 1)
        report["config"] = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) else v)
                            for k, v in dataclasses.asdict(config).items()}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        _publish(tmp, config.output_dir)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    identical = report["english_identical_fraction"]
    yield f"{'English lines identical':<28}{'n/a' if identical is None else f'{identical:.2%}':>12}"
    if report["bad_lines"]:
        yield f"{'bad input lines skipped':<28}{report['bad_lines']:>12}"
