"""Grow a checkpoint's embedding and output rows to an extended tokenizer, and initialize them.

Initializations of the added rows (input and output tables alike):
- ``subword-mean``: each added piece's row is the mean of the base rows of the pieces the base
  tokenizer cuts its text into — the method that Chinese-LLaMA's maintainers and NVIDIA's
  tokenizer-extension guide found to work best. Word-internal pieces are encoded without the
  leading "▁" (else "ười" would become "▁ ư ờ i").
- ``mean``: the mean of all base rows, plus small noise (1% of the rows' std) to break symmetry.
- ``multivariate-normal``: samples from N(mean, 1e-9·cov) of the base rows, as transformers'
  ``resize_token_embeddings(mean_resizing=True)`` does (the mean when cov is not positive definite).
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import sentencepiece as spm
import torch
from torch.distributions import constraints

from megatron_adapt.tokenizer.sentencepiece_model import SPACE, load_model_proto, processor

InitMethod = Literal["subword-mean", "mean", "multivariate-normal"]
INIT_METHODS: tuple[str, ...] = get_args(InitMethod)
RESIZED = ("model.embed_tokens.weight", "lm_head.weight")


class VocabMismatchError(ValueError):
    """The extended tokenizer does not extend the checkpoint's tokenizer."""


def check_extends(base_model: str, new_model: str, checkpoint_vocab: int) -> None:
    """Refuse a tokenizer that does not keep the checkpoint's first ids, naming the first that differs."""
    base, new = load_model_proto(base_model), load_model_proto(new_model)
    if len(base.pieces) != checkpoint_vocab:
        raise VocabMismatchError(f"{base_model} has {len(base.pieces)} pieces but the checkpoint has "
                                 f"{checkpoint_vocab} embedding rows")
    if len(new.pieces) < checkpoint_vocab:
        raise VocabMismatchError(f"{new_model} has {len(new.pieces)} pieces, fewer than the checkpoint's "
                                 f"{checkpoint_vocab}: first missing id {len(new.pieces)}")
    for i in range(checkpoint_vocab):
        b, n = base.pieces[i], new.pieces[i]
        if (b.piece, b.type) != (n.piece, n.type):
            raise VocabMismatchError(f"id {i} differs: {base_model} has {b.piece!r}, {new_model} has {n.piece!r}")


def subword_ids(base: spm.SentencePieceProcessor, pieces: list[str]) -> list[list[int]]:
    """The base tokenization of each piece's text (base processor with the dummy prefix off)."""
    return base.encode([p.replace(SPACE, " ") for p in pieces], out_type=int)


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


def resizing_reader(get_tensor: Callable[[str], torch.Tensor], base_model: str, new_model: str,
                    method: InitMethod, seed: int = 0) -> Callable[[str], torch.Tensor]:
    """Wrap an HF tensor getter so that embedding and output rows come out resized to ``new_model``.

    Only those two tensors are touched (and cached once resized); everything else passes through.
    """
    base_vocab = get_tensor(RESIZED[0]).shape[0]
    check_extends(base_model, new_model, base_vocab)
    new_proto = load_model_proto(new_model)
    added = [p.piece for p in new_proto.pieces[base_vocab:]]
    subwords = subword_ids(processor(load_model_proto(base_model), add_dummy_prefix=False), added) \
        if method == "subword-mean" else None
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in RESIZED:
            return get_tensor(name)
        if name not in cache:
            old = get_tensor(name)
            generator = torch.Generator().manual_seed(seed + RESIZED.index(name))
            rows = new_rows(old, method, len(added), subwords, generator).to(old.dtype)
            cache[name] = torch.cat([old, rows])
        return cache[name]

    return get
