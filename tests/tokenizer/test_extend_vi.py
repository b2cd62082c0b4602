"""LLaMA-2 + Vietnamese Wikipedia through tools/extend_tokenizer.py, checked against
SentencePiece itself and transformers on lines the training never saw."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from megatron_adapt.text.normalize import normalize_vi
from megatron_adapt.tokenizer.extend import split_lines
from megatron_adapt.tokenizer.sentencepiece_model import load_model_proto, processor
from tests.shared_data import GUTENBERG, LLAMA2_TOKENIZER, PARALLEL, VIWIKI, require
from tools.extend_tokenizer import main

NUM_NEW = 16000


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    require(LLAMA2_TOKENIZER, VIWIKI, GUTENBERG)
    out = tmp_path_factory.mktemp("tok") / "vi"
    code = main(["--base-model", str(LLAMA2_TOKENIZER), "--corpus", str(VIWIKI), "--english", str(GUTENBERG),
                 "--num-new-tokens", str(NUM_NEW), "--lang", "vi", "--output-dir", str(out)])
    assert code == 0, "extend_tokenizer failed"
    return out


@pytest.fixture(scope="module")
def heldout_vi():
    return [normalize_vi(l) for l in split_lines([VIWIKI], "text", 10, progress=False).heldout]


def test_base_pieces_unchanged(extended):
    base, merged = load_model_proto(LLAMA2_TOKENIZER), load_model_proto(extended / "tokenizer.model")
    assert len(merged.pieces) == len(base.pieces) + json.loads((extended / "report.json").read_text())["added"]
    for i, (b, m) in enumerate(zip(base.pieces, merged.pieces)):
        assert (b.piece, b.type, b.score) == (m.piece, m.type, m.score), f"base id {i} changed"
    assert merged.normalizer_spec == base.normalizer_spec and merged.trainer_spec.byte_fallback


def test_every_added_piece_is_reachable(extended):
    model = load_model_proto(extended / "tokenizer.model")
    sp = processor(model, add_dummy_prefix=False)
    added = range(32000, len(model.pieces))
    texts = [model.pieces[i].piece.replace("\u2581", " ") for i in added]
    unreachable = [model.pieces[i].piece for i, ids in zip(added, sp.encode(texts)) if ids != [i]]
    assert not unreachable, f"{len(unreachable)} added pieces unreachable, e.g. {unreachable[:5]}"
    assert json.loads((extended / "report.json").read_text())["unreachable_added"] == 0


def test_vietnamese_fertility(extended, heldout_vi):
    assert len(heldout_vi) > 1000
    words = sum(len(l.split()) for l in heldout_vi)
    base = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    ext = spm.SentencePieceProcessor(model_file=str(extended / "tokenizer.model"))
    base_f = sum(map(len, base.encode(heldout_vi))) / words
    ext_f = sum(map(len, ext.encode(heldout_vi))) / words
    assert base_f > 2.5, f"LLaMA-2 fertility {base_f:.3f} is implausibly low: is this Vietnamese?"
    assert ext_f <= 1.35, f"extended fertility {ext_f:.3f} tokens/word with {NUM_NEW} pieces"


def _english_lines() -> list[str]:
    iwslt = [l.strip() for name in ("iwslt15_tst2012.en", "iwslt15_tst2013.en")
             for l in (PARALLEL / name).read_text(encoding="utf-8-sig").splitlines() if l.strip()]
    tatoeba = [l.split("\t")[0] for l in (PARALLEL / "tatoeba_en_vi.tsv").read_text().splitlines() if "\t" in l]
    return iwslt + tatoeba


def test_english_ids_unchanged(extended):
    """English from corpora the tool never read (TED talks, Tatoeba) keeps LLaMA-2's ids."""
    report = json.loads((extended / "report.json").read_text())
    assert report["english_identical_fraction"] >= 0.999, report["english_identical_fraction"]
    lines = _english_lines()
    base = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    ext = spm.SentencePieceProcessor(model_file=str(extended / "tokenizer.model"))
    changed = [l for l, a, b in zip(lines, base.encode(lines), ext.encode(lines)) if a != b]
    assert len(changed) <= 0.001 * len(lines), f"{len(changed)}/{len(lines)} English lines changed: {changed[:3]}"


def test_hf_tokenizer_agrees_with_sentencepiece(extended, heldout_vi):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(extended))
    sp = spm.SentencePieceProcessor(model_file=str(extended / "tokenizer.model"))
    lines = heldout_vi[:1000] + _english_lines()[:1000]
    lines += ["  two leading spaces", "tab\there", "trailing  ", "Hòa bình 2024!"]
    differing = [l for l in lines if hf.encode(l, add_special_tokens=False) != sp.encode(l)]
    assert not differing, f"{len(differing)} lines encode differently, e.g. {differing[:2]}"
    assert hf("xin chào").input_ids[0] == sp.bos_id(), "HF tokenizer does not add BOS like LLaMA"
    assert hf.decode(sp.encode(heldout_vi[0])) == heldout_vi[0]
