"""LoRA on megatron-core equals HF PEFT LoRA, and trains only what it should.

- Same base weights, same adapters (non-zero B, so the adapters matter): megatron-core at
  TP=2×PP=2 through its 1F1B schedule, with and without sequence parallelism, gives PEFT's
  ``LlamaForCausalLM`` logits and every adapter gradient (fp32, ≤ 1e-4); no base weight gets a
  gradient.
- Steps through megatron-core's DDP, gradient finalization and Adam at TP=2 with the added
  vocabulary rows training beside the adapters: every base weight (transformer and base rows)
  stays bit-identical, and optimizer state exists exactly for the adapters and the added rows on
  each rank.
- The adapters' dropout draws one mask where TP ranks share an input and one per rank otherwise.
- Bad LoRA settings are refused by key while the config is read.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_ranks, sum_sequence_parallel_grads

VOCAB, BASE_VOCAB, SEQ, RANK, ALPHA = 500, 400, 16, 4, 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_reference(tmp_path_factory):
    return build_peft_reference(tmp_path_factory)


@pytest.fixture(scope="module")
def family_peft_reference(request, tmp_path_factory):
    return build_peft_reference(tmp_path_factory, request.param)


def build_peft_reference(tmp_path_factory, family: str = "llama") -> dict:
    """A random tiny model (LLaMA; Qwen2 with q/k/v biases and tied embeddings; Qwen3 with q/k
    norms) with PEFT adapters (non-zero B): its base weights saved as an HF directory, its logits,
    loss and adapter gradients on a fixed batch (fp32, CPU)."""
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if family == "llama":
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    elif family == "qwen2":
        base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
    else:
        base = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=16))
    base = base.float()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias") or "_norm." in name:
                p.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("hf")
    base.save_pretrained(directory)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                                init_lora_weights=False))  # random B: the adapters count
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, 1)
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    loss.backward()
    adapters, grads = {}, {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            hf_name = name.removeprefix("base_model.model.").replace(".default", "")
            adapters[hf_name], grads[hf_name] = param.detach().clone(), param.grad.clone()
    return dict(dir=str(directory), tokens=tokens, labels=labels, logits=logits.detach(), loss=loss.item(),
                weights=base_state | adapters, grads=grads)


def _rank_lora_forward_backward(hf_dir: str, weights: dict, tokens, labels, sequence_parallel: bool,
                                use_transformer_engine: bool | None = None) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
    from megatron_adapt.model.lora import LoraConfig
    from megatron_adapt.model.weights import export_hf_grads, load_hf_state
    from megatron_adapt.training.step import forward_backward

    arch = LlamaArchitecture.from_hf_config(hf_dir)
    model = build_llama(arch, seq_length=SEQ, lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS),
                        use_transformer_engine=use_transformer_engine, sequence_parallel=sequence_parallel)
    load_hf_state(model, weights.__getitem__, adapters=True)
    apply_freeze_policy(model, FreezePolicy(train="none"))
    batches = [dict(tokens=tokens[i:i + 1], labels=labels[i:i + 1]) for i in range(len(tokens))]
    captured: list[torch.Tensor] = []
    loss = forward_backward(model, batches, on_logits=lambda l: captured.append(gather_from_tensor_model_parallel_region(l)))
    sum_sequence_parallel_grads(model)
    grads = {k: v for k, v in export_hf_grads(model).items() if "lora_" in k}
    base_grads = [n for n, p in model.named_parameters() if ".lora." not in n and p.grad is not None]
    last = parallel_state.is_pipeline_last_stage()
    return dict(loss=loss.mean if loss else None, logits=torch.cat(captured)[..., :VOCAB] if last else None, grads=grads,
                base_grads=base_grads)


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["", "sequence-parallel"])
def test_lora_matches_peft_at_tp2_pp2(peft_reference, sequence_parallel):
    ref = peft_reference
    results = run_ranks(_rank_lora_forward_backward, ref["dir"], ref["weights"], ref["tokens"], ref["labels"],
                        sequence_parallel, tp=2, pp=2)
    last = [r for r in results if r["logits"] is not None]
    assert last, "no rank reported logits"
    for r in last:
        diff = (r["logits"] - ref["logits"]).abs().max().item()
        assert diff <= 1e-4, f"logits differ from PEFT by {diff:.2e}"
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    grads = {k: v for r in results for k, v in r["grads"].items()}
    assert set(grads) == set(ref["grads"]), f"adapters differ: {sorted(set(grads) ^ set(ref['grads']))[:4]}"
    for name, expected in ref["grads"].items():
        diff = (grads[name] - expected).abs().max().item()
        assert diff <= 1e-4 * max(expected.abs().max().item(), 1e-3), f"grad of {name} differs from PEFT by {diff:.2e}"
    for rank, r in enumerate(results):
        assert not r["base_grads"], f"rank {rank}: base weights got gradients: {r['base_grads'][:3]}"


@pytest.mark.distributed
@pytest.mark.parametrize("family_peft_reference", ["qwen2", "qwen3"], indirect=True)
def test_lora_matches_peft_on_qwen(family_peft_reference):
    """PEFT's module names and computation on Qwen2 (adapters beside the q/k/v biases, tied
    embeddings) and Qwen3 (adapters before the q/k norms), at TP=2 with sequence parallelism."""
    ref = family_peft_reference
    results = run_ranks(_rank_lora_forward_backward, ref["dir"], ref["weights"], ref["tokens"], ref["labels"],
                        True, tp=2)
    for r in results:
        diff = (r["logits"] - ref["logits"]).abs().max().item()
        assert diff <= 1e-4, f"logits differ from PEFT by {diff:.2e}"
        assert not r["base_grads"], f"base weights got gradients: {r['base_grads'][:3]}"
    grads = {k: v for r in results for k, v in r["grads"].items()}
    assert set(grads) == set(ref["grads"]), f"adapters differ: {sorted(set(grads) ^ set(ref['grads']))[:4]}"
    for name, expected in ref["grads"].items():
        diff = (grads[name] - expected).abs().max().item()
        assert diff <= 1e-4 * max(expected.abs().max().item(), 1e-3), f"grad of {name} differs from PEFT by {diff:.2e}"


def _rank_lora_steps(hf_dir: str, tokens) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_adapt.checkpoint.hf import load_hf_checkpoint
    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
    from megatron_adapt.model.lora import LoraConfig
    from megatron_adapt.model.weights import export_hf_state
    from megatron_adapt.training.config import Config
    from megatron_adapt.training.optim import build_optimizer
    from megatron_adapt.training.step import forward_backward

    config = Config()
    config.optim.lr, config.optim.bf16 = 1e-2, False
    policy = FreezePolicy(train="new_vocab_rows")
    model = build_llama(LlamaArchitecture.from_hf_config(hf_dir), seq_length=SEQ, first_trainable_row=policy.first_trainable_row(BASE_VOCAB),
                        lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS))
    load_hf_checkpoint(model, hf_dir)
    apply_freeze_policy(model, policy)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    optimizer = build_optimizer(config, ddp, torch.float32, distributed=False)
    before = export_hf_state(model)
    batch = dict(tokens=tokens, labels=torch.roll(tokens, -1, 1))
    for _ in range(3):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, [batch])
        finalize_model_grads([ddp])
        optimizer.step()
    after = export_hf_state(model)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)
    rows = 0
    for layer in (model.embedding.word_embeddings, model.output_layer):
        start, stop = layer.trainable_span
        rows += (stop - start) * layer.all_rows.shape[1]
    state = sum(t.numel() for s in optimizer.optimizer.state.values() for t in s.values() if t.dim() > 0)
    return dict(before=before, after=after, expected_state=2 * (adapters + rows), state=state,
                tp_rank=parallel_state.get_tensor_model_parallel_rank())


@pytest.mark.distributed
def test_lora_steps_keep_the_base_and_hold_state_for_adapters_and_new_rows(peft_reference):
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    tokens[0, ::3] = torch.arange(BASE_VOCAB, BASE_VOCAB + len(tokens[0, ::3]))
    results = run_ranks(_rank_lora_steps, peft_reference["dir"], tokens, tp=2)
    for r in results:
        assert r["state"] == r["expected_state"], \
            f"TP rank {r['tp_rank']}: optimizer state {r['state']} values, expected 2 × (adapters + added rows)"
    before, after = results[0]["before"], results[0]["after"]
    for name, tensor in before.items():
        if "lora_A" in name:
            assert not torch.equal(after[name], tensor), f"adapter {name} did not train"
        elif "lora_B" not in name and name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[name][:BASE_VOCAB], tensor[:BASE_VOCAB]), f"base rows of {name} moved"
            assert not torch.equal(after[name][BASE_VOCAB:], tensor[BASE_VOCAB:]), f"added rows of {name} did not train"
        elif "lora_B" not in name:
            assert torch.equal(after[name], tensor), f"frozen base weight {name} changed"


def _rank_lora_dropout_masks(hf_dir: str, tokens, sequence_parallel: bool) -> list[tuple[str, bool, torch.Tensor]]:
    """(linear class, sharded, dropped-input mask) of each adapter dropout in a training forward."""
    from megatron_adapt.checkpoint.hf import load_hf_checkpoint
    from megatron_adapt.model import lora
    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
    from megatron_adapt.training.step import forward_backward

    model = build_llama(LlamaArchitecture.from_hf_config(hf_dir), seq_length=SEQ, sequence_parallel=sequence_parallel,
                        lora=lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS, dropout=0.5))
    load_hf_checkpoint(model, hf_dir)
    apply_freeze_policy(model, FreezePolicy(train="none"))
    masks, dropout = [], lora._LoraLinear._lora_input

    def recording(self, x, sharded):
        out = dropout(self, x, sharded)
        masks.append((type(self).__name__, sharded, (out == 0) & (x != 0)))
        return out

    lora._LoraLinear._lora_input = recording
    forward_backward(model.train(), [dict(tokens=tokens, labels=torch.roll(tokens, -1, 1))])
    return masks


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["", "sequence-parallel"])
def test_lora_dropout_masks_follow_the_tensor_parallel_split(peft_reference, sequence_parallel):
    """The adapters' dropout at TP=2 in a training forward: where both TP ranks hold the same input
    (column-parallel without SP) they drop the same entries, or A's all-reduced gradient would mix
    two masks; where each holds its own part (row-parallel columns, the sequence under SP) each
    rank draws its own mask. (Under SP megatron-core runs the whole block in the TP rank's RNG
    stream already; without SP the first case fails if the adapters fork that stream.)"""
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    first, second = run_ranks(_rank_lora_dropout_masks, peft_reference["dir"], tokens, sequence_parallel, tp=2)
    assert len(first) == len(second) == 8, f"expected 2 layers × 4 adapted linears per rank, got {len(first)}"
    for (linear, sharded, mask), (_, _, other) in zip(first, second):
        assert 0.4 < mask.float().mean() < 0.6, f"{linear}: dropped {mask.float().mean():.2f} of the input, not ~0.5"
        column = linear.startswith("LoraColumn")
        assert sharded == (not column or sequence_parallel), f"{linear}: sharded={sharded}"
        if sharded:
            assert not torch.equal(mask, other), f"{linear}: both TP ranks drew the same mask for different inputs"
        else:
            assert torch.equal(mask, other), f"{linear}: TP ranks dropped different entries of the same input"


@pytest.mark.parametrize("settings,message", [
    ("{rank: 0}", "train.lora: rank=0"), ("{rank: -1}", "train.lora: rank=-1"), ("{rank: 8, targets: [qkv]}", "train.lora: targets: 'qkv' matches no layer"),
    ("{rank: 8, targets: []}", "train.lora: targets: empty"), ("{rank: 8, dropout: 1.5}", "train.lora: dropout=1.5"),
    ("{rank: 8}", "train.lora: the base weights stay frozen under LoRA")])
def test_bad_lora_settings_are_refused_by_key(recipe, settings, message):
    """Refused while the config is read, before any model is built."""
    from megatron_adapt.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(recipe / "config.yaml", [f"train.lora={settings}"])


def _rank_lora_from_whole_checkpoint(hf_dir: str, run_dir: str) -> dict:
    from megatron_adapt.checkpoint import train_state
    from megatron_adapt.checkpoint.format import latest
    from megatron_adapt.checkpoint.hf import load_hf_checkpoint
    from megatron_adapt.model.build import build_llama
    from megatron_adapt.model.config import LlamaArchitecture
    from megatron_adapt.model.lora import LoraConfig
    from megatron_adapt.model.weights import export_hf_state

    arch = LlamaArchitecture.from_hf_config(hf_dir)
    whole = build_llama(arch, seq_length=SEQ)
    load_hf_checkpoint(whole, hf_dir)
    train_state.save(run_dir, 0, whole)
    lora = build_llama(arch, seq_length=SEQ, lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS))  # random base
    train_state.load(latest(run_dir), lora)
    want, got = export_hf_state(whole), export_hf_state(lora)
    return {name: torch.equal(tensor, got[name]) for name, tensor in want.items()}


@pytest.mark.distributed
def test_lora_model_starts_from_a_whole_model_checkpoint(peft_reference, tmp_path):
    """model.init_from a stage-1/2 checkpoint: every base tensor, vocabulary tables included, loads."""
    results = run_ranks(_rank_lora_from_whole_checkpoint, peft_reference["dir"], str(tmp_path / "run"), tp=2)
    missed = sorted({name for r in results for name, same in r.items() if not same})
    assert not missed, f"not loaded into the LoRA model: {missed[:4]}"


def test_unfused_te_norms_keep_the_checkpoint_names_of_the_local_spec():
    """Under LoRA the TE spec's norms are their own modules, as the local spec's are: the names it
    maps them to in a checkpoint (build.UNFUSED_NORM_KEYS) are megatron-core's local-spec map, so a
    whole-model checkpoint of either spec is read by a LoRA run on TE. (Building the TE spec needs TE.)"""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_adapt.model.build import UNFUSED_NORM_KEYS

    local = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert UNFUSED_NORM_KEYS.items() <= local.items(), f"{UNFUSED_NORM_KEYS} vs megatron-core's local spec {local}"
