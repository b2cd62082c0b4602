"""The GPU path on a real NVIDIA GPU: the Triton kernels against references, the fused model
against megatron-core's layers, and short training runs with a resume; on two GPUs, context
parallelism and a stage 1 at DP=2 resumed on one GPU.

Run by ``launch/gpu_check.sh`` (``pytest -m gpu``); on a machine without a GPU every test here is
skipped with that reason — their CPU counterparts (C++ kernels, gloo runs) are in the other folders.
"""

from __future__ import annotations

import pytest
import torch

from megatron_adapt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (launch/gpu_check.sh)")]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# fp32 on CUDA: cuBLAS and TE may reduce in another order (or TF32) than the CPU reference. A first
# guess, to calibrate on the first GPU run; on CPU the same comparison holds within 1e-4.
LORA_GPU_TOLERANCE = 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels_match_float64_references(dtype):
    """The check a training run makes at start-up before it relies on the kernels."""
    from megatron_adapt.kernels.self_check import self_check

    assert self_check("cuda", DTYPES[dtype]) is None


@pytest.mark.parametrize("tokens,vocab", [(16384, 48000), (32768, 128256)])
def test_linear_cross_entropy_at_training_sizes(tokens, vocab):
    """Launch grids at the sizes a 7B run uses (16k-32k tokens per micro-batch, 48k-128k rows):
    bf16 inputs, compared with the unfused product and cross entropy in float32 from the same inputs
    (logits of 32k × 128k tokens in fp32 are 16 GiB: the reference runs in token chunks)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(tokens, 512, device="cuda", generator=gen) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, 512, device="cuda", generator=gen) * 0.05).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    rows = weight[vocab - 16000:].clone().requires_grad_()
    loss_sum, losses = linear_cross_entropy(hidden, rows, weight, labels, 0, vocab, (vocab - 16000, vocab))
    loss_sum.backward()
    expected_losses, expected_hidden_grad = [], []
    weight32, rows32 = weight.float(), rows.detach().float().requires_grad_()
    for part in range(0, tokens, 4096):
        h = hidden.detach()[part:part + 4096].float().requires_grad_()
        full = torch.cat([weight32[:vocab - 16000], rows32])
        loss = linear_cross_entropy_reference(h, full, labels[part:part + 4096], vocab)
        loss.sum().backward()
        expected_losses.append(loss.detach())
        expected_hidden_grad.append(h.grad)
    expected_losses, expected_hidden_grad = torch.cat(expected_losses), torch.cat(expected_hidden_grad)

    def rel(got, want):
        return ((got.float() - want).norm() / want.norm()).item()

    # bf16 logits (as the unfused bf16 path has them) round each by up to 2^-9 of its size.
    assert rel(losses, expected_losses) <= 1e-2, "per-token losses"
    assert rel(hidden.grad, expected_hidden_grad) <= 2e-2, "hidden-state gradient"
    assert rel(rows.grad, rows32.grad) <= 2e-2, "trainable rows' gradient"


@pytest.mark.parametrize("policy,tied", [("new_vocab_rows", False), ("all", True)])
def test_fused_model_equals_megatron_core_on_the_gpu(policy, tied):
    """The model-level comparison of tests/model/test_fused_vocab.py, on CUDA with NCCL."""
    from tests.model.test_fused_vocab import _rank_compare
    from tests.multiprocess import run_ranks

    (result,) = run_ranks(_rank_compare, policy, tied, False)
    (ref_loss, fused_loss), (ref_grads, fused_grads) = result["losses"], result["grads"]
    assert abs(fused_loss - ref_loss) <= 1e-4 * abs(ref_loss), f"loss {fused_loss} vs {ref_loss}"
    for name, expected in ref_grads.items():
        err = ((fused_grads[name].float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
        assert err <= 1e-4, f"gradient of {name} differs by {err:.2e}"


# CUDA's embedding backward adds rows with atomics, so a rerun is equal up to float rounding, not bit for bit.
GPU_RESUME_TOLERANCE = 1e-3


@pytest.mark.parametrize("stage,bf16", [("new_vocab_rows", True), ("all", True), ("all", False), ("lora", True)])
def test_short_run_on_the_gpu_resumes(recipe, tmp_path, stage, bf16):
    """Stage 1, stage 2 and a LoRA run (configs/tiny_cpu_lora.yaml's adapters and added rows) on one
    GPU (bf16 with fp32 master weights, and fp32), stopped by SIGTERM and resumed, against an
    uninterrupted run."""
    from megatron_adapt.model.build import transformer_engine_available
    from tests.training.test_resume import LORA, _losses, _run

    train = LORA[:2] if stage == "lora" else [f"train.freeze={{train: {stage}}}"]
    sets = [*train, f"optim.bf16={str(bf16).lower()}", "parallel.tp=1", "parallel.sequence_parallel=false"]
    reference = tmp_path / "reference"
    log = _run(recipe, reference, 1, *sets)
    assert "fused kernels, Triton" in log, "the fused vocabulary kernels were not used on the GPU"
    if stage == "lora" and transformer_engine_available():
        assert "TE's norms unfused" in log, "LoRA did not run on TransformerEngine's layers"
    expected = _losses(reference)
    assert expected[10] < expected[1], f"the loss did not fall: {expected}"
    _assert_resume_continues(recipe, tmp_path / "interrupted", sets, expected, 1, 1, GPU_RESUME_TOLERANCE)


def _assert_resume_continues(recipe, run, sets: list[str], expected: dict[int, float], procs: int,
                             resume_procs: int, tolerance: float) -> None:
    """Stop a run on ``procs`` GPUs by SIGTERM after step 4, resume it on ``resume_procs``: the
    losses after the saved step are ``expected``'s within ``tolerance``."""
    from tests.training.test_resume import _losses, _run

    _run(recipe, run, procs, *sets, stop_after_step=4)
    saved = int((run / "latest").read_text().strip().split("_")[1])
    _run(recipe, run, resume_procs, *sets)
    got = _losses(run)
    for step in range(saved + 1, 11):
        assert abs(got[step] - expected[step]) <= tolerance * expected[step], \
            f"step {step}: loss {got[step]} after a resume on {resume_procs} GPU(s) vs {expected[step]}"


@pytest.fixture(scope="module")
def peft_reference(tmp_path_factory):
    from tests.model.test_lora import build_peft_reference

    return build_peft_reference(tmp_path_factory)


@pytest.mark.parametrize("use_transformer_engine", [False, True], ids=["local-spec", "te-spec"])
def test_lora_matches_peft_on_the_gpu(peft_reference, use_transformer_engine):
    """tests/model/test_lora.py's comparison with PEFT on CUDA, on megatron-core's local layers and
    on TransformerEngine's (its norms unfused so the adapters see the normalized input); at TP=2
    with sequence parallelism where there are two GPUs."""
    from megatron_adapt.model.build import transformer_engine_available
    from tests.model.test_lora import _rank_lora_forward_backward
    from tests.multiprocess import run_ranks

    if use_transformer_engine and not transformer_engine_available():
        pytest.skip("TransformerEngine is not installed")
    tp = min(torch.cuda.device_count(), 2)
    ref = peft_reference
    results = run_ranks(_rank_lora_forward_backward, ref["dir"], ref["weights"], ref["tokens"], ref["labels"],
                        tp > 1, use_transformer_engine, tp=tp)
    scale = ref["logits"].abs().max().item()
    for r in results:
        diff = (r["logits"].float().cpu() - ref["logits"]).abs().max().item()
        assert diff <= LORA_GPU_TOLERANCE * scale, f"logits differ from PEFT's by {diff:.2e} (of {scale:.2f})"
        assert not r["base_grads"], f"base weights got gradients: {r['base_grads'][:3]}"
    grads = {k: v.float().cpu() for r in results for k, v in r["grads"].items()}
    assert set(grads) == set(ref["grads"]), f"adapters differ: {sorted(set(grads) ^ set(ref['grads']))[:4]}"
    for name, expected in ref["grads"].items():
        diff = (grads[name] - expected).abs().max().item()
        assert diff <= LORA_GPU_TOLERANCE * max(expected.abs().max().item(), 1e-3), f"grad of {name} differs by {diff:.2e}"


# A first guess, to calibrate on the first multi-GPU run: bf16 kernels at another sequence split
# round differently; on CPU the same comparison in fp32 agreed within 1e-5.
MULTI_GPU_TOLERANCE = 2e-3

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs")


@two_gpus
def test_context_parallel_on_two_gpus(recipe, tmp_path):
    """CP=2 through TransformerEngine's attention where installed (the local spec's all-gather
    attention otherwise) gives the one-GPU run's losses."""
    from tests.training.test_resume import _losses, _run

    sets = ["optim.bf16=true", "parallel.tp=1"]
    _run(recipe, tmp_path / "one", 1, *sets)
    log = _run(recipe, tmp_path / "cp", 2, *sets, "parallel.context_parallel=2")
    assert "context parallel 2" in log, "megatron-core did not get CP=2"
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "cp")
    for step, want in expected.items():
        assert abs(got[step] - want) <= MULTI_GPU_TOLERANCE * want, f"step {step}: CP=2 loss {got[step]} vs {want}"


@two_gpus
def test_stage1_at_two_data_parallel_ranks_resumes_on_one(recipe, tmp_path):
    """Stage 1 at DP=2 (megatron-core's distributed optimizer where TE or apex is installed: the
    added rows' Adam state sharded over DP), stopped by SIGTERM and resumed at DP=1."""
    from tests.training.test_resume import _losses, _run

    sets = ["train.freeze={train: new_vocab_rows}", "optim.bf16=true", "parallel.tp=1"]
    _run(recipe, tmp_path / "reference", 2, *sets)
    _assert_resume_continues(recipe, tmp_path / "interrupted", sets, _losses(tmp_path / "reference"), 2, 1,
                             MULTI_GPU_TOLERANCE)
