"""tools/evaluate.py: bits per byte equal independent computations, count bytes from the text
whatever the tokenizer, and refuse bad input by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_adapt.evaluation.bits_per_byte import score_texts
from megatron_adapt.tokenizer.hf_files import write_hf_files
from megatron_adapt.tokenizer.sentencepiece_model import load_model_proto
from tools.evaluate import main

TEXTS = ["Hà Nội là thủ đô của Việt Nam.", "The quick brown fox jumps over the lazy dog.",
         "Truyện Kiều là một tác phẩm nổi tiếng của Nguyễn Du, viết bằng chữ Nôm."]


@pytest.fixture(scope="module")
def tokenizers(recipe, tmp_path_factory):
    """(base, extended) HF tokenizers of the recipe: LLaMA-like base and its Vietnamese extension."""
    from transformers import AutoTokenizer

    base_dir = tmp_path_factory.mktemp("base_tok")
    write_hf_files(load_model_proto(recipe / "base_tokenizer" / "tokenizer.model"), base_dir)
    return AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(recipe / "tokenizer")


def _model(vocab: int, seed: int = 0, uniform: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()  # every logit 0: p = 1/V for each token
    return model


def test_equals_the_models_own_loss(tokenizers):
    base, _ = tokenizers
    model = _model(len(base))
    score = score_texts(model, base, TEXTS, context=256)
    expected_nll, expected_tokens = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([[base.bos_token_id, *base(text, add_special_tokens=False)["input_ids"]]])
            expected_nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)  # mean over targets
            expected_tokens += ids.shape[1] - 1
    assert score.tokens == expected_tokens
    assert score.nll == pytest.approx(expected_nll, rel=1e-5)
    assert score.bytes == sum(len(t.encode()) for t in TEXTS)
    assert score.bits_per_byte == pytest.approx(expected_nll / math.log(2) / score.bytes, rel=1e-5)


def test_sliding_window_gives_each_token_the_promised_context(tokenizers):
    """A document of ~90 tokens in windows of 16 (stride 8): each token's loss equals a plain
    forward over exactly the left context the window rule gives it."""
    base, _ = tokenizers
    model = _model(len(base), seed=1)
    text = " ".join(TEXTS * 2)
    context, stride = 16, 8
    ids = [base.bos_token_id, *base(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) > 4 * context
    expected = 0.0
    with torch.no_grad():
        for j in range(1, len(ids)):
            start = 0
            while start + context <= j:  # the first window whose end passes j scores it
                start += stride
            logits = model(torch.tensor([ids[start:j]])).logits[0, -1]
            expected -= torch.log_softmax(logits, -1)[ids[j]].item()
    score = score_texts(model, base, [text], context=context, stride=stride)
    assert score.nll == pytest.approx(expected, rel=1e-5)
    whole = score_texts(model, base, [text], context=512)
    assert abs(whole.nll - score.nll) > 1e-2, "a 16-token window should see less context than the whole text"


def test_bytes_not_tokens_are_counted(tokenizers):
    """A uniform model over V tokens costs log2(V) bits per token: through the base and the extended
    tokenizer the same bytes are counted, and bits/byte differ exactly by tokens × log2(V)."""
    base, extended = tokenizers
    for tokenizer in (base, extended):
        score = score_texts(_model(len(tokenizer), uniform=True), tokenizer, TEXTS, context=256)
        assert score.bytes == sum(len(t.encode()) for t in TEXTS)
        expected = score.tokens * math.log2(len(tokenizer)) / score.bytes
        assert score.bits_per_byte == pytest.approx(expected, rel=1e-5)
    vi = TEXTS[0]
    n_base = len(base(vi, add_special_tokens=False)["input_ids"])
    n_ext = len(extended(vi, add_special_tokens=False)["input_ids"])
    assert n_ext < n_base, "the extended tokenizer should cut Vietnamese into fewer tokens"


def _save(model, tokenizer, directory):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_tool_table_json_and_bad_input(tokenizers, tmp_path, capsys):
    base, extended = tokenizers
    a = _save(_model(len(base)), base, tmp_path / "base")
    b = _save(_model(len(extended)), extended, tmp_path / "extended")
    vi = tmp_path / "vi.jsonl"
    vi.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    en = tmp_path / "en.txt"
    en.write_text("The quick brown fox.\n\nA second line of English.\n")
    out = tmp_path / "eval.json"
    assert main(["--model", a, "--model", b, "--data", f"vi={vi}", "--data", f"en={en}", "--context", "64",
                 "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "vi bits/byte" in table and "en tokens/word" in table and "extended" in table
    results = json.loads(out.read_text())["models"]
    direct = score_texts(_model(len(base)), base, TEXTS, context=64)
    assert results[a]["vi"]["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-6)
    assert results[a]["en"]["documents"] == 2 and results[a]["vi"]["bytes"] == results[b]["vi"]["bytes"]

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for argv, needle in ((["--model", str(tmp_path / "nope"), "--data", f"vi={vi}"], "nope: no such model directory"),
                         (["--model", a, "--data", f"vi={empty}"], "empty.txt: no text to score"),
                         (["--model", a, "--data", f"vi={tmp_path / 'missing.txt'}"], "missing.txt: no such data file")):
        assert main([*argv, "--output", str(tmp_path / "bad.json")]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_tool_runs_where_and_how_it_is_told(tokenizers, tmp_path, capsys):
    """--dtype bf16 scores in bf16 (close to fp32, not equal to it) and says so in the JSON; a
    device that is not there is refused before any model is loaded."""
    base, _ = tokenizers
    model = _save(_model(len(base)), base, tmp_path / "base")
    vi = tmp_path / "vi.txt"
    vi.write_text("\n".join(TEXTS) + "\n")
    figures = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["--model", model, "--data", f"vi={vi}", "--context", "64", "--device", "cpu", "--dtype", dtype,
                     "--output", str(out)]) == 0
        written = json.loads(out.read_text())
        assert (written["device"], written["dtype"]) == ("cpu", dtype)
        figures[dtype] = written["models"][model]["vi"]["bits_per_byte"]
    assert figures["bf16"] != figures["fp32"], "--dtype bf16 did not reach the model"
    assert figures["bf16"] == pytest.approx(figures["fp32"], rel=2e-2), f"bf16 scoring is off: {figures}"
    if not torch.cuda.is_available():
        assert main(["--model", model, "--data", f"vi={vi}", "--device", "cuda", "--output", str(tmp_path / "x.json")]) == 2
        assert "--device cuda: no CUDA device on this machine" in capsys.readouterr().err


def test_lm_eval_runs_the_shipped_tasks_offline(tokenizers, tmp_path, monkeypatch):
    """lm-evaluation-harness on a tiny exported model with the shipped local tasks gives the bits per
    byte tools/evaluate.py gives on the same paragraphs (each fits one window of both).
    ``add_bos_token=False``: else lm_eval encodes the text with the BOS this LLaMA-style tokenizer
    adds, after its own BOS prefix, and scores that extra BOS as part of the text."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tests.conftest import ROOT

    _, extended = tokenizers
    model_dir = _save(_model(len(extended), seed=2), extended, tmp_path / "tiny")
    monkeypatch.chdir(ROOT)  # the tasks' data paths are relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    limit = 4
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32,max_length=2048,add_bos_token=False", tasks=["heldout_bpb_vi", "heldout_bpb_en"],
        task_manager=TaskManager(include_path=str(ROOT / "configs" / "lm_eval")), limit=limit, device="cpu")["results"]
    model, tokenizer = _model(len(extended), seed=2), extended
    for lang in ("vi", "en"):
        texts = [json.loads(line)["text"] for line in (ROOT / "configs" / "lm_eval" / f"heldout_{lang}.jsonl")
                 .read_text().splitlines()[:limit]]
        ours = score_texts(model, tokenizer, texts, context=2048)
        theirs = results[f"heldout_bpb_{lang}"]["bits_per_byte,none"]
        assert theirs == pytest.approx(ours.bits_per_byte, rel=1e-4), f"{lang}: lm_eval {theirs} vs ours {ours.bits_per_byte}"
