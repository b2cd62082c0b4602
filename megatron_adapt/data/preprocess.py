"""Corpora → megatron-core indexed datasets (.bin/.idx), sharded, resumable, tokenizer-bound.

Each input file becomes one shard under ``OUT.shards/``. Within a shard three stages overlap: a
reader thread decodes, parses and normalizes lines into batches of a few MB; an encoder thread
turns each batch into ids (``fast_encode``: a C++ chunk cache in front of SentencePiece's
multithreaded batch encode, both without the GIL); the calling thread appends the ids to
megatron-core's indexed dataset (``indexed.py``, byte-compatible with its builder). A shard's files are written
under temporary names and renamed; its ``.stats.json``, renamed last, marks it complete, so a
rerun skips it and a killed run never leaves a shard that looks finished. When every shard is
complete they are concatenated in input order into ``OUT.bin/.idx`` (deterministic: a resumed run
gives the same bytes as an uninterrupted one).

Templated inputs (parallel sentences, conversations) also get ``OUT_targetmask.bin/.idx``:
a uint8 indexed dataset with the same sequence lengths, 1 on target tokens and 0 on prompt tokens.
Conversations are rendered with a chat template and encoded whole by the transformers tokenizer
the export carries (``chat.py``), so a chat model's training ids are its inference ids.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, get_args

import numpy as np

from megatron_adapt.atomic import remove_stale, temporary_name, write_text
from megatron_adapt.data.chat import TEMPLATE_NAMES, ChatEncoder, conversation, load_chat_tokenizer, render
from megatron_adapt.data.fast_encode import ByteLevelEncoder, FastEncoder, make_encoder
from megatron_adapt.data.indexed import MASK_SUFFIX, IndexedWriter, optimal_dtype, read_index
from megatron_adapt.data.templates import Segments, iter_parallel
from megatron_adapt.text.corpus import BadLine, iter_documents, iter_records
from megatron_adapt.text.normalize import get_normalizer

log = logging.getLogger(__name__)
InputKind = Literal["text", "parallel", "instructions"]
Encoder = FastEncoder | ByteLevelEncoder | ChatEncoder


@dataclass
class PreprocessConfig:
    inputs: list[str]
    """Files or glob patterns. With ``kind='parallel'``: exactly two files, source then target."""
    tokenizer_model: str
    output_prefix: str
    workers: int = os.cpu_count() or 1
    """Encode threads (SentencePiece's, or the tokenizers library's pool for a tokenizer.json)."""
    kind: InputKind = "text"
    """text (documents), parallel (aligned sentence files) or instructions (chat/instruction JSONL)."""
    chat_template: str = "vbd"
    """instructions: vbd, llama2, or tokenizer (the tokenizer's own Jinja chat_template)."""
    text_key: str = "text"
    append_eod: bool = False
    normalize: str | None = None
    strict: bool = False
    source_lang: str = "en"
    target_lang: str = "vi"
    both_directions: bool = True
    batch_bytes: int = 4 << 20
    shard_index: int = 0
    num_shards: int = 1
    """Process inputs[shard_index::num_shards] only (a Slurm array task's share)."""
    merge: bool = True
    """Concatenate the shards into OUT once all are complete."""
    progress: bool = field(default_factory=lambda: sys.stderr.isatty())

    def __post_init__(self) -> None:
        if self.kind not in get_args(InputKind):
            raise ValueError(f"unknown input kind {self.kind!r}; expected one of {', '.join(get_args(InputKind))}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard index {self.shard_index} not in 0..{self.num_shards - 1}")
        if not Path(self.tokenizer_model).exists():
            raise FileNotFoundError(f"{self.tokenizer_model}: no such tokenizer model or directory")
        get_normalizer(self.normalize)  # validates the name
        if self.chat_template not in TEMPLATE_NAMES:
            raise ValueError(f"unknown chat template {self.chat_template!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
        if self.kind == "instructions" and self.append_eod:
            raise ValueError("--append-eod does not apply to conversations: the chat template ends each "
                             "assistant turn (with EOS for vbd and llama2), as the exported template will")


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Every file named or matched, in the order given (each pattern's matches sorted)."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"{pattern}: no such file")
        files.extend(Path(m) for m in matches)
    return files


# --- one shard ---------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar on a terminal; a log line every 30 s otherwise (readable in Slurm logs)."""

    def __init__(self, name: str, total_bytes: int, enabled: bool) -> None:
        self.name, self.total, self.start, self.last_log = name, total_bytes, time.time(), time.time()
        self.position = self.docs = self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, desc=name, unit="B", unit_scale=True)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.n = self.position
            self.bar.set_postfix(docs=self.docs, tok_s=f"{rate:,.0f}", refresh=False)
            self.bar.refresh()
        elif time.time() - self.last_log > 30:
            self.last_log = time.time()
            done = self.position / max(self.total, 1)
            eta = (time.time() - self.start) * (1 - done) / max(done, 1e-9)
            log.info("%s: %.1f%% %d docs %.0f tokens/s ETA %.0f s", self.name, 100 * done, self.docs, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.total
            self.bar.close()


def _documents(path: Path, config: PreprocessConfig, bad: Callable[[BadLine], None],
               on_position: Callable[[int], None], encoder: Encoder) -> Iterator[Segments]:
    """The file's documents as segments (plain text is one target segment)."""
    normalize = get_normalizer(config.normalize) or (lambda s: s)
    if config.kind == "text":
        for _, text in iter_documents(path, config.text_key, bad, config.strict, on_position):
            yield [(normalize(text), True)]
    elif config.kind == "instructions":
        assert isinstance(encoder, ChatEncoder)
        for lineno, record in iter_records(path, bad, config.strict, on_position):
            try:
                messages = [{**m, "content": normalize(m["content"])} for m in conversation(record)]
                segments = render(encoder.tokenizer, messages)
            except ValueError as err:
                if config.strict:
                    raise ValueError(f"{path}:{lineno}: {err}") from None
                bad(BadLine(str(path), lineno, str(err)))
                continue
            yield segments
    else:
        raise ValueError(config.kind)


def _batches(docs: Iterator[Segments], batch_bytes: int) -> Iterator[list[Segments]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += sum(len(t) for t, _ in doc)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _in_thread(items: Iterator, depth: int = 2) -> Iterator:
    """Run an iterator in a background thread, ``depth`` items ahead; exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as err:  # re-raised in the consumer
            q.put(err)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _write_shard(segment_batches: Iterator[list[Segments]], encoder: Encoder,
                 prefix: Path, config: PreprocessConfig, progress: _Progress) -> dict:
    """Encode and write one shard under temporary names; returns its counts."""
    dtype = optimal_dtype(encoder.vocab_size)
    templated = config.kind != "text"
    tmp = temporary_name(prefix)
    tokens_out = IndexedWriter(f"{tmp}.bin", dtype)
    masks_out = IndexedWriter(f"{tmp}{MASK_SUFFIX}.bin", np.uint8) if templated else None
    counts = {"documents": 0, "empty_documents": 0, "tokens": 0, "target_tokens": 0, "text_bytes": 0}
    eod = np.array([encoder.eos_id] if config.append_eod else [], dtype=np.int32)

    def write(batch: list[Segments], flat: np.ndarray, lengths: np.ndarray) -> None:
        # Segments of a document are consecutive in ``flat``; documents follow each other.
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        segment = 0
        for doc in batch:
            start, stop = offsets[segment], offsets[segment + len(doc)]
            if stop == start:
                counts["empty_documents"] += 1
                segment += len(doc)
                continue
            tokens = np.concatenate([flat[start:stop], eod])
            tokens_out.add_document(tokens)
            n_target = len(tokens)
            if masks_out is not None:
                mask = np.concatenate([np.full(lengths[segment + k], is_target, dtype=np.uint8)
                                       for k, (_, is_target) in enumerate(doc)] + [np.ones(len(eod), np.uint8)])
                masks_out.add_document(mask)
                n_target = int(mask.sum())
            segment += len(doc)
            counts["documents"] += 1
            counts["tokens"] += len(tokens)
            counts["target_tokens"] += n_target
            counts["text_bytes"] += sum(len(text.encode("utf-8")) for text, _ in doc)
        progress.update(len(batch), int(offsets[-1]))

    def encoded() -> Iterator[tuple[list[Segments], np.ndarray, np.ndarray]]:
        for batch in segment_batches:
            if isinstance(encoder, ChatEncoder):
                yield (batch, *encoder.encode_documents(batch))
            else:
                yield (batch, *encoder.encode([text for doc in batch for text, _ in doc]))

    try:
        # Encoding (GIL released) runs one batch ahead of writing.
        for batch, flat, lengths in _in_thread(encoded()):
            write(batch, flat, lengths)
    except BaseException:
        remove_temporaries(prefix)
        raise
    for builder, suffix in ((tokens_out, ""), (masks_out, MASK_SUFFIX)):
        if builder is not None:
            builder.finalize(f"{tmp}{suffix}.idx")
            os.replace(f"{tmp}{suffix}.bin", f"{prefix}{suffix}.bin")
            os.replace(f"{tmp}{suffix}.idx", f"{prefix}{suffix}.idx")
    return counts


def remove_temporaries(prefix: Path) -> None:
    """Delete half-written files of this shard (from a failure, or a run that was killed)."""
    remove_stale(prefix)


def process_shard(inputs: list[Path], prefix: Path, encoder: Encoder,
                  config: PreprocessConfig) -> dict:
    """Tokenize ``inputs`` into the shard ``prefix``; its stats file is written last."""
    remove_temporaries(prefix)
    start = time.time()
    bad_lines: list[BadLine] = []
    input_bytes = sum(p.stat().st_size for p in inputs)
    progress = _Progress(prefix.name, input_bytes, config.progress)
    if config.kind == "parallel":
        docs: Iterator[Segments] = (seg for _, seg in iter_parallel(
            inputs[0], inputs[1], config.source_lang, config.target_lang, config.both_directions))
    else:
        def set_position(pos: int) -> None:
            progress.position = pos

        docs = _documents(inputs[0], config, bad_lines.append, set_position, encoder)
    counts = _write_shard(_in_thread(_batches(docs, config.batch_bytes)), encoder, prefix, config, progress)
    progress.close()
    seconds = time.time() - start
    stats = {"inputs": [str(p) for p in inputs], **counts, "input_bytes": input_bytes,
             "bad_lines": len(bad_lines), "bad_line_examples": [str(b) for b in bad_lines[:20]],
             "seconds": round(seconds, 3), "tokens_per_second": round(counts["tokens"] / max(seconds, 1e-9))}
    write_text(f"{prefix}.stats.json", json.dumps(stats, indent=2, ensure_ascii=False))
    for b in bad_lines[:5]:
        log.warning("skipped %s", b)
    return stats


# --- the whole corpus ------------------------------------------------------------------------

def shard_plan(config: PreprocessConfig) -> list[tuple[list[Path], Path]]:
    """(inputs, shard prefix) for every shard of the corpus, in order."""
    files = expand_inputs(config.inputs)
    shards_dir = Path(f"{config.output_prefix}.shards")
    if config.kind == "parallel":
        if len(files) != 2:
            raise ValueError(f"parallel input takes two files (source, target), got {len(files)}")
        return [(files, shards_dir / f"00000-{files[0].name}")]
    return [([f], shards_dir / f"{i:05d}-{f.name}") for i, f in enumerate(files)]


def is_complete(prefix: Path) -> bool:
    return Path(f"{prefix}.stats.json").exists()


def merge_shards(prefixes: list[Path], output_prefix: str, templated: bool) -> None:
    """Concatenate shards in order into OUT.bin/.idx (and the target masks); idx renamed last."""
    suffixes = ["", MASK_SUFFIX] if templated else [""]
    for suffix in suffixes:
        dtype, _, _ = read_index(f"{prefixes[0]}{suffix}.idx")
        tmp = temporary_name(f"{output_prefix}{suffix}")
        writer = IndexedWriter(f"{tmp}.bin", dtype)
        for prefix in prefixes:
            writer.add_dataset(f"{prefix}{suffix}")
        writer.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", f"{output_prefix}{suffix}.bin")
        os.replace(f"{tmp}.idx", f"{output_prefix}{suffix}.idx")


def preprocess(config: PreprocessConfig) -> dict | None:
    """Process this task's shards; merge when all are complete. Returns the corpus stats (or
    None when other tasks' shards are still missing)."""
    plan = shard_plan(config)
    Path(f"{config.output_prefix}.shards").mkdir(parents=True, exist_ok=True)
    if config.kind == "instructions":
        encoder: Encoder = ChatEncoder(load_chat_tokenizer(config.tokenizer_model, config.chat_template))
    else:
        encoder = make_encoder(config.tokenizer_model, config.workers)
    if config.append_eod and encoder.eos_id < 0:
        raise ValueError(f"{config.tokenizer_model}: the tokenizer has no end-of-text token for --append-eod "
                         "(set eos_token in its tokenizer_config.json)")
    mine = plan[config.shard_index::config.num_shards]
    for inputs, prefix in mine:
        if is_complete(prefix):
            log.info("shard %s is complete; skipping", prefix.name)
            continue
        stats = process_shard(inputs, prefix, encoder, config)
        log.info("shard %s: %d documents, %d tokens, %d bad lines, %.0f tokens/s", prefix.name,
                 stats["documents"], stats["tokens"], stats["bad_lines"], stats["tokens_per_second"])
    missing = [prefix.name for _, prefix in plan if not is_complete(prefix)]
    if missing or not config.merge:
        if missing:
            log.info("%d shards not complete yet (e.g. %s); not merging", len(missing), missing[0])
        return None
    shard_stats = [json.loads(Path(f"{prefix}.stats.json").read_text()) for _, prefix in plan]
    merge_shards([prefix for _, prefix in plan], config.output_prefix, templated=config.kind != "text")
    totals = {key: sum(s[key] for s in shard_stats)
              for key in ("documents", "empty_documents", "tokens", "target_tokens", "input_bytes", "text_bytes",
                          "bad_lines")}
    seconds = sum(s["seconds"] for s in shard_stats)
    stats = {**totals, "shards": len(plan), "seconds": round(seconds, 3),
             "tokens_per_second": round(totals["tokens"] / max(seconds, 1e-9)),
             "bad_line_examples": [e for s in shard_stats for e in s["bad_line_examples"]][:20],
             "tokenizer_model": config.tokenizer_model, "vocab_size": encoder.vocab_size,
             "config": {k: v for k, v in asdict(config).items() if k != "progress"}}
    write_text(f"{config.output_prefix}.stats.json", json.dumps(stats, indent=2, ensure_ascii=False))
    return stats
