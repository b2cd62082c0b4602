"""Bits per UTF-8 byte of held-out text under a Hugging Face causal LM.

Loss per token is not comparable across tokenizers: an extended vocabulary cuts the same text
into fewer, harder tokens. The negative log-likelihood of a whole text is comparable, so it is
divided by the text's UTF-8 bytes, counted from the text itself, never from tokens:
``bpb = Σ nll / ln 2 / bytes``. Every token of a document is scored, the first one conditioned on
the tokenizer's BOS (or EOS where it has none, as lm-evaluation-harness does). A document longer
than the context is scored with a sliding window: each window scores only tokens not scored
before, with at least ``context − stride`` tokens of left context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm import tqdm


@dataclass
class Score:
    """Sums over a set of documents; the rates follow from them."""

    nll: float = 0.0
    """Negative log-likelihood in nats, summed over every scored token."""
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    documents: int = 0

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words

    def as_dict(self) -> dict[str, float | int]:
        return {"bits_per_byte": self.bits_per_byte, "perplexity": self.perplexity,
                "tokens_per_word": self.tokens_per_word, "nll_nats": self.nll, "tokens": self.tokens,
                "bytes": self.bytes, "words": self.words, "documents": self.documents}


def prefix_id(tokenizer) -> int:
    """The token every document is conditioned on: BOS, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer {tokenizer.name_or_path} has neither a BOS nor an EOS token to start documents")


@torch.no_grad()
def document_nll(model, ids: list[int], context: int, stride: int) -> float:
    """Σ −log p(ids[j] | ids[:j]) for j ≥ 1 (``ids[0]`` is the prefix), in nats."""
    seq = torch.tensor(ids, dtype=torch.long, device=model.device)
    total, scored_to, start = 0.0, 1, 0
    while scored_to < len(seq):
        end = min(start + context, len(seq))
        logits = model(seq[start:end].unsqueeze(0)).logits[0].float()
        first = max(scored_to, start + 1)  # first target position this window scores
        log_probs = torch.log_softmax(logits[first - start - 1: end - start - 1], dim=-1)
        total -= log_probs.gather(1, seq[first:end].unsqueeze(1)).sum().item()
        scored_to = end
        start += stride
    return total


def score_texts(model, tokenizer, texts: Iterable[str], context: int, stride: int | None = None,
                progress: bool = False, desc: str = "scoring") -> Score:
    """Bits per byte (and perplexity, tokens per word) of ``texts`` under ``model``."""
    stride = stride or max(context // 2, 1)
    if not 0 < stride <= context - 1:
        raise ValueError(f"stride {stride} must be in 1..context-1 ({context - 1})")
    prefix = prefix_id(tokenizer)
    score = Score()
    for text in tqdm(texts, desc=desc, unit="doc", disable=not progress):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        score.nll += document_nll(model, [prefix, *ids], context, stride)
        score.tokens += len(ids)
        score.bytes += len(text.encode("utf-8"))
        score.words += len(text.split())
        score.documents += 1
    return score
