"""Translation prompts carry no loss; bad configs are refused, by name, before a model is built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_adapt.checkpoint.format import CheckpointMeta
from megatron_adapt.data.blend import load_blend
from megatron_adapt.training.config import ConfigError, load_config
from megatron_adapt.training.data import DatasetTokenizer, build_datasets
from megatron_adapt.training.plan import plan_run
from tests.multiprocess import run_ranks


def _rank_samples(recipe) -> list[dict]:
    entries = [e for e in load_blend(recipe / "blend.json") if e.group == "mt"]
    entries = [type(e)(e.group, e.prefix, e.tokens, 1.0) for e in entries]
    train, _ = build_datasets(entries, 64, 1234, "100,0,0", 40, 0, DatasetTokenizer(1500, 2), str(recipe / "cache"))
    return [train[k] for k in range(20)]


@pytest.fixture(scope="module")
def samples(recipe) -> list[dict]:
    (result,) = run_ranks(_rank_samples, recipe)
    return result


@pytest.mark.distributed
def test_loss_mask_is_the_target_mask(recipe, samples):
    """Each training sample's loss mask says 'target' exactly where the preprocessed target mask
    does for the predicted token. Samples concatenate shuffled documents, so each position is
    located in the raw data by the 8 tokens ending at it (used when all occurrences agree)."""
    tokens = IndexedDataset(str(recipe / "data" / "mt"))
    masks = IndexedDataset(str(recipe / "data" / "mt_targetmask"))
    window = 8
    seen: dict[bytes, set[int]] = {}
    for d in range(len(tokens)):
        t, m = np.array(tokens[d]), np.array(masks[d])
        for end in range(window - 1, len(t)):
            seen.setdefault(t[end - window + 1:end + 1].tobytes(), set()).add(int(m[end]))
    checked = {0: 0, 1: 0}
    for k, sample in enumerate(samples):
        seq = torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy().astype(np.array(tokens[0]).dtype)
        for end in range(window - 1, len(seq)):
            values = seen.get(seq[end - window + 1:end + 1].tobytes())
            if values is None or len(values) != 1:
                continue
            (expected,) = values
            assert sample["loss_mask"][end - 1].item() == expected, f"sample {k}, position {end}: mask mismatch"
            checked[expected] += 1
    assert checked[0] > 50 and checked[1] > 50, f"too few positions located: {checked}"


def _rank_prompt_labels_do_not_matter(batch: dict) -> list[float]:
    from megatron_adapt.model.loss import masked_sum, token_losses

    torch.manual_seed(0)
    logits = torch.randn(*batch["tokens"].shape, 1500)
    out = []
    for labels in (batch["labels"], batch["prompt_scrambled"], batch["target_scrambled"]):
        total, count = masked_sum(token_losses(logits.clone(), labels, 1500), batch["loss_mask"])
        out.append((total / count).item())
    return out


@pytest.mark.distributed
def test_prompt_tokens_contribute_nothing(samples):
    sample = next(s for s in samples if 0 < s["loss_mask"].sum() < len(s["loss_mask"]))
    labels, mask = sample["labels"].unsqueeze(0), sample["loss_mask"].unsqueeze(0)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 1500, labels.shape, generator=gen)
    batch = dict(tokens=sample["tokens"].unsqueeze(0), labels=labels, loss_mask=mask,
                 prompt_scrambled=torch.where(mask == 0, noise, labels),
                 target_scrambled=torch.where(mask == 1, noise, labels))
    (losses,) = run_ranks(_rank_prompt_labels_do_not_matter, batch)
    assert losses[0] == losses[1], "changing prompt labels changed the loss"
    assert losses[0] != losses[2], "changing target labels did not change the loss"


def _write(recipe, tmp_path, **edits) -> str:
    config = yaml.safe_load((recipe / "config.yaml").read_text())
    for key, value in edits.items():
        section, leaf = key.split("__")
        config[section][leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_unknown_key_is_named(recipe, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key optim.learning_rate"):
        load_config(_write(recipe, tmp_path, optim__learning_rate=1.0))
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_config(recipe / "config.yaml", ["train.steps=many"])


def test_missing_data_prefix_is_named(recipe, tmp_path):
    blend = json.loads((recipe / "blend.json").read_text())
    blend["datasets"][0]["prefix"] = str(tmp_path / "gone" / "vi")
    (tmp_path / "blend.json").write_text(json.dumps(blend))
    config = load_config(recipe / "config.yaml", [f"data.blend={tmp_path / 'blend.json'}"])
    with pytest.raises(FileNotFoundError, match=r"gone/vi has no .*gone/vi\.bin"):
        plan_run(config)


def _fake_checkpoint(recipe, run, vocab_size: int, optimizer: str = "replicated",
                     optimizer_format: str = "fully_reshardable") -> None:
    """What plan_run reads of a run's latest checkpoint (its config and meta), nothing more."""
    (run / "iter_0000001").mkdir(parents=True)
    cfg = json.loads((recipe / "base_llama" / "config.json").read_text())
    (run / "iter_0000001" / "config.json").write_text(json.dumps(dict(cfg, vocab_size=vocab_size)))
    meta = CheckpointMeta(iteration=1, consumed_samples=0, layout={"tp": 1, "pp": 1, "world": 1},
                          contents=["model", "optimizer", "rng"], optimizer=optimizer,
                          optimizer_format=optimizer_format)
    (run / "iter_0000001" / "meta.json").write_text(meta.to_json())
    (run / "latest").write_text("iter_0000001")


def test_resume_with_another_kind_of_optimizer_is_refused(recipe, tmp_path):
    _fake_checkpoint(recipe, tmp_path / "run", vocab_size=1500, optimizer="distributed")
    config = load_config(recipe / "config.yaml", [f"checkpoint.save={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="saved by the distributed optimizer, this run uses the replicated"):
        plan_run(config)


def test_dp_reshardable_optimizer_state_resumes_only_at_its_layout(recipe, tmp_path, monkeypatch):
    """Routine saves write each rank's optimizer shard (no gather of the whole state on every DP
    rank); such a checkpoint resumes at another DP size only, and another TP/PP is refused by name."""
    from megatron_adapt.training import plan as plan_module

    monkeypatch.setattr(plan_module, "optimizer_kind_for_this_machine", lambda: "distributed")
    _fake_checkpoint(recipe, tmp_path / "run", vocab_size=1500, optimizer="distributed", optimizer_format="dp_reshardable")
    at_tp2 = load_config(recipe / "config.yaml", [f"checkpoint.save={tmp_path / 'run'}"])  # the recipe config: TP=2
    with pytest.raises(ConfigError, match="parallel: .* TP 1 × PP 1 × CP 1 .*optimizer_format=fully_reshardable"):
        plan_run(at_tp2)
    at_tp1 = load_config(recipe / "config.yaml", [f"checkpoint.save={tmp_path / 'run'}", "parallel.tp=1"])
    assert plan_run(at_tp1).resuming


def test_tokenizer_that_does_not_match_the_checkpoint(recipe, tmp_path):
    # resume-style check: a run whose checkpoint has another vocabulary size than the tokenizer
    _fake_checkpoint(recipe, tmp_path / "run", vocab_size=1000)
    config = load_config(recipe / "config.yaml", [f"checkpoint.save={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"model.tokenizer: .* has 1500 pieces but checkpoint .* has 1000"):
        plan_run(config)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_configs_parse_and_validate(path, tmp_path):
    """Every shipped config builds and passes the checks a run makes, its files stood in for by
    existing ones (the 7B configs name checkpoints and data the user brings)."""
    from megatron_adapt.training.config import Config, _build

    config = _build(Config, yaml.safe_load(path.read_text()))
    for section, key in (("model", "hf_dir"), ("model", "tokenizer"), ("model", "init_from"), ("data", "blend")):
        if getattr(getattr(config, section), key):
            setattr(getattr(config, section), key, str(tmp_path))
    config.validate()


def test_stage1_needs_the_base_tokenizer_to_find_new_rows(recipe, tmp_path):
    _fake_checkpoint(recipe, tmp_path / "run", vocab_size=1500)
    config = load_config(recipe / "config.yaml", [f"checkpoint.save={tmp_path / 'run'}",
                                                  f"model.base_tokenizer={tmp_path / 'nope.model'}",
                                                  "train.freeze={train: new_vocab_rows}"])
    with pytest.raises(ConfigError, match="model.base_tokenizer: .*nope.model does not exist"):
        plan_run(config)


def test_pretrain_refuses_an_unsupported_model_by_name(recipe, tmp_path, capsys):
    import shutil

    from megatron_adapt.pretrain import main

    hf = tmp_path / "hf"
    shutil.copytree(recipe / "base_llama", hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, hidden_act="gelu")))
    assert main(["--config", str(recipe / "config.yaml"), "--set", f"model.hf_dir={hf}",
                 "--set", f"checkpoint.save={tmp_path / 'run'}"]) == 2
    assert "hidden_act='gelu'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "a refused run created its run directory"


def test_bad_settings_are_refused_before_distributed_init(recipe, tmp_path, monkeypatch, capsys):
    from megatron_adapt import distributed
    from megatron_adapt.pretrain import main

    started = []
    monkeypatch.setattr(distributed, "initialize", lambda *args, **kwargs: started.append(args))
    base = ["--config", str(recipe / "config.yaml"), "--set", f"checkpoint.save={tmp_path / 'run'}"]
    assert main(base + ["--set", "model.init_method=zeros"]) == 2
    assert "model.init_method: 'zeros' is not one of subword-mean, mean, multivariate-normal" in capsys.readouterr().err
    assert main(base + ["--set", "train.freeze={train: everything}"]) == 2
    assert "train.freeze.train: 'everything' is not one of all, new_vocab_rows" in capsys.readouterr().err
    assert not started, "distributed.initialize ran for a config that had to be refused"
    assert not (tmp_path / "run").exists(), "a refused run created its run directory"


def test_end_of_document_id_is_not_guessed(recipe, tmp_path):
    """LLaMA-3 configs give eos_token_id as a list: without the data's tokenizer the EOD id is unknown."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(recipe / "base_llama", hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=[2, 7])))
    config = load_config(recipe / "config.yaml", [f"model.hf_dir={hf}", "model.tokenizer=",
                                                  f"checkpoint.save={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"model.tokenizer: config.json's eos_token_id is \[2, 7\]"):
        plan_run(config)
    assert plan_run(load_config(recipe / "config.yaml", [f"model.hf_dir={hf}", f"checkpoint.save={tmp_path / 'r'}"])
                    ).eod_id == 2, "the data's tokenizer names the EOD id"


def test_plan_for_a_tied_byte_level_bpe_model(recipe, smollm2_hf, smollm2_vi, tmp_path):
    """SmolLM2 (tied, tokenizer.json only) with its Vietnamese extension: the base tokenizer is found in
    hf_dir, the vocabulary grows to the extension, stage 1 trains from the base's last id on."""
    config = load_config(recipe / "config.yaml", [
        f"model.hf_dir={smollm2_hf}", f"model.tokenizer={smollm2_vi}", "model.base_tokenizer=",
        "train.freeze.train=new_vocab_rows", f"checkpoint.save={tmp_path / 'run'}", "parallel.tp=1"])
    plan = plan_run(config)
    assert plan.base_tokenizer.endswith("tokenizer.json") and plan.base_vocab == 49152
    from megatron_adapt.tokenizer.load import load_tokenizer

    assert plan.arch.vocab_size == load_tokenizer(smollm2_vi).vocab_size > 49152 and plan.arch.tie_word_embeddings
    eos = json.loads((smollm2_vi / "tokenizer_config.json").read_text())["eos_token"]
    from tokenizers import Tokenizer
    assert plan.eod_id == Tokenizer.from_file(str(smollm2_vi / "tokenizer.json")).token_to_id(eos)
    assert plan.first_trainable_row(config) == 49152


def test_vocab_lr_keys(recipe):
    config = load_config(recipe / "config.yaml", ["optim.vocab_lr=3e-3", "optim.vocab_min_lr=3e-4"])
    assert (config.optim.vocab_lr, config.optim.vocab_min_lr) == (3e-3, 3e-4)
    assert load_config(recipe / "config.yaml", ["optim.vocab_lr=null"]).optim.vocab_lr is None
    with pytest.raises(ConfigError, match="optim.vocab_min_lr needs optim.vocab_lr"):
        load_config(recipe / "config.yaml", ["optim.vocab_min_lr=1e-4"])
    with pytest.raises(ConfigError, match="optim.vocab_lr: expected float, got 'fast'"):
        load_config(recipe / "config.yaml", ["optim.vocab_lr=fast"])
    with pytest.raises(ConfigError, match="optim.vocab_lr=1e-05 must be at least"):
        load_config(recipe / "config.yaml", ["optim.vocab_lr=1e-5", "optim.vocab_min_lr=1e-4"])


def test_performance_keys_reach_megatron_core(recipe):
    """Megatron-LM's names; what this machine cannot do (gradient-accumulation fusion needs apex's
    CUDA kernel) is turned off rather than failing inside megatron-core; SP is off at TP=1 as there."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_adapt.training.config import transformer_overrides

    sets = ["parallel.sequence_parallel=true", "train.recompute=selective", "model.attention_backend=flash",
            "train.gradient_accumulation_fusion=true", "ddp.overlap_grad_reduce=true", "ddp.bucket_size=40000000"]
    config = load_config(recipe / "config.yaml", sets)
    overrides = transformer_overrides(config)
    assert overrides["sequence_parallel"] is True and overrides["recompute_granularity"] == "selective"
    assert overrides["attention_backend"] is AttnBackend.flash and overrides["calculate_per_token_loss"] is True
    assert overrides["gradient_accumulation_fusion"] is False, "no apex kernel on a CPU machine"
    assert (config.ddp.overlap_grad_reduce, config.ddp.bucket_size) == (True, 40_000_000)
    assert transformer_overrides(load_config(recipe / "config.yaml", sets + ["parallel.tp=1"]))["sequence_parallel"] is False
    with pytest.raises(ConfigError, match="model.attention_backend: 'cudnn' is not one of auto, flash, fused, unfused"):
        load_config(recipe / "config.yaml", ["model.attention_backend=cudnn"])
    with pytest.raises(ConfigError, match="ddp.bucket_size=0 must be positive"):
        load_config(recipe / "config.yaml", ["ddp.bucket_size=0"])


def test_context_parallel_keys(recipe):
    """CP reaches megatron-core's TransformerConfig; what it cannot do is refused naming the key:
    per-document masks (the ranks hold parts of the sequence), a sequence that does not split into
    2 chunks per CP rank (and again over TP under sequence parallelism)."""
    from megatron_adapt.training.config import transformer_overrides

    config = load_config(recipe / "config.yaml", ["parallel.context_parallel=2"])  # seq_length 64
    assert transformer_overrides(config)["context_parallel_size"] == 2
    with pytest.raises(ConfigError, match="parallel.context_parallel: causal attention only; data.per_document_attention"):
        load_config(recipe / "config.yaml", ["parallel.context_parallel=2", "data.per_document_attention=true"])
    with pytest.raises(ConfigError, match=r"data.seq_length=60 must be a multiple of 8 \(2 chunks per context-parallel rank\)"):
        load_config(recipe / "config.yaml", ["parallel.context_parallel=4", "data.seq_length=60"])
    with pytest.raises(ConfigError, match=r"data.seq_length=36 must be a multiple of 8 \(2 chunks per context-parallel rank × TP\)"):
        load_config(recipe / "config.yaml", ["parallel.context_parallel=2", "parallel.sequence_parallel=true",
                                             "data.seq_length=36"])
    with pytest.raises(ConfigError, match="parallel.context_parallel=0 must be at least 1"):
        load_config(recipe / "config.yaml", ["parallel.context_parallel=0"])
