"""Conversations for SFT: rendered by a chat template, loss only on the assistant turns, and the
ids of each preprocessed conversation are exactly what ``apply_chat_template`` gives on the
exported tokenizer (LLaMA-2's SentencePiece tokenizer with vbd and llama2; SmolLM2's byte-level
BPE tokenizer with its own chatml template)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_adapt.checkpoint.convert import export_tokenizer
from megatron_adapt.data.chat import conversation
from megatron_adapt.data.indexed import MASK_SUFFIX
from megatron_adapt.data.preprocess import PreprocessConfig
from tests.shared_data import LLAMA2_TOKENIZER, require
from tools.preprocess_data import main as preprocess

GOOD = [
    {"messages": [{"role": "system", "content": "Bạn là trợ lý."}, {"role": "user", "content": "Xin chào"},
                  {"role": "assistant", "content": "Chào bạn!"}, {"role": "user", "content": "Hà Nội ở đâu?"},
                  {"role": "assistant", "content": "Ở miền Bắc Việt Nam."}]},
    {"conversations": [{"from": "human", "value": "Dịch: cat"}, {"from": "gpt", "value": "con mèo"}]},
    {"instruction": "Dịch sang tiếng Việt", "input": "dog", "output": "con chó"},
]
BAD = [  # (record, what the report must say)
    ({"messages": [{"role": "user", "content": "chỉ hỏi"}]}, "no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'wizard'"),
    ({"text": "not a conversation"}, "expected 'messages'"),
]
# What each template appends to the text an assistant turn says (its end of turn).
TURN_END = {"vbd": "</s>", "llama2": " </s>", "tokenizer": "<|im_end|>\n"}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _read(prefix) -> list[np.ndarray]:
    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]


def _check(tmp_path: Path, tok_dir: Path, template: str, export_template: str | None) -> None:
    records = GOOD + [r for r, _ in BAD]
    data = _write_jsonl(tmp_path / "chat.jsonl", records)
    assert preprocess(["--instructions", str(data), "--chat-template", template, "--tokenizer-model", str(tok_dir),
                       "--output-prefix", str(tmp_path / "chat")]) == 0
    tokens, masks = _read(tmp_path / "chat"), _read(f"{tmp_path / 'chat'}{MASK_SUFFIX}")
    assert len(tokens) == len(GOOD), f"expected {len(GOOD)} conversations, got {len(tokens)}"

    export = tmp_path / "export"
    export.mkdir()
    export_tokenizer(tok_dir, export, export_template)
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(export)
    for k, record in enumerate(GOOD):
        messages = conversation(record)
        expected = exported.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert tokens[k].tolist() == expected, f"{template}: conversation {k}: training ids != apply_chat_template"
        # The targets: one run of tokens per assistant turn, reading as its text and end of turn.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], masks[k], [0]])))
        runs = [tokens[k][a:b] for a, b in zip(edges[::2], edges[1::2])]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert len(runs) == len(answers), f"{template}: conversation {k}: {len(runs)} target runs for {len(answers)} answers"
        for run, answer in zip(runs, answers):
            text = exported.decode(run.tolist(), skip_special_tokens=False)
            assert text.strip() == (answer + TURN_END[template]).strip(), f"{template}: target reads {text!r}"

    stats = json.loads(Path(f"{tmp_path / 'chat'}.stats.json").read_text())
    assert stats["bad_lines"] == len(BAD), stats["bad_line_examples"]
    for n, (_, reason) in enumerate(BAD, start=len(GOOD) + 1):
        assert any(e.startswith(f"{data}:{n}: ") and reason in e for e in stats["bad_line_examples"]), \
            f"line {n} ({reason}) not reported: {stats['bad_line_examples']}"


@pytest.mark.parametrize("template", ["vbd", "llama2"])
def test_llama2_tokenizer_templates(tmp_path, template):
    require(LLAMA2_TOKENIZER)
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    shutil.copy(LLAMA2_TOKENIZER, tok_dir / "tokenizer.model")
    _check(tmp_path, tok_dir, template, template)


def test_tokenizer_own_template_byte_level_bpe(tmp_path, smollm2_tokenizer):
    _check(tmp_path, smollm2_tokenizer, "tokenizer", None)


def test_llama2_template_refuses_turns_that_do_not_alternate(tmp_path):
    require(LLAMA2_TOKENIZER)
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}
    data = _write_jsonl(tmp_path / "chat.jsonl", [GOOD[1], record])
    assert preprocess(["--instructions", str(data), "--chat-template", "llama2", "--tokenizer-model",
                       str(LLAMA2_TOKENIZER), "--output-prefix", str(tmp_path / "chat")]) == 0
    stats = json.loads(Path(f"{tmp_path / 'chat'}.stats.json").read_text())
    assert stats["documents"] == 1 and stats["bad_lines"] == 1
    assert stats["bad_line_examples"][0].startswith(f"{data}:2: ") and "alternate" in stats["bad_line_examples"][0]


def test_unknown_or_missing_template_is_refused(tmp_path, capsys):
    require(LLAMA2_TOKENIZER)
    data = _write_jsonl(tmp_path / "chat.jsonl", GOOD)
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        PreprocessConfig(inputs=[str(data)], tokenizer_model=str(LLAMA2_TOKENIZER), output_prefix=str(tmp_path / "x"),
                         kind="instructions", chat_template="chatml")
    assert preprocess(["--instructions", str(data), "--chat-template", "tokenizer", "--tokenizer-model",
                       str(LLAMA2_TOKENIZER), "--output-prefix", str(tmp_path / "chat")]) == 2
    assert "has no chat_template" in capsys.readouterr().err
    assert not Path(f"{tmp_path / 'chat'}.bin").exists()
