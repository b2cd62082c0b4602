"""The README.md (model card) an export writes beside its weights.

Hugging Face reads the YAML front matter: the license is the base model's (its own card's
``license``, else "other" with a note to check it), the languages are the tokenizer's new one and
English, ``base_model`` and ``datasets`` are what the runs used. The body is what a reader needs
to judge the model: each training stage with the tokens it saw (following each run's
``model.init_from`` back to the HF start), the tokenizer's fertility table from its report.json,
and, when ``evaluation`` is given (``tools/evaluate.py``'s JSON), its figures as a table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from megatron_adapt.checkpoint.format import CheckpointMeta, latest, resolve_checkpoint

_FIGURES = ("bits_per_byte", "acc", "acc_norm", "mc1", "mc2")


def _stages(checkpoint: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(stages from the first to the exported one, the HF directory the first started from)."""
    stages: list[dict[str, Any]] = []
    current: Path | None = checkpoint
    base = None
    while current is not None and len(stages) < 20:
        meta = CheckpointMeta.read(current)
        if meta.converted_from is not None:  # a converted start: no training, its HF source is the base
            base = meta.converted_from.get("hf_dir")
            break
        config = meta.run_config
        seq = config.get("data", {}).get("seq_length")
        stages.append({"run": current.parent.name, "steps": meta.iteration,
                       "tokens": meta.consumed_samples * seq if seq else None,
                       "trained": (config.get("train", {}).get("freeze") or {}).get("train", "all")
                       if not meta.adapters_only else "LoRA adapters and vocabulary rows",
                       "blend": config.get("data", {}).get("blend"), "lr": config.get("optim", {}).get("lr")})
        init_from = config.get("model", {}).get("init_from")
        base = config.get("model", {}).get("hf_dir") or base
        current = latest(init_from) if init_from else None
    return stages[::-1], base


def _datasets(stages: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for stage in stages:
        blend = stage["blend"]
        if blend and Path(blend).is_file():
            for entry in json.loads(Path(blend).read_text()).get("datasets", []):
                name = Path(entry["prefix"]).name
                if name not in names:
                    names.append(name)
    return names


def _base_license(base: str | None) -> str | None:
    card = Path(base) / "README.md" if base else None
    if not card or not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    return front.get("license") if isinstance(front, dict) else None


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "–" if value is None else str(value)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def model_card(checkpoint: str | Path, tokenizer_dir: str | Path, evaluation: dict | None = None) -> str:
    """The card's Markdown for exporting ``checkpoint`` with the tokenizer in ``tokenizer_dir``."""
    stages, base = _stages(resolve_checkpoint(checkpoint))
    report_file = Path(tokenizer_dir) / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    lang = (report.get("config") or {}).get("lang")
    license_ = _base_license(base)
    front: dict[str, Any] = {"license": license_ or "other",
                             "language": [x for x in (lang, "en") if x],
                             "library_name": "transformers", "pipeline_tag": "text-generation",
                             "tags": ["megatron-adapt", "vocabulary-extension"]}
    if base:
        front["base_model"] = Path(base).name
    datasets = _datasets(stages)
    if datasets:
        front["datasets"] = datasets
    lines = ["---", yaml.safe_dump(front, allow_unicode=True, sort_keys=False).strip(), "---", "",
             f"# {Path(tokenizer_dir).name if lang is None else lang + ' adaptation'} of {front.get('base_model', 'a base model')}",
             "", "Adapted with megatron-adapt: the base tokenizer extended with new-language pieces (every original "
             "id kept), the embedding and output rows grown, then continued pretraining in the stages below.", ""]
    if license_ is None:
        lines += ["License: the base model's own applies; it was not recorded in its directory, so check it "
                  "before publishing.", ""]
    lines += ["## Training", ""] + _table(
        ["stage (run)", "steps", "tokens seen", "trained", "peak LR"],
        [[s["run"], s["steps"], f"{s['tokens']:,}" if s["tokens"] else None, s["trained"], s["lr"]] for s in stages])
    if report:
        lines += ["", "## Tokenizer", "",
                  f"{report.get('base_vocab_size')} base ids + {report.get('added')} added pieces = "
                  f"{report.get('vocab_size')}; {report.get('english_identical_fraction', 0) or 0:.2%} of held-out "
                  "English lines tokenize exactly as before.", ""]
        lines += _table(["held-out text", "tokens/word, base", "tokens/word, extended"],
                        [[text, f["base"], f["extended"]] for text, f in report.get("fertility", {}).items()])
    if evaluation:
        models = evaluation.get("models", {})
        names = list(models)
        rows = []
        for what in next(iter(models.values()), {}):
            for figure in _FIGURES:
                if figure in models[names[0]][what]:
                    rows.append([f"{what} {figure}"] + [models[m][what].get(figure) for m in names])
        lines += ["", "## Evaluation", "", "`tools/evaluate.py` (bits per byte: lower is better).", ""]
        lines += _table(["", *(Path(m).name for m in names)], rows)
    return "\n".join(lines) + "\n"
