"""The whole recipe on a real pretrained model on CPU, measured after every step of it.

    python bench/real_model_recipe.py --work runs/real_model      # SmolLM2-135M from ../shared/data

Steps (each is skipped when its output exists, so a rerun continues): the GGUF as an HF model →
extend its tokenizer with Vietnamese → training paragraphs of Vietnamese Wikipedia and English
Gutenberg (the held-out ones, ``configs/lm_eval/heldout_*.jsonl``, left out) preprocessed →
hf-to-megatron with each init method → stage 1 (new rows only) from the subword-mean start →
stage 2 (all weights, vi:en blend) → export; beside stage 2, from the same stage-1 weights and
with the same token budget, two alternatives (issue #16): stage 2 with a decoupled vocabulary LR
(``optim.vocab_lr``) and stage 2 as LoRA (rank 64, alpha 128, all seven modules) with the added
rows training. ``tools/evaluate.py`` scores held-out Vietnamese and English (bits per byte, tokens
per word), the same for text of a domain the recipe does not train on (the Universal Declaration
of Human Rights in both languages, ``../shared/data/udhr``; the Vietnamese one also normalized as
preprocessing would, since the file is not NFC), and arc_vi / mmlu_vi / truthfulqa_vi
(``../shared/data/eval/vi``, the first ``--task-limit`` items of each, zero-shot) for the base
model, each resized start, and each stage's export. Writes WORK/results.json, WORK/results.md (the table) and WORK/curves.png (training loss
and validation bits per byte per group over both stages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from megatron_adapt import recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
INITS = ("subword-mean", "mean", "multivariate-normal")


def run(work: Path, *steps: recipe.Step) -> None:
    """The recipe's own commands (megatron_adapt/recipe.py), with $WORK = work and $BASE_MODEL = the
    base HF model; each step's log in work/logs/."""
    os.environ.update(PYTHONWARNINGS="ignore", WANDB_MODE="disabled")
    try:
        recipe.run(list(steps), ROOT, work, work / "base", log_dir=work / "logs" / steps[0].title.split(":")[0][:40],
                   on_start=lambda _, step: print("+", step.title, flush=True))
    except RuntimeError as err:
        sys.exit(str(err))


def training_paragraphs(corpus: Path, out: Path, max_bytes: int, lang: str | None) -> None:
    """The training side of the held-out split, up to ``max_bytes`` of text, as JSONL."""
    from megatron_adapt.text.heldout import split_paragraphs
    from megatron_adapt.tokenizer.languages import profile

    normalize = profile(lang).normalize or (lambda s: s)
    total, lines = 0, []
    for paragraph in split_paragraphs([corpus]).train:
        if len(paragraph) < 40:
            continue
        lines.append(json.dumps({"text": normalize(paragraph)}, ensure_ascii=False))
        total += len(paragraph.encode())
        if total >= max_bytes:
            break
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


OFF_DOMAIN = {"vi_udhr": SHARED / "udhr" / "udhr_vie.txt", "en_udhr": SHARED / "udhr" / "udhr_eng.txt"}
TASKS = ("arc_vi", "mmlu_vi", "truthfulqa_vi")


def normalized_udhr_vi(work: Path) -> Path:
    """The Vietnamese UDHR as the recipe's preprocessing would see it: the file has 1953 combining
    tone marks (neither NFC nor NFD), which the trained model never saw."""
    from megatron_adapt.text.normalize import normalize_vi

    out = work / "udhr_vie.normalized.txt"
    if not out.exists():
        out.write_text(normalize_vi(OFF_DOMAIN["vi_udhr"].read_text(encoding="utf-8")), encoding="utf-8")
    return out


def evaluate(model: Path, work: Path, name: str, docs: int, task_limit: int | None) -> dict:
    scores = _evaluate(model, work, name, docs, task_limit)
    extra = work / "eval" / f"{name}-udhr-normalized.json"
    if not extra.exists():
        run(work, recipe.evaluate_step([str(model)], (f"vi_udhr_normalized={normalized_udhr_vi(work)}",), str(extra),
                                       docs))
    (more,) = json.loads(extra.read_text())["models"].values()
    return scores | more


def _evaluate(model: Path, work: Path, name: str, docs: int, task_limit: int | None) -> dict:
    out = work / "eval" / f"{name}.json"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        data = (f"vi={ROOT / 'configs/lm_eval/heldout_vi.jsonl'}", f"en={ROOT / 'configs/lm_eval/heldout_en.jsonl'}",
                *(f"{lang}={path}" for lang, path in OFF_DOMAIN.items()))
        tasks = ("--tasks", ",".join(TASKS), "--task-data", str(SHARED / "eval" / "vi"),
                 *(("--limit", str(task_limit)) if task_limit else ()))
        run(work, recipe.evaluate_step([str(model)], data, str(out), docs, tasks))
    (scores,) = json.loads(out.read_text())["models"].values()
    return scores


STAGE2_VARIANTS = {
    "stage2": {},
    "stage2-vocab-lr": {"optim": {"vocab_lr": 3e-3, "vocab_min_lr": 1e-4}},
    "stage2-lora": {"optim": {"lr": 1e-3, "weight_decay": 0.0},
                    "train": {"freeze": {"train": "new_vocab_rows"},
                              "lora": {"rank": 64, "alpha": 128, "dropout": 0.05}}},
}
"""Stage-2 runs from the same stage-1 weights on the same data and token budget: config changes."""


def stage_config(work: Path, stage: int, args, init_from: Path, name: str | None = None,
                 changes: dict | None = None) -> Path:
    name = name or f"stage{stage}"
    steps = args.stage1_steps if stage == 1 else args.stage2_steps
    config = {
        "model": {"hf_dir": str(work / "base"), "tokenizer": str(work / "tokenizer"),
                  "base_tokenizer": str(work / "base" / "tokenizer.json"), "init_from": str(init_from)},
        "data": {"blend": str(work / "data" / f"stage{stage}.json"), "seq_length": args.seq, "split": "98,2,0"},
        "parallel": {"tp": 1, "pp": 1},
        "optim": {"lr": args.stage1_lr if stage == 1 else args.stage2_lr, "min_lr": 1e-5,
                  "warmup_steps": max(steps // 20, 1), "weight_decay": 0.0 if stage == 1 else 0.1,
                  "clip_grad": 1.0, "bf16": False},
        "train": {"steps": steps, "global_batch_size": args.gbs, "micro_batch_size": args.micro_batch,
                  "freeze": {"train": "new_vocab_rows" if stage == 1 else "all"},
                  "eval_interval": max(steps // 4, 1), "eval_steps": 1, "log_interval": max(steps // 40, 1)},
        "checkpoint": {"save": str(work / name), "save_interval": steps},
    }
    for section, values in (changes or {}).items():
        config[section] |= values
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(work: Path, stage: int, args, init_from: Path, name: str | None = None, changes: dict | None = None) -> None:
    name = name or f"stage{stage}"
    if (work / name / "done").exists():
        return
    config = stage_config(work, stage, args, init_from, name, changes)
    run(work, recipe.train_step(name, (*recipe.TORCHRUN, "1", "-m", "megatron_adapt.pretrain", "--config"),
                                str(config), str(work / name)))


def export(work: Path, checkpoint: Path, name: str) -> Path:
    out = work / "hf" / name
    if not (out / "config.json").exists():
        run(work, recipe.export_step(f"export {name}", str(checkpoint), str(out), "fp32", "--tokenizer-dir",
                                     str(work / "tokenizer")))
    return out


def prepare(work: Path, args) -> None:
    if not (work / "base" / "config.json").exists():
        run(work, recipe.Step("the GGUF as an HF model", recipe.tool("convert_checkpoint", "gguf-to-hf", "--gguf",
                                                                      str(args.gguf), "--output", "$BASE_MODEL")))
    if not (work / "tokenizer" / "report.json").exists():
        run(work, recipe.extend_step("$BASE_MODEL", str(SHARED / "vi/viwiki_undertheseanlp.jsonl.xz"),
                                     str(SHARED / "en/gutenberg_classics.jsonl.xz"), args.new_tokens, "vi",
                                     "$WORK/tokenizer"))
    data = work / "data"
    data.mkdir(exist_ok=True)
    for lang, corpus, mb in (("vi", SHARED / "vi/viwiki_undertheseanlp.jsonl.xz", args.vi_mb),
                             ("en", SHARED / "en/gutenberg_classics.jsonl.xz", args.en_mb)):
        if not Path(f"{data / lang}.stats.json").exists():
            training_paragraphs(corpus, data / f"{lang}.jsonl", int(mb * 1e6), lang if lang == "vi" else None)
            run(work, recipe.preprocess_step(f"preprocess {lang}", ("--input", str(data / f"{lang}.jsonl")),
                                             "$WORK/tokenizer", f"$WORK/data/{lang}", "--append-eod"))
    for stage, weights in ((1, args.stage1_blend), (2, args.stage2_blend)):
        vi, en = map(float, weights.split(":"))
        run(work, recipe.blend_step({"vi": (vi, "$WORK/data/vi"), "en": (en, "$WORK/data/en")},
                                    f"$WORK/data/stage{stage}.json"))
    for init in INITS:
        if not (work / f"start-{init}" / "latest").exists():
            run(work, recipe.Step(f"hf-to-megatron, {init}", recipe.tool(
                "convert_checkpoint", "hf-to-megatron", "--hf-dir", "$BASE_MODEL", "--tokenizer-dir", "$WORK/tokenizer",
                "--init", init, "--output", f"$WORK/start-{init}")))


def curves(work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, bpb_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colors, offset = {}, 0
    for stage in (1, 2):
        rows = [json.loads(line) for line in (work / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if "loss" in r]
        loss_ax.plot([offset + r["step"] for r in train_rows], [r["loss"] for r in train_rows], label=f"stage {stage}")
        for key in sorted({k for r in rows for k in r if k.startswith("valid_bpb/")}):
            group = key.split("/")[1]
            points = [(offset + r["step"], r[key]) for r in rows if key in r]
            colors.setdefault(group, f"C{len(colors)}")
            bpb_ax.plot(*zip(*points), marker="o", color=colors[group], ls="-" if stage == 1 else "--",
                        label=f"{group}, stage {stage}")
        offset += max(r["step"] for r in rows)
        loss_ax.axvline(offset, color="grey", lw=0.5)
    loss_ax.set(xlabel="step", ylabel="training loss (nats/token)", title="SmolLM2-135M + Vietnamese: loss")
    bpb_ax.set(xlabel="step", ylabel="validation bits per byte", title="validation bits/byte per group")
    loss_ax.legend()
    bpb_ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _task(figures: dict, metric: str) -> str:
    return f"{figures[metric]:.3f} ± {figures[metric + '_stderr']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/real_model")
    parser.add_argument("--gguf", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--new-tokens", type=int, default=16000)
    parser.add_argument("--vi-mb", type=float, default=8.0, help="Vietnamese training text, MB")
    parser.add_argument("--en-mb", type=float, default=4.0, help="English training text, MB")
    parser.add_argument("--stage1-blend", default="3:1", help="vi:en weights")
    parser.add_argument("--stage2-blend", default="5:2", help="vi:en weights")
    parser.add_argument("--stage1-steps", type=int, default=40)
    parser.add_argument("--stage2-steps", type=int, default=40)
    parser.add_argument("--stage1-lr", type=float, default=3e-3)
    parser.add_argument("--stage2-lr", type=float, default=3e-4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--eval-docs", type=int, default=60)
    parser.add_argument("--task-limit", type=int, default=300, help="items per benchmark task (0: all)")
    parser.add_argument("--variants", nargs="*", choices=[v for v in STAGE2_VARIANTS if v != "stage2"],
                        help="also these stage-2 runs (no names: all of them)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args)

    results = {"base SmolLM2-135M": evaluate(work / "base", work, "base", args.eval_docs, args.task_limit)}
    for init in INITS:
        results[f"resized, {init}"] = evaluate(export(work, work / f"start-{init}", f"start-{init}"), work,
                                               f"start-{init}", args.eval_docs, args.task_limit)
    train(work, 1, args, work / "start-subword-mean")
    results["after stage 1"] = evaluate(export(work, work / "stage1", "stage1"), work, "stage1", args.eval_docs,
                                        args.task_limit)
    labels = {"stage2": "after stage 2", "stage2-vocab-lr": "after stage 2, vocab_lr 3e-3 (10×)",
              "stage2-lora": "after stage 2 as LoRA r64 + new rows"}
    for name, changes in STAGE2_VARIANTS.items():
        if name != "stage2" and (args.variants is None or args.variants and name not in args.variants):
            continue
        train(work, 2, args, work / "stage1", name, changes)
        results[labels[name]] = evaluate(export(work, work / name, name), work, name, args.eval_docs, args.task_limit)

    base = results["base SmolLM2-135M"]
    lines = ["| model | vi bits/byte | en bits/byte | vi vs base | en vs base | vi UDHR (normalized) | vi UDHR as is "
             "| en UDHR | en UDHR vs base | arc_vi acc_norm | mmlu_vi acc | truthfulqa_vi mc2 | vi tokens/word "
             "| en tokens/word |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['vi']['bits_per_byte']:.3f} | {r['en']['bits_per_byte']:.3f} | "
                     f"{r['vi']['bits_per_byte'] / base['vi']['bits_per_byte'] - 1:+.1%} | "
                     f"{r['en']['bits_per_byte'] / base['en']['bits_per_byte'] - 1:+.1%} | "
                     f"{r['vi_udhr_normalized']['bits_per_byte']:.3f} | {r['vi_udhr']['bits_per_byte']:.3f} | "
                     f"{r['en_udhr']['bits_per_byte']:.3f} | "
                     f"{r['en_udhr']['bits_per_byte'] / base['en_udhr']['bits_per_byte'] - 1:+.1%} | "
                     f"{_task(r['arc_vi'], 'acc_norm')} | {_task(r['mmlu_vi'], 'acc')} | "
                     f"{_task(r['truthfulqa_vi'], 'mc2')} | "
                     f"{r['vi']['tokens_per_word']:.2f} | {r['en']['tokens_per_word']:.2f} |")
    (work / "results.md").write_text("\n".join(lines) + "\n")
    (work / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    curves(work, work / "curves.png")
    print("\n".join(lines))
    print(f"written: {work}/results.json, results.md, curves.png")


if __name__ == "__main__":
    main()
