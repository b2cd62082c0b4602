"""Score Hugging Face causal LMs, models side by side: bits per UTF-8 byte of held-out text per
language (comparable across tokenizers), perplexity and tokens per word; and multiple-choice
benchmarks (arc_vi, mmlu_vi, truthfulqa_vi) by the log-likelihood of each choice, as
lm-evaluation-harness scores them.

    python tools/evaluate.py --model models/smollm2 --model release/smollm2-vi \
        --data vi=heldout/vi.jsonl.xz --data en=heldout/en.txt --max-docs 60 --output eval.json
    python tools/evaluate.py --model release/smollm2-vi --tasks arc_vi,mmlu_vi,truthfulqa_vi \
        --task-data eval/vi --limit 200 --output eval.json

Data: plain text (a document per line) or JSONL (``--text-key``), optionally .gz/.xz/.bz2/.zst.
Documents longer than ``--context`` tokens are scored with a sliding window. Task files are
Okapi's JSONL (``megatron_adapt/evaluation/multiple_choice.py``) named as in ``TASKS``. The table
is printed; every figure goes to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from megatron_adapt.evaluation.bits_per_byte import score_texts
from megatron_adapt.evaluation.hf_model import DTYPES, device_and_dtype, load_causal_lm
from megatron_adapt.evaluation.multiple_choice import TASKS, evaluate_task, load_task
from megatron_adapt.log_setup import setup_logging
from megatron_adapt.text.corpus import iter_documents


def _data_arg(value: str) -> tuple[str, Path]:
    lang, sep, path = value.partition("=")
    if not sep or not lang or not path:
        raise argparse.ArgumentTypeError(f"--data {value!r}: expected LANG=FILE")
    return lang, Path(path)


def read_texts(path: Path, text_key: str, max_docs: int | None) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    texts = []
    for _, text in iter_documents(path, text_key):
        if text.strip():
            texts.append(text)
            if max_docs and len(texts) == max_docs:
                break
    if not texts:
        raise ValueError(f"{path}: no text to score")
    return texts


_ROWS = {"bits_per_byte": ("bits/byte", ".4f"), "perplexity": ("perplexity", ".2f"),
         "tokens_per_word": ("tokens/word", ".3f"), "acc": ("acc", ".4f"), "acc_norm": ("acc_norm", ".4f"),
         "mc1": ("mc1", ".4f"), "mc2": ("mc2", ".4f")}


def format_table(results: dict[str, dict[str, dict]]) -> list[str]:
    models = list(results)
    width = max(14, *(len(Path(m).name) + 2 for m in models))
    lines = [f"{'':28}" + "".join(f"{Path(m).name:>{width}}" for m in models)]
    for name, figures in next(iter(results.values())).items():
        for key, (label, fmt) in _ROWS.items():
            if key in figures:
                lines.append(f"{name + ' ' + label:28}"
                             + "".join(f"{results[m][name][key]:>{width}{fmt}}" for m in models))
    return lines


def _tasks_arg(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="HF model directory (repeat to compare)")
    parser.add_argument("--data", action="append", default=[], type=_data_arg, help="LANG=FILE (repeatable)")
    parser.add_argument("--tasks", type=_tasks_arg, default=[], help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--task-data", help="directory of the task files (Okapi JSONL)")
    parser.add_argument("--limit", type=int, help="score the first N items of each task")
    parser.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each item (mmlu_vi)")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--max-docs", type=int, help="score the first N non-empty documents per language")
    parser.add_argument("--context", type=int, default=2048, help="window length in tokens")
    parser.add_argument("--stride", type=int, help="window step (default: half the context)")
    parser.add_argument("--device", help="where to run the models (default: cuda if there is a GPU, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--output", default="evaluation.json", help="JSON file for every figure")
    args = parser.parse_args(argv)
    if not args.data and not args.tasks:
        parser.error("give --data LANG=FILE, --tasks, or both")
    if args.tasks and not args.task_data:
        parser.error("--tasks needs --task-data DIR (the task files, e.g. arc_vi_test.jsonl)")
    setup_logging(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty()
    try:
        device, dtype = device_and_dtype(args.device, args.dtype)
        for path in args.model:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"--model {path}: no such model directory")
        data = {lang: read_texts(path, args.text_key, args.max_docs) for lang, path in args.data}
        tasks = {name: load_task(name, args.task_data, args.num_fewshot, args.limit) for name in args.tasks}
        results: dict[str, dict[str, dict]] = {}
        for path in args.model:
            model, tokenizer = load_causal_lm(path, str(device), dtype)
            context = min(args.context, getattr(model.config, "max_position_embeddings", args.context))
            name = Path(path).name
            results[path] = {lang: score_texts(model, tokenizer, texts, context, args.stride, progress,
                                               desc=f"{name} {lang}").as_dict()
                             for lang, texts in data.items()}
            for task, (spec, items, pool) in tasks.items():
                results[path][task] = evaluate_task(model, tokenizer, items, spec.mc2, pool, args.num_fewshot,
                                                    context, progress, desc=f"{name} {task}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(format_table(results)))
    Path(args.output).write_text(json.dumps({"models": results, "data": {lang: str(p) for lang, p in args.data},
                                             "tasks": {t: str(Path(args.task_data) / TASKS[t].file) for t in args.tasks},
                                             "limit": args.limit, "num_fewshot": args.num_fewshot,
                                             "context": args.context, "stride": args.stride,
                                             "device": str(device), "dtype": dtype}, indent=2))
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
