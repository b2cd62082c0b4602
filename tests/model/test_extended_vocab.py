"""Extended vocabulary in the megatron-core model: resize, initialize, freeze the original rows.

A LLaMA-like base tokenizer (1000 pieces, trained here on English) is extended with Vietnamese
pieces by tools' own pipeline; a tiny HF LLaMA over the base vocabulary is resized to it.
"""

from __future__ import annotations

import json
import lzma

import pytest
import sentencepiece as spm
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_adapt.checkpoint.hf import HFCheckpointReader
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
from megatron_adapt.model.resize import (
    VocabMismatchError,
    check_extends,
    new_rows,
    resizing_reader,
)
from megatron_adapt.model.weights import export_hf_state, load_hf_state
from megatron_adapt.tokenizer.extend import ExtendConfig, extend_tokenizer
from megatron_adapt.tokenizer.load import load_tokenizer
from megatron_adapt.tokenizer.sentencepiece_model import load_model_proto, processor
from megatron_adapt.tokenizer.train_base import train_llama_like
from megatron_adapt.training.step import forward_backward
from tests.multiprocess import run_ranks
from tests.shared_data import GUTENBERG, VIWIKI, require

BASE_VOCAB, SEQ = 1000, 32


def _lines(path, docs: int) -> list[str]:
    out = []
    with lzma.open(path, "rt") as f:
        for _, line in zip(range(docs), f):
            out += [l for l in json.loads(line)["text"].split("\n") if l.strip()]
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    require(GUTENBERG, VIWIKI)
    root = tmp_path_factory.mktemp("tok")
    base = train_llama_like(_lines(GUTENBERG, 1)[:3000], BASE_VOCAB, root / "base" / "tokenizer.model")
    vi = root / "vi.txt"
    vi.write_text("\n".join(_lines(VIWIKI, 150)))
    extend_tokenizer(ExtendConfig(base_model=base, corpus=[vi], num_new_tokens=300, output_dir=root / "ext",
                                  lang="vi", progress=False))
    return str(base), str(root / "ext" / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=BASE_VOCAB,
                                         max_position_embeddings=SEQ)).float()
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return str(directory)


def test_subword_mean_is_mean_of_base_tokenization(tokenizers):
    base_file, new_file = tokenizers
    added = [p.piece for p in load_model_proto(new_file).pieces[BASE_VOCAB:]]
    old = torch.randn(BASE_VOCAB, 16, dtype=torch.float64)
    rows = new_rows(old, "subword-mean", len(added), load_tokenizer(base_file).subword_ids(added))
    base = spm.SentencePieceProcessor(model_file=base_file)  # dummy prefix on: "nhà" → "▁nhà"
    inner = spm.SentencePieceProcessor(model_file=base_file)
    inner.load_from_serialized_proto(processor(load_model_proto(base_file), False).serialized_model_proto())
    checked = 0
    for k, piece in enumerate(added):
        ids = base.encode(piece[1:]) if piece.startswith("\u2581") else inner.encode(piece)
        assert torch.allclose(rows[k].double(), old[ids].mean(0), atol=1e-12), f"row of {piece!r}"
        checked += piece.startswith("\u2581")
    assert 0 < checked < len(added), "expected both word-initial and word-internal pieces"


def test_refuses_tokenizers_that_do_not_extend(tokenizers, tmp_path):
    base_file, new_file = tokenizers
    base = load_tokenizer(base_file)
    check_extends(base, load_tokenizer(new_file), BASE_VOCAB)  # the real extension passes
    other = train_llama_like(_lines(GUTENBERG, 2)[-3000:], BASE_VOCAB + 50, tmp_path / "other.model")
    with pytest.raises(VocabMismatchError, match=r"id \d+ differs"):
        check_extends(base, load_tokenizer(other), BASE_VOCAB)
    smaller = train_llama_like(_lines(GUTENBERG, 1)[:3000], 900, tmp_path / "small.model")
    with pytest.raises(VocabMismatchError, match="fewer than the base tokenizer's 1000: first missing id 900"):
        check_extends(base, load_tokenizer(smaller), BASE_VOCAB)


def _rank_resize_freeze_train(hf_dir: str, base_file: str, new_file: str, tokens: torch.Tensor, steps: int) -> dict:
    reader = HFCheckpointReader(hf_dir)
    get = resizing_reader(reader.__getitem__, base_file, new_file, "subword-mean")
    new_vocab = get("model.embed_tokens.weight").shape[0]
    arch = LlamaArchitecture.from_hf_config(hf_dir).with_vocab_size(new_vocab)
    freeze = FreezePolicy(train="new_vocab_rows")
    model = build_llama(arch, seq_length=SEQ, first_trainable_row=freeze.first_trainable_row(BASE_VOCAB))
    load_hf_state(model, get)

    captured: list[torch.Tensor] = []
    batches = [dict(tokens=tokens[i:i + 1], labels=torch.roll(tokens[i:i + 1], -1, 1)) for i in range(len(tokens))]
    base_only = [dict(tokens=t % BASE_VOCAB, labels=t % BASE_VOCAB) for t in (tokens[:1],)]
    for probe in (batches[:1], base_only):
        forward_backward(model, probe, forward_only=True,
                         on_logits=lambda l: captured.append(gather_from_tensor_model_parallel_region(l)))

    trainable = apply_freeze_policy(model, freeze)
    expected = 0  # rows of this rank's vocabulary slices that fall in [base vocab, new vocab)
    layers = [model.embedding.word_embeddings] if model.pre_process else []
    layers += [model.output_layer] if model.post_process else []
    for layer in layers:
        rows = layer.all_rows.shape[0]
        start = parallel_state.get_tensor_model_parallel_rank() * rows
        expected += max(0, min(start + rows, new_vocab) - max(start, BASE_VOCAB)) * arch.hidden_size
    before = export_hf_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        forward_backward(model, batches)
        optimizer.step()
    after = export_hf_state(model)
    state_numel = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    last = parallel_state.is_pipeline_last_stage()
    return dict(logits=captured[0][..., :new_vocab] if last else None,
                base_logits=captured[1][..., :BASE_VOCAB] if last else None,
                trainable=trainable, expected=expected, state_numel=state_numel,
                grad_numel=sum(p.grad.numel() for p in model.parameters() if p.grad is not None),
                before=before, after=after, new_vocab=new_vocab)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [pytest.param(2, 1, id="tp2"), pytest.param(1, 2, id="pp2")])
def test_resized_model_and_stage1_freezing(tokenizers, hf_base, tp, pp):
    from transformers import LlamaConfig, LlamaForCausalLM

    base_file, new_file = tokenizers
    new_vocab = len(load_model_proto(new_file).pieces)
    tokens = torch.cat([torch.randint(0, BASE_VOCAB, (2, SEQ // 2)), torch.randint(BASE_VOCAB, new_vocab, (2, SEQ // 2))], 1)
    tokens = tokens[:, torch.randperm(SEQ, generator=torch.Generator().manual_seed(0))]
    results = run_ranks(_rank_resize_freeze_train, hf_base, base_file, new_file, tokens, 3, tp=tp, pp=pp)

    # HF references: the resized weights in LlamaForCausalLM, and the un-resized model.
    reader = HFCheckpointReader(hf_base)
    get = resizing_reader(reader.__getitem__, base_file, new_file, "subword-mean")
    config = LlamaConfig.from_pretrained(hf_base)
    original = LlamaForCausalLM.from_pretrained(hf_base).float()
    config.vocab_size = new_vocab
    resized = LlamaForCausalLM(config).float()
    resized.load_state_dict({n: get(n) for n in reader.weight_map}, strict=True)
    with torch.no_grad():
        ref_resized = resized(tokens[:1]).logits
        ref_original = original(tokens[:1] % BASE_VOCAB).logits
    last = [r for r in results if r["logits"] is not None]
    assert last, "no rank reported logits"
    for r in last:
        diff = (r["logits"] - ref_resized).abs().max().item()
        assert diff <= 1e-4, f"full-vocab logits differ from HF with the resized weights by {diff:.2e}"
        diff = (r["base_logits"] - ref_original).abs().max().item()
        assert diff <= 1e-4, f"on base ids, base-vocab logits differ from the un-resized model by {diff:.2e}"

    for rank, r in enumerate(results):
        assert r["trainable"] == r["expected"], f"rank {rank}: {r['trainable']} trainable, expected {r['expected']}"
        assert r["state_numel"] == 2 * r["expected"], f"rank {rank}: optimizer state {r['state_numel']} != 2×new rows"
        assert r["grad_numel"] == r["expected"], f"rank {rank}: gradients held for {r['grad_numel']} values"
    assert sum(r["expected"] for r in results) > 0
    before = {k: v for r in results for k, v in r["before"].items()}
    after = {k: v for r in results for k, v in r["after"].items()}
    for name, tensor in before.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[name][:BASE_VOCAB], tensor[:BASE_VOCAB]), f"base rows of {name} moved"
            assert not torch.equal(after[name][BASE_VOCAB:], tensor[BASE_VOCAB:]), f"new rows of {name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"frozen {name} changed"
