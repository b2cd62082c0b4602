"""Checkpoint conversion: HF → megatron-adapt → (TP=2×PP=2 megatron-core) → HF, exact; stage-1
training shows in the export; bad checkpoints are refused and leave nothing complete.

hf-to-megatron is called as a library function; megatron-to-hf and the refusals run the tool as
users run it, in its own process (megatron-to-hf joins a one-process torch.distributed group).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from safetensors.torch import load_file

from megatron_adapt.checkpoint import train_state
from megatron_adapt.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_adapt.checkpoint.format import latest
from megatron_adapt.checkpoint.hf import HFCheckpointReader
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.resize import resizing_reader
from megatron_adapt.training.step import forward_backward
from tests.conftest import tied_copy
from tests.multiprocess import run_ranks

ROOT = Path(__file__).resolve().parents[2]


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True)


def convert(args: list[str]) -> int:
    """Run the tool; on failure its stderr is the assertion message."""
    proc = _convert(*args)
    assert proc.returncode == 0, f"convert_checkpoint {args[0]} failed:\n{proc.stderr[-3000:]}"
    return proc.returncode


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _rank_load_run_and_save(start: str, out_run: str, tokens: torch.Tensor) -> torch.Tensor | None:
    source = latest(start)
    model = build_llama(LlamaArchitecture.from_hf_config(source), seq_length=tokens.shape[1])
    train_state.load(source, model)
    captured: list[torch.Tensor] = []
    forward_backward(model, [dict(tokens=tokens, labels=tokens)], forward_only=True,
                     on_logits=lambda l: captured.append(gather_from_tensor_model_parallel_region(l)))
    train_state.save(out_run, 1, model)  # saved from TP=2×PP=2, exported by one process
    last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return captured[0][..., : model.true_vocab_size] if last else None


@pytest.mark.distributed
def test_hf_to_megatron_tp2_pp2_to_hf(recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, tok_dir = recipe / "base_llama", recipe / "tokenizer"
    start = hf_to_megatron(hf_dir, tok_dir, tmp_path / "start", recipe / "base_tokenizer" / "tokenizer.model",
                           tp=2, pp=2)
    tokens = torch.randint(0, 1500, (1, 24), generator=torch.Generator().manual_seed(0))
    results = run_ranks(_rank_load_run_and_save, str(start), str(tmp_path / "run"), tokens, tp=2, pp=2)
    release = tmp_path / "release"
    assert convert(["megatron-to-hf", "--checkpoint", str(tmp_path / "run"), "--tokenizer-dir", str(tok_dir),
                    "--dtype", "fp32", "--output", str(release)]) == 0

    # Every tensor: the original where it existed, the subword-mean rows where it grew.
    reader = HFCheckpointReader(hf_dir)
    expected = resizing_reader(reader.__getitem__, str(recipe / "base_tokenizer" / "tokenizer.model"),
                               str(tok_dir / "tokenizer.model"), "subword-mean")
    exported = _tensors(release)
    assert set(exported) == set(reader.weight_map)
    for name, tensor in exported.items():
        assert torch.equal(tensor, expected(name)), f"{name} changed on the way through megatron-core"
    config = json.loads((release / "config.json").read_text())
    original = json.loads((hf_dir / "config.json").read_text())
    assert config["vocab_size"] == 1500 and all(config[k] == original[k] for k in
                                                ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps"))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (release / name).read_bytes() == (tok_dir / name).read_bytes(), f"{name} differs"

    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32)
    with torch.no_grad():
        reference = model(tokens).logits
    (ours,) = [r for r in results if r is not None]
    diff = (ours - reference).abs().max().item()
    assert diff <= 1e-4, f"exported HF logits differ from megatron-core's (TP=2×PP=2) by {diff:.2e}"


@pytest.mark.distributed
def test_export_after_stage1_steps(recipe, tmp_path):
    run = tmp_path / "stage1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_adapt.pretrain",
           "--config", str(recipe / "config.yaml"), "--set", f"checkpoint.save={run}", "--set", "train.steps=3",
           "--set", "train.freeze={train: new_vocab_rows}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    release = tmp_path / "release"  # the tokenizer comes from the run's recorded config
    evaluation = {"models": {"base": {"vi": {"bits_per_byte": 2.5}, "arc_vi": {"acc": 0.25, "acc_norm": 0.3, "n": 5}},
                             "release": {"vi": {"bits_per_byte": 1.25}, "arc_vi": {"acc": 0.5, "acc_norm": 0.4, "n": 5}}}}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    assert convert(["megatron-to-hf", "--checkpoint", str(run), "--dtype", "fp32", "--output", str(release),
                    "--eval", str(tmp_path / "eval.json")]) == 0
    assert (release / "tokenizer.json").read_bytes() == (recipe / "tokenizer" / "tokenizer.json").read_bytes()
    _check_model_card(release / "README.md", recipe)
    exported = _tensors(release)
    base = HFCheckpointReader(recipe / "base_llama")
    init = resizing_reader(base.__getitem__, str(recipe / "base_tokenizer" / "tokenizer.model"),
                           str(recipe / "tokenizer" / "tokenizer.model"), "subword-mean")
    for name in base.weight_map:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(exported[name][:1000], base[name]), f"stage 1 moved base rows of {name}"
            assert not torch.equal(exported[name][1000:], init(name)[1000:]), f"new rows of {name} did not train"
        else:
            assert torch.equal(exported[name], base[name]), f"stage 1 changed {name}"

    saved = run / (run / "latest").read_text().strip()  # a config that does not match what is stored
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    refused = _convert("megatron-to-hf", "--checkpoint", str(run), "--output", str(tmp_path / "bad"))
    assert refused.returncode == 2 and "2 layers stored, config.json says 3" in refused.stderr, refused.stderr[-2000:]
    assert not _complete_outputs(tmp_path / "bad")


def _check_model_card(card: Path, recipe: Path) -> None:
    """Front matter HF reads (license, languages, base model, datasets) and the body's stage,
    tokenizer and evaluation tables, from the run's own records."""
    import yaml

    text = card.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "other" and "check it before publishing" in text, "the base has no card: say so"
    assert front["language"] == ["vi", "en"] and front["base_model"] == "base_llama", front
    assert front["datasets"] == ["mt", "vi"], front
    report = json.loads((recipe / "tokenizer" / "report.json").read_text())
    assert f"| stage1 | 3 | {3 * 4 * 64:,} | new_vocab_rows |" in text, text  # 3 steps × 4 samples × 64 tokens
    vi = report["fertility"]["vi"]
    assert f"| vi | {vi['base']:.4f} | {vi['extended']:.4f} |" in text, text
    assert "| vi bits_per_byte | 2.5000 | 1.2500 |" in text and "| arc_vi acc | 0.2500 | 0.5000 |" in text, text


def _complete_outputs(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if not p.name.startswith(".")] if directory.exists() else []


def test_bad_inputs_are_refused(recipe, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(recipe / "base_llama", hf)
    args = ["hf-to-megatron", "--hf-dir", str(hf), "--tokenizer-dir", str(recipe / "tokenizer"),
            "--base-tokenizer", str(recipe / "base_tokenizer" / "tokenizer.model"), "--output", str(tmp_path / "out")]
    refused = _convert(*args, "--tp", "3")
    assert refused.returncode == 2 and "tensor parallel size 3 does not divide" in refused.stderr, refused.stderr[-2000:]

    shard = next(hf.glob("*.safetensors"))
    index = {"metadata": {}, "weight_map": {k: shard.name for k in load_file(shard)}}
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    refused = _convert(*args)
    assert refused.returncode == 2 and "index has no entry for model.layers.1.mlp.up_proj.weight" in refused.stderr, \
        refused.stderr[-2000:]

    (hf / "model.safetensors.index.json").unlink()
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    refused = _convert(*args)
    assert refused.returncode == 2 and shard.name in refused.stderr, refused.stderr[-2000:]
    assert not _complete_outputs(tmp_path / "out"), "a refused conversion left output behind"


def test_reads_pytorch_bin_shards(recipe, tmp_path):
    """Older HF checkpoints: pytorch_model-*.bin with an index, read tensor for tensor the same."""
    source = HFCheckpointReader(recipe / "base_llama")
    names = sorted(source.weight_map)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, members in halves.items():
        torch.save({n: source[n] for n in members}, tmp_path / shard)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {n: shard for shard, members in halves.items() for n in members}}))
    reader = HFCheckpointReader(tmp_path)
    assert all(torch.equal(reader[n], source[n]) for n in names)


@pytest.mark.distributed
def test_training_starts_from_a_converted_checkpoint(recipe, tmp_path):
    start = hf_to_megatron(recipe / "base_llama", recipe / "tokenizer", tmp_path / "start",
                           recipe / "base_tokenizer" / "tokenizer.model")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_adapt.pretrain",
           "--config", str(recipe / "config.yaml"), "--set", f"checkpoint.save={run}", "--set", f"model.init_from={start}",
           "--set", "train.steps=3", "--set", "optim.warmup_steps=1", "--set", "train.freeze={train: new_vocab_rows}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "done").exists()
    # Frozen weights after training are the converted ones: the run started from that checkpoint.
    for name in ("start", "run"):
        convert(["megatron-to-hf", "--checkpoint", str(tmp_path / name), "--tokenizer-dir", str(recipe / "tokenizer"),
                 "--dtype", "fp32", "--output", str(tmp_path / f"{name}_hf")])
    converted, trained = _tensors(tmp_path / "start_hf"), _tensors(tmp_path / "run_hf")
    for name, tensor in converted.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(trained[name][:1000], tensor[:1000]), f"{name}: base rows differ from the conversion"
        else:
            assert torch.equal(trained[name], tensor), f"{name} differs from the converted checkpoint"


def test_plain_conversion_is_exact_and_a_bare_tokenizer_model_exports(recipe, tmp_path):
    """A tokenizer that adds nothing keeps the vocabulary size (no bogus row) and every tensor both
    ways; a tokenizer directory holding only tokenizer.model exports with HF files written from it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    base_tok = recipe / "base_tokenizer"
    assert [p.name for p in base_tok.iterdir()] == ["tokenizer.model"]
    start = hf_to_megatron(recipe / "base_llama", base_tok, tmp_path / "start", base_tok / "tokenizer.model")
    release = megatron_to_hf(start, tmp_path / "release", base_tok, dtype=torch.float32)
    original = HFCheckpointReader(recipe / "base_llama")
    for directory in (start / "iter_0000000" / "model", release):
        tensors = _tensors(directory)
        assert set(tensors) == set(original.weight_map), f"{directory}: tensor names differ"
        for name, tensor in tensors.items():
            assert torch.equal(tensor, original[name]), f"{directory}: {name} changed in a plain conversion"
    assert json.loads((release / "config.json").read_text())["vocab_size"] == 1000
    text = "The quick brown fox, 42 times."
    expected = spm.SentencePieceProcessor(model_file=str(base_tok / "tokenizer.model")).encode(text)
    assert AutoTokenizer.from_pretrained(release)(text)["input_ids"] == [1] + expected, "exported tokenizer differs"


def test_tied_checkpoint_with_another_lm_head_is_refused(recipe, tmp_path):
    hf = tied_copy(recipe / "base_llama", tmp_path / "tied", lm_head="different")
    with pytest.raises(ValueError, match=r"tied.*tie_word_embeddings=true but lm_head.weight differs"):
        hf_to_megatron(hf, recipe / "tokenizer", tmp_path / "out", base_tokenizer=recipe / "base_tokenizer")
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_base_tokenizer_of_another_model_is_refused(recipe, smollm2_tokenizer, smollm2_vi, tmp_path):
    """SmolLM2's extended tokenizer for the recipe's 1000-row model: the base has 49152 ids."""
    with pytest.raises(ValueError, match=r"tokenizer.json has 49152 tokens but the checkpoint has 1000 embedding rows"):
        hf_to_megatron(recipe / "base_llama", smollm2_vi, tmp_path / "out",
                       base_tokenizer=smollm2_tokenizer)
    assert not (tmp_path / "out").exists()


def test_qwen_padding_rows_are_dropped_and_added_rows_follow_the_tokenizer(qwen_tokenizer, qwen_vi, tmp_path):
    """A Qwen2 checkpoint with Qwen's 151936 rows for its tokenizer's fewer ids (padding no token
    reaches), its real tokenizer extended with about 2000 Vietnamese pieces: exported, it has the extended tokenizer's
    rows — the base ids' rows unchanged, the padding gone, each added row the mean of its base
    pieces' rows — and HF gives the base model's logits for every base id."""
    import transformers

    from megatron_adapt.tokenizer.load import load_tokenizer

    base_tok, new_tok = load_tokenizer(qwen_tokenizer), load_tokenizer(qwen_vi)
    base_vocab = base_tok.vocab_size
    report = json.loads((qwen_vi / "report.json").read_text())
    assert new_tok.vocab_size == base_vocab + report["added"] > base_vocab + 1900, report
    assert report["unreachable_added"] == 0, report
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    hf = tmp_path / "qwen"
    model.save_pretrained(hf)
    shutil.copy(qwen_tokenizer / "tokenizer.json", hf / "tokenizer.json")

    hf_to_megatron(hf, qwen_vi, tmp_path / "start")
    assert convert(["megatron-to-hf", "--checkpoint", str(tmp_path / "start"), "--output", str(tmp_path / "release"),
                    "--dtype", "fp32"]) == 0
    release = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "release")
    assert type(release).__name__ == "Qwen2ForCausalLM" and release.config.vocab_size == new_tok.vocab_size
    old, new = model.model.embed_tokens.weight.detach(), release.model.embed_tokens.weight.detach()
    assert torch.equal(new[:base_vocab], old[:base_vocab]), "base rows changed"
    added = new_tok.tokens(base_vocab)
    for k in (0, len(added) // 2, len(added) - 1):
        ids = base_tok.subword_ids([added[k]])[0]
        assert torch.allclose(new[base_vocab + k], old[ids].mean(0), atol=1e-6), \
            f"row of added piece {added[k]!r} is not its base pieces' mean (padding rows leaked in?)"
    text = "Hà Nội là thủ đô của Việt Nam. The capital of Vietnam is Hanoi."
    tokens = torch.tensor([base_tok.hf_tokenizer.encode(text).ids])
    with torch.no_grad():
        expected, got = model(tokens).logits[..., :base_vocab], release(tokens).logits[..., :base_vocab]
    assert torch.allclose(got, expected, atol=1e-5), f"base ids' logits moved by {(got - expected).abs().max():.2e}"
