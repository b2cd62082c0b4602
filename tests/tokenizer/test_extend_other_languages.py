"""The same tool, unchanged, for languages with other scripts: Tibetan and Chinese."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from megatron_adapt.tokenizer.sentencepiece_model import load_model_proto, processor
from tests.shared_data import CHINESE, GUTENBERG, LLAMA2_TOKENIZER, TIBETAN, UDHR, require
from tools.extend_tokenizer import main


@pytest.mark.parametrize("lang,corpus,udhr", [("bo", TIBETAN, "udhr_bod.txt"), ("zh", CHINESE, "udhr_cmn_hans.txt")])
def test_second_language(tmp_path, lang, corpus, udhr):
    require(LLAMA2_TOKENIZER, corpus, GUTENBERG, UDHR / udhr)
    out = tmp_path / lang
    assert main(["--base-model", str(LLAMA2_TOKENIZER), "--corpus", str(corpus), "--english", str(GUTENBERG),
                 "--num-new-tokens", "3000", "--lang", lang, "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    model = load_model_proto(out / "tokenizer.model")
    assert 0 < report["added"] <= 3000 and len(model.pieces) == 32000 + report["added"]

    sp = processor(model, add_dummy_prefix=False)
    texts = [model.pieces[i].piece.replace("\u2581", " ") for i in range(32000, len(model.pieces))]
    assert all(ids == [i] for i, ids in zip(range(32000, len(model.pieces)), sp.encode(texts))), "unreachable piece"

    # Natural text the tool never saw (the UDHR) gets shorter; English does not move.
    base = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    ext = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    text = (UDHR / udhr).read_text()
    assert len(ext.encode(text)) < 0.8 * len(base.encode(text)), f"{lang}: UDHR barely compressed"
    assert report["english_identical_fraction"] >= 0.999
