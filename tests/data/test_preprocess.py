"""tools/preprocess_data.py: output read back through megatron-core's IndexedDataset equals the
tokenizer's encode of the input; resumable, shardable, and tolerant of bad lines."""

from __future__ import annotations

import gzip
import json
import lzma
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_adapt.data.indexed import MASK_SUFFIX
from megatron_adapt.text.normalize import normalize_vi
from tests.shared_data import LLAMA2_TOKENIZER, PARALLEL, VIWIKI, require
from tools.preprocess_data import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def viwiki_docs() -> list[str]:
    require(VIWIKI, LLAMA2_TOKENIZER)
    docs = []
    with lzma.open(VIWIKI, "rt") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            if len(docs) == 1200:
                return docs
    return docs


def _read(prefix) -> list[np.ndarray]:
    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the mmap closes with dataset


def test_output_equals_tokenizer_encode(tmp_path, viwiki_docs):
    docs = viwiki_docs[:400] + ["", "  leading and  double  spaces ", "hoà bình"]
    path = tmp_path / "vi.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    out = tmp_path / "out" / "vi"
    assert main(["--input", str(path), "--tokenizer-model", str(LLAMA2_TOKENIZER), "--output-prefix", str(out),
                 "--workers", "2", "--append-eod", "--normalize", "vi"]) == 0

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    expected = [ids + [sp.eos_id()] for ids in sp.encode([normalize_vi(d) for d in docs]) if ids]
    got = _read(out)
    assert len(got) == len(expected) == len(docs) - 1, "document count differs (one input is empty)"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.tolist() == e, f"document {i}: ids differ from SentencePiece's encode"
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert stats["documents"] == len(expected) and stats["empty_documents"] == 1
    assert stats["tokens"] == sum(map(len, expected)) and stats["tokens_per_second"] > 0
    assert stats["input_bytes"] == path.stat().st_size


def _write_inputs(directory: Path, docs: list[str], files: int) -> list[Path]:
    """Several inputs in every supported form, each a slice of the documents."""
    paths = []
    for k in range(files):
        part = docs[k::files]
        kind = ("jsonl", "jsonl.gz", "jsonl.xz", "txt")[k % 4]
        path = directory / f"part{k}.{kind}"
        lines = [json.dumps({"text": d}, ensure_ascii=False) for d in part] if "jsonl" in kind else \
            [d.replace("\n", " ") for d in part]
        data = ("\n".join(lines) + "\n").encode()
        path.write_bytes(gzip.compress(data) if kind.endswith("gz") else lzma.compress(data) if kind.endswith("xz") else data)
        paths.append(path)
    return paths


def _tool(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *args]


def test_kill_and_resume_is_byte_identical(tmp_path, viwiki_docs):
    inputs = _write_inputs(tmp_path, viwiki_docs * 3, files=8)
    common = ["--input", str(tmp_path / "part*"), "--tokenizer-model", str(LLAMA2_TOKENIZER), "--workers", "1"]
    reference = tmp_path / "ref" / "all"
    subprocess.run(_tool(*common, "--output-prefix", str(reference)), check=True, capture_output=True)

    out = tmp_path / "run" / "all"
    shards = Path(f"{out}.shards")
    proc = subprocess.Popen(_tool(*common, "--output-prefix", str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(shards.glob("*.stats.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in shards.glob("*.bin")
            if Path(str(p)[:-4] + ".stats.json").exists()}
    assert 0 < len(done) < len(inputs), f"kill landed after {len(done)} of {len(inputs)} shards"
    assert not Path(f"{out}.idx").exists(), "a killed run left an output that looks complete"

    subprocess.run(_tool(*common, "--output-prefix", str(out)), check=True, capture_output=True)
    for path, mtime in done.items():
        assert path.stat().st_mtime_ns == mtime, f"complete shard {path.name} was redone"
    assert not list(shards.glob(".*tmp*")), "temporary files of the killed shard were left behind"
    for suffix in (".bin", ".idx"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{reference}{suffix}").read_bytes(), \
            f"resumed {suffix} differs from an uninterrupted run"


def test_slurm_array_tasks_merge_to_the_same_output(tmp_path, viwiki_docs):
    _write_inputs(tmp_path, viwiki_docs[:300], files=5)
    common = ["--input", str(tmp_path / "part*"), "--tokenizer-model", str(LLAMA2_TOKENIZER), "--workers", "1"]
    assert main([*common, "--output-prefix", str(tmp_path / "one" / "all")]) == 0
    array = tmp_path / "array" / "all"
    assert main([*common, "--output-prefix", str(array), "--num-shards", "2", "--shard-index", "1"]) == 0
    assert not Path(f"{array}.idx").exists(), "merged before every task finished"
    assert main([*common, "--output-prefix", str(array), "--num-shards", "2", "--shard-index", "0"]) == 0
    for suffix in (".bin", ".idx"):
        assert Path(f"{array}{suffix}").read_bytes() == (tmp_path / "one" / f"all{suffix}").read_bytes()


def test_bad_lines_are_counted_with_location(tmp_path, capsys):
    require(LLAMA2_TOKENIZER)
    good = json.dumps({"text": "xin chào"})
    lines = [good.encode(), b'{"text": "broken', json.dumps({"title": "no text"}).encode(),
             b'{"text": "bad \xff\xfe utf8"}', json.dumps({"text": ""}).encode(), json.dumps({"text": 5}).encode(), good.encode()]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((good + "\n").encode() * 2000)[:-30])  # truncated
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
            "--tokenizer-model", str(LLAMA2_TOKENIZER), "--output-prefix", str(out)]
    assert main(args) == 0
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    examples = "\n".join(stats["bad_line_examples"])
    for where, what in [("a.jsonl:2", "invalid JSON"), ("a.jsonl:3", "'text' missing"), ("a.jsonl:4", "invalid UTF-8"),
                        ("a.jsonl:6", "not a string"), ("b.jsonl.gz:", "compressed stream ends early")]:
        assert where in examples and what in examples, f"{where} ({what}) not reported:\n{examples}"
    assert stats["bad_lines"] == 5 and stats["empty_documents"] == 1
    assert stats["documents"] > 1000, "the rest of the corpus was not processed"

    code = main(args[:-1] + [str(tmp_path / "strict"), "--strict"])
    assert code == 2 and "a.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_parallel_corpus_masks_prompt_tokens(tmp_path):
    require(LLAMA2_TOKENIZER, PARALLEL / "tatoeba_en_vi.tsv")
    pairs = [l.split("\t")[:2] for l in (PARALLEL / "tatoeba_en_vi.tsv").read_text().splitlines()[:200]]
    (tmp_path / "src.en").write_text("\n".join(p[0] for p in pairs) + "\n")
    (tmp_path / "tgt.vi").write_text("\n".join(p[1] for p in pairs) + "\n")
    out = tmp_path / "mt"
    assert main(["--parallel", str(tmp_path / "src.en"), str(tmp_path / "tgt.vi"), "--tokenizer-model",
                 str(LLAMA2_TOKENIZER), "--output-prefix", str(out), "--append-eod"]) == 0
    tokens, masks = _read(out), _read(f"{out}{MASK_SUFFIX}")
    assert len(tokens) == len(masks) == 2 * len(pairs), "expected both directions of every pair"
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    for k, (t, m) in enumerate(zip(tokens, masks)):
        assert len(t) == len(m)
        n_prompt = int((m == 0).sum())
        assert m[:n_prompt].sum() == 0 and m[n_prompt:].all(), f"doc {k}: mask is not prompt zeros then target ones"
        en, vi = pairs[k // 2]
        target = vi if k % 2 == 0 else en
        assert t[n_prompt:].tolist() == sp.encode(target) + [sp.eos_id()], f"doc {k}: target tokens differ"


def test_blend_weights_follow_groups_and_tokens(tmp_path, viwiki_docs):
    from megatron_adapt.data.blend import load_blend
    from tools.make_blend import main as make_blend_main

    _write_inputs(tmp_path, viwiki_docs[:200], files=3)
    assert main(["--input", str(tmp_path / "part*"), "--tokenizer-model", str(LLAMA2_TOKENIZER),
                 "--output-prefix", str(tmp_path / "vi"), "--no-merge"]) == 0
    (tmp_path / "en.txt").write_text("The quick brown fox.\n" * 300)
    assert main(["--input", str(tmp_path / "en.txt"), "--tokenizer-model", str(LLAMA2_TOKENIZER),
                 "--output-prefix", str(tmp_path / "en")]) == 0
    blend_file = tmp_path / "blend.json"
    assert make_blend_main(["--group", f"vi=100:{tmp_path / 'vi.shards'}", "--group", f"en=40:{tmp_path / 'en'}",
                            "--output", str(blend_file)]) == 0
    entries = load_blend(blend_file)
    vi = [e for e in entries if e.group == "vi"]
    assert len(vi) == 3 and sum(e.weight for e in entries) == pytest.approx(1.0)
    assert sum(e.weight for e in vi) == pytest.approx(100 / 140)
    assert vi[0].weight / vi[1].weight == pytest.approx(vi[0].tokens / vi[1].tokens)


def test_progress_line_for_slurm_logs_renders(caplog):
    """Without a terminal, progress is a log line every 30 s; it must format (no logging error)."""
    from megatron_adapt.data.preprocess import _Progress

    progress = _Progress("shard", 1000, enabled=False)
    progress.last_log -= 31
    progress.position = 250
    with caplog.at_level("INFO", logger="megatron_adapt.data.preprocess"):
        progress.update(docs=7, tokens=5000)
    assert "shard: 25.0% 7 docs" in caplog.text and "tokens/s ETA" in caplog.text


@pytest.mark.parametrize("extra_id", [None, 70000], ids=["uint16", "int32-past-65500"])
def test_byte_level_bpe_tokenizer_directory(tmp_path, viwiki_docs, smollm2_vi, extra_id):
    """An HF tokenizer directory (SmolLM2 + Vietnamese) as --tokenizer-model; with a special token at
    id 70000 the ids no longer fit uint16 and are stored as int32, as megatron-core does."""
    from tokenizers import Tokenizer

    tok_dir = smollm2_vi
    if extra_id is not None:
        tok_dir = tmp_path / "tok"
        tok_dir.mkdir()
        spec = json.loads((smollm2_vi / "tokenizer.json").read_text())
        spec["added_tokens"].append({"id": extra_id, "content": "<|reserved|>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
        (tok_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        (tok_dir / "tokenizer_config.json").write_bytes((smollm2_vi / "tokenizer_config.json").read_bytes())
    docs = viwiki_docs[:200] + ["", "Hello <|reserved|> world"]
    path = tmp_path / "vi.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    out = tmp_path / "out" / "vi"
    assert main(["--input", str(path), "--tokenizer-model", str(tok_dir), "--output-prefix", str(out),
                 "--append-eod", "--normalize", "vi"]) == 0

    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id(json.loads((tok_dir / "tokenizer_config.json").read_text())["eos_token"])
    expected = [e.ids + [eos] for e in tokenizer.encode_batch([normalize_vi(d) for d in docs], add_special_tokens=False)
                if e.ids]
    got = _read(out)
    assert len(got) == len(expected) == len(docs) - 1
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.tolist() == e, f"document {i}: ids differ from the tokenizers library's encode"
    assert max(max(e) for e in expected) >= 49152, "the extended tokenizer's new ids should appear"
    want = np.int32 if extra_id is not None else np.uint16
    assert IndexedDataset(str(out)).index.dtype == want
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert stats["vocab_size"] == (extra_id + 1 if extra_id is not None else tokenizer.get_vocab_size())
