"""The held-out paragraph split agrees with the tokenizer extension's line split, and
tools/heldout_sample.py writes only held-out paragraphs."""

from __future__ import annotations

import json

from megatron_adapt.text.corpus import iter_documents
from megatron_adapt.text.heldout import is_heldout, paragraphs, split_paragraphs
from megatron_adapt.tokenizer.extend import split_lines
from tests.conftest import SAMPLE
from tools.heldout_sample import main


def test_paragraphs_join_wrapped_lines_and_keep_first_line_index():
    text = "A\nb c\n\nD\n\n\n E \nf\n"
    assert list(paragraphs(text)) == [(0, "A b c"), (3, "D"), (6, "E f")]
    assert text.split("\n")[3] == "D" and text.split("\n")[6].strip() == "E"


def test_first_line_of_every_held_out_paragraph_is_held_out_by_the_tokenizer_split():
    corpus = SAMPLE / "vi_wiki.jsonl.xz"
    held_lines = set(split_lines([corpus], "text", 100, progress=False).heldout)
    first_lines, count = set(), 0
    for lineno, text in iter_documents(corpus):
        lines = text.split("\n")
        for index, _ in paragraphs(text):
            if is_heldout(f"{corpus.name}:{lineno}:{index}", 100):
                first_lines.add(lines[index])
                count += 1
    assert count > 50 and first_lines <= held_lines
    assert len(split_paragraphs([corpus], per_mille=100).heldout) == count


def test_tool_writes_held_out_paragraphs(tmp_path, capsys):
    out = tmp_path / "heldout.jsonl"
    assert main(["--corpus", str(SAMPLE / "en_gutenberg.jsonl.xz"), "--count", "5", "--heldout-per-mille", "100",
                 "--min-chars", "100", "--output", str(out)]) == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    held = set(split_paragraphs([SAMPLE / "en_gutenberg.jsonl.xz"], per_mille=100).heldout)
    assert len(texts) == 5 and all(t in held and len(t) >= 100 for t in texts)
    assert main(["--corpus", str(tmp_path / "none.jsonl"), "--output", str(out)]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
