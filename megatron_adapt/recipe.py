"""The recipe, written once: each step is the command line of a tool in ``tools/``.

Extend the tokenizer → preprocess (new language, English, translation pairs) → blends → stage 1 →
stage 2 → SFT data → SFT → export → evaluate. ``recipe_steps`` builds those commands from a
``RecipeInputs``; the same builders serve the README's cluster block (``render`` of ``CLUSTER``,
which a test compares with the README), the CPU quickstart (``tools/recipe.py quickstart`` runs
them on the bundled sample with the tiny configs, after two stand-in steps that make a base
tokenizer and a tiny LLaMA), the tests' shared fixture and the real-model benchmark.

Paths in the commands are written under ``$WORK`` (every output) and ``$BASE_MODEL`` (the HF model
the run adapts); the training configs name their files the same way (``training.config`` expands
``${WORK}`` and ``${BASE_MODEL}``), so one config serves any work directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

TORCHRUN = ("torchrun", "--nproc-per-node")


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the recipe; ``output`` is where its result lands (for the summary)."""

    title: str
    argv: tuple[str, ...]
    output: str = ""

    @property
    def trains(self) -> bool:
        return "megatron_adapt.pretrain" in self.argv or "launch/pretrain_7b.sh" in self.argv


@dataclasses.dataclass(frozen=True)
class RecipeInputs:
    """What a run of the recipe starts from, and how it launches training."""

    vi_corpus: str
    en_corpus: str
    pairs: tuple[str, str]
    """Aligned English and Vietnamese sentence files."""
    chat: str
    """Conversations (JSONL with ``messages``) for SFT."""
    num_new_tokens: int
    stage1_config: str
    stage2_config: str
    sft_config: str
    train_launcher: tuple[str, ...]
    """What runs ``-m megatron_adapt.pretrain``-style arguments: torchrun, or the Slurm script."""
    eval_data: tuple[str, ...] = ("vi=configs/lm_eval/heldout_vi.jsonl", "en=configs/lm_eval/heldout_en.jsonl")
    eval_docs: int | None = None
    export_dtype: str = "bf16"
    lang: str = "vi"
    chat_template: str = "vbd"


CLUSTER = RecipeInputs(
    vi_corpus="corpora/viwiki.jsonl.xz", en_corpus="corpora/gutenberg.jsonl.xz",
    pairs=("corpora/iwslt.en.xz", "corpora/iwslt.vi.xz"), chat="corpora/chat_vi.jsonl",
    num_new_tokens=16000, stage1_config="configs/stage1_7b.yaml", stage2_config="configs/stage2_7b.yaml",
    sft_config="configs/sft_7b.yaml", train_launcher=("sbatch", "--wait", "launch/pretrain_7b.sh"))
"""The README's recipe: LLaMA-2-7B on a Slurm cluster (one job at a time; a preempted job requeues)."""

QUICKSTART = RecipeInputs(
    vi_corpus="data/sample/vi_wiki.jsonl.xz", en_corpus="data/sample/en_gutenberg.jsonl.xz",
    pairs=("data/sample/tatoeba.en.xz", "data/sample/tatoeba.vi.xz"), chat="data/sample/chat_vi.jsonl.xz",
    num_new_tokens=1500, stage1_config="configs/tiny_cpu_stage1.yaml", stage2_config="configs/tiny_cpu_stage2.yaml",
    sft_config="configs/tiny_cpu_sft.yaml", train_launcher=(*TORCHRUN, "2", "-m", "megatron_adapt.pretrain", "--config"),
    eval_docs=20, export_dtype="fp32")
"""The main job: the same commands on the bundled sample with the tiny CPU configs (2 processes)."""


def tool(name: str, *args: str) -> tuple[str, ...]:
    return ("python", f"tools/{name}.py", *args)


def base_tokenizer_step(corpus: str, vocab_size: int, out: str) -> Step:
    return Step("a LLaMA-like base tokenizer (a stand-in for LLaMA-2's)",
                tool("train_base_tokenizer", "--corpus", corpus, "--vocab-size", str(vocab_size), "--output", out), out)


def tiny_llama_step(tokenizer: str, out: str, *dims: str) -> Step:
    """``dims``: tools/make_tiny_llama.py's size flags (its defaults without)."""
    return Step("a tiny random LLaMA over it (the model to adapt)",
                tool("make_tiny_llama", "--tokenizer", tokenizer, "--output", out, *dims), out)


def extend_step(base: str, corpus: str, english: str | None, num_new_tokens: int, lang: str, out: str) -> Step:
    argv = tool("extend_tokenizer", "--base-model", base, "--corpus", corpus, *(("--english", english) if english else ()),
                "--num-new-tokens", str(num_new_tokens), "--lang", lang, "--output-dir", out, "--overwrite")
    return Step("extend the tokenizer with new-language pieces", argv, out)


def preprocess_step(title: str, source: tuple[str, ...], tokenizer: str, prefix: str, *options: str) -> Step:
    """``source``: ``("--input", FILE)``, ``("--parallel", SRC, TGT)`` or ``("--instructions", FILE)``."""
    return Step(title, tool("preprocess_data", *source, "--tokenizer-model", tokenizer, "--output-prefix", prefix,
                            *options), prefix)


def blend_step(groups: dict[str, tuple[float, str]], out: str) -> Step:
    args = [a for name, (weight, prefix) in groups.items() for a in ("--group", f"{name}={weight:g}:{prefix}")]
    return Step(f"blend {', '.join(groups)}", tool("make_blend", *args, "--output", out), out)


def train_step(title: str, launcher: tuple[str, ...], config: str, run_dir: str, *overrides: str) -> Step:
    sets = [a for item in overrides for a in ("--set", item)]
    return Step(title, (*launcher, config, *sets), run_dir)


def export_step(title: str, checkpoint: str, out: str, dtype: str, *options: str) -> Step:
    return Step(title,
                tool("convert_checkpoint", "megatron-to-hf", "--checkpoint", checkpoint, "--output", out, "--dtype", dtype,
                     *options), out)


def evaluate_step(models: list[str], data: tuple[str, ...], out: str, max_docs: int | None = None,
                  tasks: tuple[str, ...] = ()) -> Step:
    """``tasks``: evaluate.py's task arguments (``--tasks``, ``--task-data``, ``--limit``), if any."""
    args = [a for m in models for a in ("--model", m)] + [a for d in data for a in ("--data", d)]
    return Step("bits per byte per language, models side by side",
                tool("evaluate", *args, *(("--max-docs", str(max_docs)) if max_docs else ()), *tasks,
                     "--output", out), out)


def recipe_steps(inputs: RecipeInputs) -> list[Step]:
    """The whole recipe from ``$BASE_MODEL`` into ``$WORK``."""
    tok, data, launch = "$WORK/tokenizer", "$WORK/data", inputs.train_launcher
    return [
        extend_step("$BASE_MODEL", inputs.vi_corpus, inputs.en_corpus, inputs.num_new_tokens, inputs.lang, tok),
        preprocess_step("preprocess the new language", ("--input", inputs.vi_corpus), tok, f"{data}/vi", "--append-eod",
                        "--normalize", inputs.lang),
        preprocess_step("preprocess English", ("--input", inputs.en_corpus), tok, f"{data}/en", "--append-eod"),
        preprocess_step("preprocess translation pairs", ("--parallel", *inputs.pairs), tok, f"{data}/mt", "--append-eod"),
        blend_step({"mt": (50, f"{data}/mt"), "vi": (30, f"{data}/vi"), "en": (20, f"{data}/en")}, f"{data}/stage1.json"),
        blend_step({"vi": (100, f"{data}/vi"), "en": (40, f"{data}/en")}, f"{data}/stage2.json"),
        train_step("stage 1: only the added vocabulary rows train", launch, inputs.stage1_config, "$WORK/stage1"),
        train_step("stage 2: every weight trains", launch, inputs.stage2_config, "$WORK/stage2"),
        preprocess_step("preprocess conversations for SFT", ("--instructions", inputs.chat), tok, f"{data}/chat",
                        "--chat-template", inputs.chat_template),
        blend_step({"chat": (1, f"{data}/chat")}, f"{data}/sft.json"),
        train_step("SFT: loss on the answers, conversations packed apart", launch, inputs.sft_config, "$WORK/sft"),
        export_step("export stage 2 to Hugging Face format", "$WORK/stage2", "$WORK/release", inputs.export_dtype),
        export_step("export the chat model, its template in tokenizer_config.json", "$WORK/sft", "$WORK/release-chat",
                    inputs.export_dtype, "--chat-template", inputs.chat_template),
        evaluate_step(["$BASE_MODEL", "$WORK/release"], inputs.eval_data, "$WORK/evaluation.json", inputs.eval_docs),
    ]


def quickstart_steps(base_vocab: int = 2000) -> list[Step]:
    """The main job: stand-ins for LLaMA-2 (a base tokenizer trained on the English sample and a
    tiny random LLaMA over it), the recipe on the sample, then a conversation with each export."""
    base_tokenizer = "$WORK/base_tokenizer/tokenizer.model"
    stand_ins = [base_tokenizer_step(QUICKSTART.en_corpus, base_vocab, base_tokenizer),
                 tiny_llama_step(base_tokenizer, "$BASE_MODEL")]
    talk = [
        Step("generate with transformers from the export",
             tool("generate", "--model", "$WORK/release", "--prompt", "Việt Nam là", "--prompt", "Hà Nội",
                  "--max-new-tokens", "24")),
        Step("a conversation with the chat export",
             tool("generate", "--model", "$WORK/release-chat", "--chat", "--greedy", "--prompt",
                  "Dịch sang tiếng Việt: Thank you.", "--prompt", "Translate into English: Cảm ơn bạn.",
                  "--max-new-tokens", "16")),
    ]
    return stand_ins + recipe_steps(QUICKSTART) + talk


def _shell_word(arg: str) -> str:
    """``arg`` for a shell command line; ``$WORK`` and ``$BASE_MODEL`` stay expandable."""
    return arg if re.fullmatch(r"[\w@%+=:,./$-]+", arg) else shlex.quote(arg)


def render(steps: list[Step], work: str, base_model: str, width: int = 100) -> str:
    """The steps as the shell block the README shows (lines continued past ``width``)."""
    lines = [f"export WORK={work} BASE_MODEL={base_model}"]
    for step in steps:
        lines.append(f"# {step.title}")
        line = ""
        for word in map(_shell_word, step.argv):
            if line and len(line) + len(word) + 3 > width and word.startswith("--"):
                lines.append(line + " \\")
                line = "    "
            line += ("" if not line.strip() else " ") + word
        lines.append(line)
    return "\n".join(lines)


def _expand(arg: str, env: dict[str, str]) -> str:
    for name in ("BASE_MODEL", "WORK"):
        arg = arg.replace(f"${name}", env[name])
    return arg


def run(steps: list[Step], root: str | Path, work: str | Path, base_model: str | Path, log_dir: str | Path | None = None,
        python: str = sys.executable, on_start=None, on_step=None) -> None:
    """Run ``steps`` in order from the repository ``root``, ``python`` standing for ``python`` and
    torchrun run as ``python -m torch.distributed.run``. Each step's log (stderr) goes to
    ``log_dir/NN.log`` (discarded without one); the first failure raises naming the command and
    its log. ``on_start(index, step)`` is called before each and ``on_step(index, step, stdout)``
    after."""
    env = dict(os.environ, WORK=str(work), BASE_MODEL=str(base_model))
    for index, step in enumerate(steps, start=1):
        if on_start is not None:
            on_start(index, step)
        argv = [_expand(a, env) for a in step.argv]
        if argv[0] == "python":
            argv[0] = python
        elif argv[0] == "torchrun":
            argv[:1] = [python, "-m", "torch.distributed.run"]
        log_file = Path(log_dir) / f"{index:02d}.log" if log_dir else None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") if log_file else open(os.devnull, "w") as out:
            result = subprocess.run(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
        if result.returncode:
            tail = log_file.read_text().splitlines()[-40:] if log_file else []
            where = f"\n(the whole log: {log_file})" if log_file else ""
            raise RuntimeError(f"step {index} ({step.title}) failed with exit code {result.returncode}: "
                               f"{shlex.join(argv)}\n{result.stdout[-2000:]}" + "\n".join(tail) + where)
        if on_step is not None:
            on_step(index, step, result.stdout)


def loss_summary(run_dir: str | Path) -> str:
    """'training loss A (step i) -> B (step j)' from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return (f"training loss {rows[0]['loss']:.3f} (step {rows[0]['step']}) -> "
            f"{rows[-1]['loss']:.3f} (step {rows[-1]['step']})")
