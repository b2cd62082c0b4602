"""The README's main-job command runs the whole recipe and leaves a loadable HF model; the README's
cluster recipe is the same commands (megatron_adapt/recipe.py renders it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_quickstart_runs_the_whole_recipe():
    proc = subprocess.run(["bash", "launch/quickstart.sh"], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"quickstart failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    from megatron_adapt.recipe import quickstart_steps

    total = len(quickstart_steps())
    for step in range(1, total + 1):
        assert f"== {step}/{total} " in proc.stdout, f"step {step} did not run:\n{proc.stdout[-3000:]}"
    run = ROOT / "runs" / "quickstart"
    for stage in ("stage1", "stage2", "sft"):
        losses = [json.loads(l)["loss"] for l in (run / stage / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        assert losses[-1] < losses[0], f"{stage}: training loss did not decrease ({losses})"
    assert (run / "stage2" / "done").exists()
    _check_validation_bits_per_byte(run)
    report = json.loads((run / "tokenizer" / "report.json").read_text())
    assert report["unreachable_added"] == 0 and report["added"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "release")
    model = AutoModelForCausalLM.from_pretrained(run / "release")
    assert model.config.vocab_size == len(tokenizer) == 2000 + report["added"]
    assert "> Việt Nam là" in proc.stdout
    evaluation = json.loads((run / "evaluation.json").read_text())["models"]
    assert len(evaluation) == 2, f"evaluate.py did not score the base and the release side by side: {list(evaluation)}"
    _check_chat_export(run)
    assert "> Translate into English: Cảm ơn bạn." in proc.stdout, "generate.py --chat did not answer"


def _check_chat_export(run: Path) -> None:
    """The chat export's apply_chat_template gives the ids SFT trained on (first conversation)."""
    import lzma

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    first = json.loads(lzma.open(ROOT / "data" / "sample" / "chat_vi.jsonl.xz", "rt").readline())
    tokenizer = AutoTokenizer.from_pretrained(run / "release-chat")
    ids = tokenizer.apply_chat_template(first["messages"], tokenize=True, return_dict=True)["input_ids"]
    dataset = IndexedDataset(str(run / "data" / "chat"))
    trained = dataset[0].tolist()  # read while the dataset (its mmap) is alive
    assert ids == trained, "the chat export's template does not reproduce the SFT training ids"


def _check_validation_bits_per_byte(run: Path) -> None:
    """valid_bpb/<group> = valid_loss/<group> / ln 2 / (text bytes per token of the group's data)."""
    import math

    records = [json.loads(line) for line in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if any(k.startswith("valid_loss/") for k in r)]
    assert validation, "stage 1 logged no validation"
    blend = json.loads((run / "data" / "stage1.json").read_text())["datasets"]
    for key, loss in validation[-1].items():
        if not key.startswith("valid_loss/"):
            continue
        group = key.split("/", 1)[1]
        stats = [json.loads(Path(f"{d['prefix']}.stats.json").read_text()) for d in blend if d["group"] == group]
        bytes_per_token = sum(s["text_bytes"] for s in stats) / sum(s["tokens"] for s in stats)
        got = validation[-1].get(f"valid_bpb/{group}")
        assert got is not None and math.isclose(got, loss / math.log(2) / bytes_per_token, rel_tol=1e-9), \
            f"valid_bpb/{group} is {got}, loss {loss}, {bytes_per_token:.3f} bytes/token"

