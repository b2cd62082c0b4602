"""Grow a checkpoint's embedding and output rows to an extended tokenizer, and initialize them.

Initializations of the added rows (input and output tables alike):
- ``subword-mean``: each added piece's row is the mean of the base rows of the pieces the base
  tokenizer cuts its text into — the method that Chinese-LLaMA's maintainers and NVIDIA's
  tokenizer-extension guide found to work best. Word-internal SentencePiece pieces are encoded
  without the leading "▁" (else "ười" would become "▁ ư ờ i"); a byte-level BPE token is
  re-encoded from its bytes (``TextTokenizer.subword_ids``).
- ``mean``: the mean of all base rows, plus small noise (1% of the rows' std) to break symmetry.
- ``multivariate-normal``: samples from N(mean, 1e-9·cov) of the base rows, as transformers'
  ``resize_token_embeddings(mean_resizing=True)`` does (the mean when cov is not positive definite).

A checkpoint may have more rows than its tokenizer has ids (Qwen2/3: 151936 rows, 151665 ids),
padding that no token reaches. The extended tokenizer numbers its pieces from the base
tokenizer's size, so the resized table is the base tokenizer's rows followed by the added ones:
the padding rows are dropped (their only effect was a sliver of the softmax spent on ids no text
produces).
"""

from __future__ import annotations

import logging
from typing import Callable, Literal, get_args

import torch
from torch.distributions import constraints

from megatron_adapt.tokenizer.load import TextTokenizer, load_tokenizer

InitMethod = Literal["subword-mean", "mean", "multivariate-normal"]
INIT_METHODS: tuple[str, ...] = get_args(InitMethod)
RESIZED = ("model.embed_tokens.weight", "lm_head.weight")
log = logging.getLogger(__name__)


class VocabMismatchError(ValueError):
    """The extended tokenizer does not extend the checkpoint's tokenizer."""


def check_extends(base: TextTokenizer, new: TextTokenizer, checkpoint_vocab: int) -> None:
    """Refuse a tokenizer that does not keep the base tokenizer's ids, naming the first that
    differs, and a base tokenizer with ids the checkpoint has no rows for."""
    if base.vocab_size > checkpoint_vocab:
        raise VocabMismatchError(f"{base.path} has {base.vocab_size} tokens but the checkpoint has "
                                 f"{checkpoint_vocab} embedding rows")
    if new.vocab_size < base.vocab_size:
        raise VocabMismatchError(f"{new.path} has {new.vocab_size} tokens, fewer than the base tokenizer's "
                                 f"{base.vocab_size}: first missing id {new.vocab_size}")
    if base.kind != new.kind:
        raise VocabMismatchError(f"{new.path} is a {new.kind} tokenizer, {base.path} a {base.kind} one")
    for i, (b, n) in enumerate(zip(base.tokens(), new.tokens())):
        if b != n:
            raise VocabMismatchError(f"id {i} differs: {base.path} has {b!r}, {new.path} has {n!r}")


def new_rows(old: torch.Tensor, method: InitMethod, n_new: int, subwords: list[list[int]] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """[n_new, hidden] rows for the added ids, computed in fp32 (or the input's higher precision)."""
    old = old.to(torch.promote_types(old.dtype, torch.float32))
    if n_new == 0:  # a tokenizer that adds nothing: no rows (one empty bag would make a bogus one)
        return old.new_empty((0, old.shape[1]))
    mean = old.mean(0)
    if method == "subword-mean":
        if subwords is None or len(subwords) != n_new:
            raise ValueError("subword-mean needs the base tokenization of every added piece")
        flat = torch.tensor([i for ids in subwords for i in ids], dtype=torch.long)
        offsets = torch.tensor([0] + [len(ids) for ids in subwords[:-1]], dtype=torch.long).cumsum(0)
        return torch.nn.functional.embedding_bag(flat, old, offsets, mode="mean")
    if method == "mean":
        noise = torch.randn(n_new, old.shape[1], generator=generator, dtype=old.dtype) * (0.01 * old.std())
        return mean + noise
    if method == "multivariate-normal":
        centered = old - mean
        covariance = 1e-9 * (centered.T @ centered) / old.shape[0]
        if constraints.positive_definite.check(covariance).all():
            dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
            with torch.random.fork_rng():
                if generator is not None:
                    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                return dist.sample((n_new,))
        return mean.expand(n_new, -1).clone()
    raise ValueError(f"unknown init method {method!r}; choose from {', '.join(INIT_METHODS)}")


def resizing_reader(get_tensor: Callable[[str], torch.Tensor], base_tokenizer: str, new_tokenizer: str,
                    method: InitMethod, seed: int = 0) -> Callable[[str], torch.Tensor]:
    """Wrap an HF tensor getter so that embedding and output rows come out resized to ``new_tokenizer``
    (either tokenizer: a file or a directory, ``tokenizer.load``).

    Only those two tensors are touched (and cached once resized); everything else passes through.
    Rows past the base tokenizer's ids (padding) are dropped.
    """
    rows = get_tensor(RESIZED[0]).shape[0]
    base, new = load_tokenizer(base_tokenizer), load_tokenizer(new_tokenizer)
    check_extends(base, new, rows)
    base_vocab = base.vocab_size
    if rows > base_vocab:
        log.info("the checkpoint's rows %d-%d are padding past its tokenizer's %d ids: dropped",
                 base_vocab, rows - 1, base_vocab)
    added = new.tokens(base_vocab)
    subwords = base.subword_ids(added) if method == "subword-mean" else None
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in RESIZED:
            return get_tensor(name)
        if name not in cache:
            old = get_tensor(name)[:base_vocab]
            generator = torch.Generator().manual_seed(seed + RESIZED.index(name))
            rows = new_rows(old, method, len(added), subwords, generator).to(old.dtype)
            cache[name] = torch.cat([old, rows])
        return cache[name]

    return get
