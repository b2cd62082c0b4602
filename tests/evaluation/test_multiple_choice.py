"""Multiple-choice scoring (arc_vi, mmlu_vi, truthfulqa_vi) against a plain forward pass and
against lm-evaluation-harness itself, on a tiny random LLaMA with SmolLM2's tokenizer and the
first items of the real Okapi files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_adapt.evaluation.multiple_choice import (
    Item,
    TaskDataError,
    choice_logliks,
    evaluate_task,
    load_task,
    read_items,
)
from tests.shared_data import SHARED, require

EVAL_VI = SHARED / "eval" / "vi"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer, tmp_path_factory):
    """(model, tokenizer, directory): a random 2-layer LLaMA over SmolLM2's 49152 tokens."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024)).eval()
    directory = tmp_path_factory.mktemp("tiny_mc")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer, directory


@pytest.mark.parametrize("context", ["Question: Thủ đô của Việt Nam là gì?\nAnswer:", "Q"],
                         ids=["shared-prompt-cache", "one-token-prompt"])
def test_choice_logliks_equal_a_plain_forward(tiny, context):
    """The prompt's cache shared by the choices (and, for a one-token prompt, whole rows) gives a
    plain forward's log-likelihoods."""
    model, tokenizer, _ = tiny
    choices = ["Hà Nội", "Thành phố Hồ Chí Minh", "Huế"]
    batched = choice_logliks(model, tokenizer, context, choices, max_length=1024)
    for choice, got in zip(choices, batched):
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        assert whole[:len(context_ids)] == context_ids, "this pair should split at the prompt's end"
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        expected = sum(log_probs[j - 1, whole[j]].item() for j in range(len(context_ids), len(whole)))
        assert got == pytest.approx(expected, abs=1e-4), f"log-likelihood of {choice!r}"


def test_gold_at_the_models_argmax_scores_one_and_mc2_reads_the_labels(tiny):
    model, tokenizer, _ = tiny
    query, choices = "Question: Con mèo kêu thế nào?\nAnswer:", ["meo meo", "gâu gâu", "ò ó o", "cạc cạc"]
    scores = choice_logliks(model, tokenizer, query, choices, 1024)
    best, worst = max(range(4), key=scores.__getitem__), min(range(4), key=scores.__getitem__)
    right = evaluate_task(model, tokenizer, [Item("a", query, choices, best)])
    wrong = evaluate_task(model, tokenizer, [Item("b", query, choices, worst)])
    assert (right["acc"], wrong["acc"]) == (1.0, 0.0), (scores, right, wrong)

    labels = [0, 1, 0, 1]  # true answers out of order, as truthfulqa_vi/519 and /654 have them
    item = Item("c", query, choices, best, mc2_choices=choices, mc2_labels=labels)
    probs = [math.exp(s) for s in scores]
    expected = (probs[1] + probs[3]) / sum(probs)
    assert evaluate_task(model, tokenizer, [item], mc2=True)["mc2"] == pytest.approx(expected, rel=1e-6)


def test_ambiguous_items_are_dropped(tiny):
    model, tokenizer, _ = tiny
    items = [Item("tie", "Q:", ["a", "b", "a"], 0), Item("ok", "Q:", ["a", "b", "c"], 1)]
    result = evaluate_task(model, tokenizer, items)
    assert (result["n"], result["dropped"]) == (1, 1)


def test_bad_task_name_and_files_are_refused_by_name(tmp_path):
    with pytest.raises(TaskDataError, match="unknown task 'hellaswag_vi'; known: arc_vi, mmlu_vi, truthfulqa_vi"):
        load_task("hellaswag_vi", tmp_path)
    with pytest.raises(TaskDataError, match=r"arc_vi_test.jsonl: no such task file"):
        load_task("arc_vi", tmp_path)
    (tmp_path / "arc_vi_test.jsonl").write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n'
                                                '{"query": "Q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(TaskDataError, match=r"arc_vi_test.jsonl:2: field 'gold' \(2\) must index the 2"):
        load_task("arc_vi", tmp_path)
    (tmp_path / "arc_vi_test.jsonl").write_text('{"query": "Q", "gold": 0}\n')
    with pytest.raises(TaskDataError, match=r"arc_vi_test.jsonl:1: field 'choices' is missing"):
        load_task("arc_vi", tmp_path)
    (tmp_path / "arc_vi_test.jsonl").write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(TaskDataError, match="arc_vi has no few-shot pool"):
        load_task("arc_vi", tmp_path, num_fewshot=5)


def test_evaluate_tool_scores_tasks_beside_bits_per_byte(tiny, tmp_path):
    """tools/evaluate.py --tasks over the real files (first 5 items each; mmlu_vi 2-shot): one
    JSON, a missing model directory refused as such."""
    require(EVAL_VI)
    _, _, directory = tiny
    heldout = tmp_path / "vi.txt"
    heldout.write_text("Hà Nội là thủ đô của Việt Nam.\n")
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", str(directory), "--data", f"vi={heldout}",
           "--tasks", "arc_vi,mmlu_vi,truthfulqa_vi", "--task-data", str(EVAL_VI), "--limit", "5",
           "--num-fewshot", "0", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())["models"][str(directory)]
    assert set(figures) == {"vi", "arc_vi", "mmlu_vi", "truthfulqa_vi"}
    assert figures["arc_vi"]["n"] == 5 and 0 <= figures["arc_vi"]["acc"] <= 1
    assert {"mc1", "mc2", "n"} <= set(figures["truthfulqa_vi"]) and "truthfulqa_vi mc2" in proc.stdout
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "missing"), "--data", f"vi={heldout}"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and f"--model {tmp_path / 'missing'}: no such model directory" in missing.stderr


def test_mmlu_fewshot_prompt_takes_the_same_subject_first(tmp_path):
    require(EVAL_VI)
    _, items, pool = load_task("mmlu_vi", EVAL_VI, num_fewshot=2, limit=1)
    from megatron_adapt.evaluation.multiple_choice import fewshot_prefix

    prefix = fewshot_prefix(items[0], pool, 2)
    same = [p for p in pool if p.subject == items[0].subject][:2]
    assert prefix == "".join(f"{p.query} {p.choices[p.gold]}\n\n" for p in same)


def test_lm_evaluation_harness_agrees(tiny, tmp_path):
    """lm-eval 0.4's own multiple_choice task (local YAMLs over the first items of arc_vi and
    truthfulqa_vi, its HFLM over the same model) gives the same acc, acc_norm and mc2."""
    require(EVAL_VI)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer, _ = tiny
    arc = [json.loads(line) for line in (EVAL_VI / "arc_vi_test.jsonl").read_text().splitlines()[:8]]
    tqa = [json.loads(line) for line in (EVAL_VI / "truthfulqa_vi_mc.jsonl").read_text().splitlines()[:4]]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arc))
    (tmp_path / "tqa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tqa))
    (tmp_path / "mc2_utils.py").write_text(
        "from lm_eval.tasks.truthfulqa.utils import process_results_mc2 as _mc2\n"
        "def process_results_mc2(doc, results):\n"
        "    return _mc2(dict(doc, mc2_targets={'labels': doc['mc2_labels']}), results)\n")
    common = "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{query}}'\n"
    (tmp_path / "arc_vi_local.yaml").write_text(
        f"task: arc_vi_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'arc.jsonl'}\n"
        + common + "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
        "  - metric: acc_norm\n")
    (tmp_path / "tqa_vi_local.yaml").write_text(
        f"task: tqa_vi_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tqa.jsonl'}\n"
        + common + "doc_to_choice: '{{mc2_choices}}'\ndoc_to_target: 0\n"
        "process_results: !function mc2_utils.process_results_mc2\nmetric_list:\n  - metric: acc\n")
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu"),
                              tasks=["arc_vi_local", "tqa_vi_local"], task_manager=TaskManager(include_path=str(tmp_path)),
                              num_fewshot=0)["results"]
    ours_arc = evaluate_task(model, tokenizer, read_items(tmp_path / "arc.jsonl"))
    ours_tqa = evaluate_task(model, tokenizer, read_items(tmp_path / "tqa.jsonl", mc2=True), mc2=True)
    assert results["arc_vi_local"]["acc,none"] == pytest.approx(ours_arc["acc"]), (results["arc_vi_local"], ours_arc)
    assert results["arc_vi_local"]["acc_norm,none"] == pytest.approx(ours_arc["acc_norm"])
    assert results["tqa_vi_local"]["acc,none"] == pytest.approx(ours_tqa["mc2"], abs=1e-5), (results, ours_tqa)
