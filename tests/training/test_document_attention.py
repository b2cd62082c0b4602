"""Packed conversations do not see each other with ``data.per_document_attention``.

Model: a sample packing conversation 1 and conversation 2 gives, on conversation 2's tokens, the
logits HF LlamaForCausalLM gives for conversation 2 alone, whatever conversation 1 holds (PP=2,
through megatron-core's pipeline schedule). Data: the segment ids a sample carries change exactly
where megatron-core's own reader says a new document begins.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_adapt.checkpoint.hf import load_hf_checkpoint
from megatron_adapt.data.blend import BlendEntry
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.training.data import DatasetTokenizer, build_datasets
from megatron_adapt.training.step import forward_backward
from tests.multiprocess import run_ranks

VOCAB, FIRST, SECOND = 500, 11, 13  # conversation lengths


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(config).float().eval()
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return model, str(directory)


def _rank_packed_logits(hf_dir: str, samples: list[torch.Tensor]) -> dict[bool, list] | None:
    """Conversation 2's logits in each sample, with and without per-document attention."""
    arch = LlamaArchitecture.from_hf_config(hf_dir)
    segments = torch.tensor([[0] * FIRST + [1] * SECOND])
    out = {}
    for per_document in (True, False):
        model = build_llama(arch, seq_length=FIRST + SECOND, per_document_attention=per_document)
        load_hf_checkpoint(model, hf_dir)
        captured: list[torch.Tensor] = []
        for tokens in samples:
            batch = dict(tokens=tokens, labels=torch.roll(tokens, -1, 1))
            if per_document:
                batch["segment_ids"] = segments
            forward_backward(model, [batch], forward_only=True, on_logits=captured.append)
        out[per_document] = [c[0, FIRST:, :VOCAB] for c in captured]
    return out if out[True] else None


@pytest.mark.distributed
def test_second_conversation_sees_only_itself(hf_llama):
    model, hf_dir = hf_llama
    generator = torch.Generator().manual_seed(3)
    second = torch.randint(0, VOCAB, (1, SECOND), generator=generator)
    firsts = [torch.randint(0, VOCAB, (1, FIRST), generator=generator) for _ in range(2)]
    samples = [torch.cat([first, second], 1) for first in firsts]
    with torch.no_grad():
        alone = model(second).logits[0]

    last_stage = next(r for r in run_ranks(_rank_packed_logits, hf_dir, samples, pp=2) if r is not None)
    for k, logits in enumerate(last_stage[True]):
        diff = (logits - alone).abs().max().item()
        assert diff <= 1e-4, f"packed sample {k}: conversation 2's logits differ from it alone by {diff:.2e}"

    causal = last_stage[False]
    assert (causal[0] - causal[1]).abs().max() > 1e-3, \
        "without per-document attention conversation 1 should change conversation 2's logits"


def _rank_samples(prefix: str, tokens: int, cache: str) -> list[tuple[np.ndarray, np.ndarray]]:
    entries = [BlendEntry(group="chat", prefix=prefix, tokens=tokens, weight=1.0)]
    train, _ = build_datasets(entries, 32, 1234, "100,0,0", 40, 0, DatasetTokenizer(VOCAB, 1), cache,
                              per_document_attention=True)
    return [(train[k]["tokens"].numpy(), train[k]["segment_ids"].numpy()) for k in range(40)]


@pytest.mark.distributed
def test_segment_ids_follow_megatron_document_boundaries(tmp_path):
    """Documents of distinct constant tokens: a new segment starts exactly where the token changes."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=60)
    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=np.int32)
    for doc, n in enumerate(lengths):
        builder.add_document(np.full(n, doc + 2, dtype=np.int32), [n])
    builder.finalize(str(tmp_path / "docs.idx"))

    (samples,) = run_ranks(_rank_samples, str(tmp_path / "docs"), int(lengths.sum()), str(tmp_path / "cache"))
    assert sum(segments.max() > 0 for _, segments in samples) > 20, "expected samples spanning documents"
    for idx, (tokens, segments) in enumerate(samples):
        new_document = np.concatenate([[False], tokens[1:] != tokens[:-1]])
        assert (np.diff(segments, prepend=segments[0]) == new_document).all(), \
            f"sample {idx}: segment ids {segments.tolist()} do not follow documents {tokens.tolist()}"
