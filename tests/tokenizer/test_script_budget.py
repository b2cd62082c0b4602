"""The added pieces go to the language's own scripts, and whole characters (issue: tokenizer budget).

Checked with plain ``unicodedata`` names (not the extension's own script table): no added piece
glues part of a UTF-8 character to other text, at most 1% of added pieces hold letters outside
the language's scripts, and restricting the scripts costs no fertility on the language's text.
A size sweep learns once and writes one tokenizer per size, its table and its plot.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from tokenizers import Tokenizer

from megatron_adapt.text.normalize import normalize_vi
from megatron_adapt.tokenizer.byte_level_bpe import merge_pairs, piece_bytes
from megatron_adapt.tokenizer.extend import split_lines
from megatron_adapt.tokenizer.load import load_tokenizer
from tests.shared_data import CHINESE, GUTENBERG, LLAMA2_TOKENIZER, TIBETAN, VIWIKI, require
from tools.extend_tokenizer import main


def foreign_letters(text: str, script: str) -> list[str]:
    """Letters (and Tibetan signs) of ``text`` whose Unicode name does not start with ``script``."""
    out = []
    for ch in text:
        name = unicodedata.name(ch, "")
        if (unicodedata.category(ch).startswith("L") or name.startswith("TIBETAN")) and not name.startswith(script):
            out.append(ch)
    return out


def test_byte_level_pieces_are_whole_characters_of_latin(smollm2_tokenizer, smollm2_vi):
    """SmolLM2 + Vietnamese (16000 pieces): a piece ends inside a character only as the first bytes
    of one (after at most a space) that a later piece completes; ≤ 1% hold non-Latin letters."""
    base = load_tokenizer(smollm2_tokenizer).vocab_size
    spec = json.loads((smollm2_vi / "tokenizer.json").read_text())
    added = merge_pairs(spec)[len(merge_pairs(json.loads((smollm2_tokenizer / "tokenizer.json").read_text()))):]
    assert len(added) == load_tokenizer(smollm2_vi).vocab_size - base
    components = {part for pair in added for part in pair}
    partial, glued, foreign = [], [], []
    for a, b in added:
        data = piece_bytes(a + b)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            body = data.removeprefix(b" ")
            lone = 0xC0 <= body[0] < 0xF8 and all(0x80 <= x < 0xC0 for x in body[1:])
            (partial if lone and a + b in components else glued).append(data)
            continue
        if foreign_letters(text, "LATIN"):
            foreign.append(text)
    assert not glued, f"added tokens that split a character otherwise than as a stepping stone: {glued[:10]}"
    assert len(partial) <= 0.002 * len(added), f"{len(partial)} stepping stones: {partial[:10]}"
    assert len(foreign) <= 0.01 * len(added), f"{len(foreign)} of {len(added)} pieces hold non-Latin letters: {foreign[:20]}"
    report = json.loads((smollm2_vi / "report.json").read_text())
    assert sum(report["added_scripts"].values()) == report["added"], report["added_scripts"]
    assert report["added_scripts"]["LATIN"] >= 0.98 * report["added"], report["added_scripts"]


@pytest.mark.parametrize("lang, corpus, script", [("vi", VIWIKI, "LATIN"), ("zh", CHINESE, "CJK"),
                                                  ("bo", TIBETAN, "TIBETAN")])
def test_sentencepiece_pieces_stay_in_the_language_scripts(tmp_path, lang, corpus, script):
    """LLaMA-2's model + each language (3000 pieces): ≤ 1% of added pieces (its coverage
    characters included) hold letters outside the language's script."""
    require(LLAMA2_TOKENIZER, corpus)
    out = tmp_path / lang
    assert main(["--base-model", str(LLAMA2_TOKENIZER), "--corpus", str(corpus), "--num-new-tokens", "3000",
                 "--lang", lang, "--output-dir", str(out)]) == 0
    pieces = load_tokenizer(out).tokens(32000)
    foreign = [p for p in pieces if foreign_letters(p.replace("\u2581", ""), script)]
    assert len(pieces) > 2000 and len(foreign) <= 0.01 * len(pieces), \
        f"{lang}: {len(foreign)} of {len(pieces)} pieces hold letters outside {script}: {foreign[:20]}"


def _tokens_per_word(tokenizer_dir, lines: list[str]) -> float:
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tokenizer.encode_batch(lines, add_special_tokens=False)
    return sum(len(e.ids) for e in ids) / sum(len(line.split()) for line in lines)


def test_sweep_and_restricted_scripts_cost_no_vietnamese_fertility(smollm2_tokenizer, tmp_path):
    """One run with --num-new-tokens 2000,4000 writes a tokenizer per size, the sweep table and
    plot; at 4000 pieces, Vietnamese held-out lines (Latin only) take no more tokens than with
    --scripts any, which spends pieces on the foreign names in Vietnamese Wikipedia."""
    require(VIWIKI, GUTENBERG)
    common = ["--base-model", str(smollm2_tokenizer), "--corpus", str(VIWIKI), "--english", str(GUTENBERG),
              "--lang", "vi"]
    assert main(common + ["--num-new-tokens", "2000,4000", "--output-dir", str(tmp_path / "sweep")]) == 0
    assert main(common + ["--num-new-tokens", "4000", "--scripts", "any", "--output-dir", str(tmp_path / "any")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["sizes"]
    assert set(sweep) == {"2000", "4000"} and (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    for size, report in sweep.items():
        assert load_tokenizer(tmp_path / "sweep" / size).vocab_size == 49152 + report["added"]
        assert report["embedding_rows_added"] == report["added"] and report["added"] <= int(size)
    latin = "vi (LATIN lines)"
    assert sweep["4000"]["fertility"][latin]["extended"] < sweep["2000"]["fertility"][latin]["extended"]

    heldout = [normalize_vi(line) for line in split_lines([VIWIKI], "text", 10, progress=False).heldout[:5000]]
    latin_lines = [line for line in heldout if not foreign_letters(line, "LATIN")]
    assert 0.9 * len(heldout) < len(latin_lines) < len(heldout), "expected a few held-out lines with foreign names"
    restricted, unrestricted = (_tokens_per_word(tmp_path / d, latin_lines) for d in ("sweep/4000", "any"))
    assert restricted <= unrestricted, f"Latin-only lines: {restricted:.4f} tokens/word, {unrestricted:.4f} with any script"
    any_report = json.loads((tmp_path / "any" / "report.json").read_text())
    foreign = sum(n for script, n in any_report["added_scripts"].items() if script not in ("LATIN", "NONE"))
    assert any_report["scripts"] == "any" and foreign >= 20, \
        f"without a script restriction viwiki's foreign names should take pieces (else this comparison shows " \
        f"nothing): {any_report['added_scripts']}"
