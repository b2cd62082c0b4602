"""A run stopped by SIGTERM (as Slurm's warning arrives through torchrun) saves, exits, and the
rerun continues with exactly the losses of an uninterrupted run; at another TP size (optimizer
state resharded by megatron-core's distributed checkpointing) it continues within float rounding."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tied_copy

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]


def _run(recipe: Path, save: Path, procs: int, *overrides: str, stop_after_step: int | None = None) -> str:
    """Train (or resume) with the recipe's config; returns the workers' log."""
    cmd = TORCHRUN + [str(procs), "-m", "megatron_adapt.pretrain", "--config", str(recipe / "config.yaml"),
                      "--set", f"checkpoint.save={save}", *[a for o in overrides for a in ("--set", o)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stop_after_step is not None:
        metrics = save / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= stop_after_step:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
    _, err = proc.communicate(timeout=600)
    if stop_after_step is not None:  # torchrun exits non-zero after relaying a SIGTERM; workers must not
        assert "stopped at step" in err and "]: Traceback" not in err, f"workers did not stop cleanly:\n{err[-3000:]}"
        return err
    assert proc.returncode == 0, f"training exited with {proc.returncode}:\n{err[-3000:]}"
    return err


def _losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def reference_losses(recipe, tmp_path_factory) -> dict[int, float]:
    """The recipe's run at TP=2, uninterrupted, with nothing recomputed."""
    reference = tmp_path_factory.mktemp("reference")
    _run(recipe, reference, 2)
    expected = _losses(reference)
    assert len(expected) == 10 and expected[10] < expected[1], f"loss did not decrease: {expected}"
    return expected


@pytest.mark.distributed
def test_sigterm_then_resume_is_bit_identical(recipe, tmp_path, reference_losses):
    expected = reference_losses

    run = tmp_path / "interrupted"
    _run(recipe, run, 2, stop_after_step=4)
    meta_step = int((run / "latest").read_text().strip().split("_")[1])
    assert 4 <= meta_step < 10, f"the stop request was not honoured at a step boundary (saved at {meta_step})"
    assert not (run / "done").exists()
    _run(recipe, run, 2)  # same command resumes
    got = _losses(run)
    for step in range(meta_step + 1, 11):
        assert got[step] == expected[step], f"step {step}: {got[step]!r} after resume vs {expected[step]!r}"
    assert (run / "done").exists()


# bf16 keeps 8 bits of mantissa (a relative rounding unit of 3.9e-3) in the weights and activations;
# the fp32 master weights keep the updates from drifting. Over the 10 steps the losses stayed within
# 3e-5 of the fp32 run's; a tenth of bf16's rounding unit leaves room without hiding a wrong update.
BF16_TOLERANCE = 4e-4


@pytest.mark.distributed
@pytest.mark.parametrize("settings,procs,tolerance,logged", [
    (["train.recompute=full"], 2, 0.0, "recompute full"),
    (["parallel.sequence_parallel=true", "train.recompute=selective"], 2, 1e-5,
     "sequence parallel True, context parallel 1, recompute selective"),
    (["parallel.tp=1", "ddp.overlap_grad_reduce=true", "ddp.bucket_size=20000", "train.micro_batch_size=1"], 2, 1e-5,
     "overlap grad reduce True"),
    (["optim.bf16=true"], 2, BF16_TOLERANCE, "bfloat16 parameters with fp32 master weights"),
    (["parallel.context_parallel=2", "parallel.sequence_parallel=true"], 4, 1e-5, "context parallel 2")],
    ids=["recompute-full", "sequence-parallel-selective-recompute", "overlap-grad-reduce", "bf16",
         "context-parallel-tp2-sp"])
def test_performance_features_give_the_same_losses(recipe, tmp_path, reference_losses, settings, procs, tolerance,
                                                   logged):
    """The reference runs at TP=2 with none of them. Recomputation (megatron-core's checkpoint
    function, TP RNG tracker included) re-runs the same float ops: bit-identical. Sequence
    parallelism (with selective recomputation, as the 7B configs run) sums the norms' gradients
    over the two halves of the sequence, and the overlapped gradient reduction (DP=2, several
    buckets, two micro-batches per rank) averages two ranks' sums: the same run up to float32
    rounding (over gloo a reduction started before the last micro-batch also came out right, so
    this does not catch a missing no_sync). bf16 runs megatron-core's
    mixed-precision optimizer (bf16 weights, fp32 master copies and gradient buffers) through
    megatron-core's own vocabulary layers: the same run up to bf16 rounding. Context parallelism
    (CP=2 × TP=2 with SP, 4 processes) splits every sequence in four chunks, attends over keys and
    values gathered from the CP pair and sums losses and gradients over it: up to float32 rounding."""
    log = _run(recipe, tmp_path / "run", procs, *settings)
    assert logged in log, f"megatron-core did not get {settings}"
    got = _losses(tmp_path / "run")
    for step, expected in reference_losses.items():
        assert abs(got[step] - expected) <= tolerance * expected, \
            f"{settings}: step {step} loss {got[step]!r} vs {expected!r} without"


# At TP=1 the matmuls that TP=2 splits over two ranks run whole, so sums are taken in another order:
# the same run up to float32 rounding. (On the tiny test model the losses came out bit-identical.)
TP_CHANGE_TOLERANCE = 1e-5


def _assert_continues(got: dict[int, float], expected: dict[int, float], saved: int, layout: str) -> None:
    """The resumed run's losses after the saved step are the uninterrupted run's, within rounding."""
    assert saved < 10 and len(got) == 10, f"saved at step {saved}, losses for steps {sorted(got)}"
    for step in range(saved + 1, 11):
        rel = abs(got[step] - expected[step]) / expected[step]
        assert rel <= TP_CHANGE_TOLERANCE and math.isfinite(got[step]), \
            f"step {step}: {layout} resume loss {got[step]:.6f} vs {expected[step]:.6f} ({rel:.2e}): optimizer state lost?"


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["all", "new_vocab_rows"])
def test_resume_at_another_tensor_parallel_size(recipe, tmp_path, reference_losses, stage):
    """Stage 1 covers the optimizer state of the added rows, which is keyed apart from the weights,
    and resumes at TP=1 × DP=2 (each replica loading the whole rows). Stage 2 ("all", the recipe's
    default) continues the module's reference run on one process."""
    freeze = f"train.freeze={{train: {stage}}}"
    if stage == "all":
        expected = reference_losses
    else:
        _run(recipe, tmp_path / "reference", 2, freeze)
        expected = _losses(tmp_path / "reference")
    run = tmp_path / "resharded"
    _run(recipe, run, 2, freeze, stop_after_step=5)
    saved = int((run / "latest").read_text().strip().split("_")[1])
    procs = 1 if stage == "all" else 2
    _run(recipe, run, procs, freeze, "parallel.tp=1")
    _assert_continues(_losses(run), expected, saved, f"TP=1 x DP={procs}")


@pytest.mark.distributed
def test_tied_stage1_resume_at_another_pipeline_size(recipe, tmp_path):
    """Tied embeddings at PP=2 keep a copy of the table (and of the added rows' optimizer state) on
    the last stage; saved there and resumed at PP=1, the run continues as the uninterrupted one."""
    sets = [f"model.hf_dir={tied_copy(recipe / 'base_llama', tmp_path / 'tied')}", "train.freeze={train: new_vocab_rows}",
            "parallel.tp=1"]
    reference = tmp_path / "reference"
    _run(recipe, reference, 2, *sets, "parallel.pp=2")
    expected = _losses(reference)
    assert expected[10] < expected[1], f"tied stage 1 did not lower the loss: {expected}"
    run = tmp_path / "repiped"
    _run(recipe, run, 2, *sets, "parallel.pp=2", stop_after_step=5)
    saved = int((run / "latest").read_text().strip().split("_")[1])
    _run(recipe, run, 1, *sets, "parallel.pp=1")
    _assert_continues(_losses(run), expected, saved, "PP=1")


def _tiny_lora_settings() -> list[str]:
    """train.lora, train.freeze and parallel.sequence_parallel of configs/tiny_cpu_lora.yaml, as overrides."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "tiny_cpu_lora.yaml").read_text())
    return [f"train.{key}={json.dumps(config['train'][key])}" for key in ("lora", "freeze")] + \
        [f"parallel.sequence_parallel={json.dumps(config['parallel']['sequence_parallel'])}"]


LORA = _tiny_lora_settings()


@pytest.mark.distributed
def test_lora_run_resumes_and_exports(recipe, tmp_path):
    """A LoRA run with the added rows training (sequence parallel at TP=2): its checkpoints hold
    adapters and vocabulary tables, not the frozen base; after SIGTERM it resumes bit-identically at
    TP=2 and within rounding at TP=1; exported merged, its logits equal PEFT's over the exported
    base and adapter. At CP=2 (4 processes) it gives the same losses within float32 rounding."""
    from megatron.core import dist_checkpointing

    from megatron_adapt.checkpoint.format import CheckpointMeta

    reference = tmp_path / "reference"
    _run(recipe, reference, 2, *LORA)
    expected = _losses(reference)
    assert expected[10] < expected[1], f"LoRA did not lower the loss: {expected}"

    run = tmp_path / "lora"
    _run(recipe, run, 2, *LORA, stop_after_step=3)
    first = int((run / "latest").read_text().strip().split("_")[1])
    checkpoint = run / (run / "latest").read_text().strip()
    assert CheckpointMeta.read(checkpoint).contents == ["adapters", "optimizer", "rng"]
    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint / "dist"))
    assert "decoder.layers.self_attention.linear_qkv.lora.q_proj.B" in stored, sorted(stored)[:5]
    assert not [k for k in stored if k.endswith(".weight") and "decoder.layers" in k], "frozen base weights saved"
    _run(recipe, run, 2, *LORA, stop_after_step=first + 3)
    second = int((run / "latest").read_text().strip().split("_")[1])
    got = _losses(run)
    for step in range(first + 1, second + 1):
        assert got[step] == expected[step], f"step {step}: {got[step]!r} after resume vs {expected[step]!r}"
    _run(recipe, run, 1, *LORA, "parallel.tp=1")
    _assert_continues(_losses(run), expected, second, "LoRA TP=1")
    _check_lora_exports(run, tmp_path)

    context_parallel = tmp_path / "context-parallel"  # adapters' gradients reduced over DP×CP too
    _run(recipe, context_parallel, 4, *LORA, "parallel.context_parallel=2")
    for step, want in expected.items():
        got = _losses(context_parallel)[step]
        assert abs(got - want) <= 1e-5 * want, f"step {step}: LoRA at CP=2 loss {got} vs {want} at CP=1"


def _check_lora_exports(run: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tools.convert_checkpoint import main as convert

    for mode in ("merge", "peft"):
        assert convert(["megatron-to-hf", "--checkpoint", str(run), "--output", str(tmp_path / mode),
                        "--dtype", "fp32", "--lora", mode]) == 0
    tokens = torch.randint(0, 1500, (1, 32), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merge")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "peft"),
                                        tmp_path / "peft" / "adapter")
    with torch.no_grad():
        want, plain, got = merged(tokens).logits, base(tokens).logits, adapted(tokens).logits
    assert (got - want).abs().max() <= 1e-4, f"PEFT export differs from the merged one by {(got - want).abs().max():.2e}"
    assert (plain - want).abs().max() > 1e-3, "the adapters changed nothing: export lost them?"
