"""Context parallelism: each rank of the CP group holds a part of every sequence.

megatron-core slices a batch with ``get_batch_on_this_cp_rank`` (rank r keeps chunks r and
2·CP−1−r of 2·CP, so that causal attention costs every rank the same), slices the rotary
embedding the same way, and sums gradients and token counts over the DP×CP group. Attention is
the one layer that needs the whole sequence: TransformerEngine's attention exchanges key/value
chunks around a ring; megatron-core's local attention refuses CP. ``ContextParallelAttention`` is
the local spec's: each rank all-gathers the keys and values and attends with its own queries (the
all-gather scheme TE also offers), so everything but keys and values still divides by CP.
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def chunk_positions(seq_length: int, cp_size: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions in the whole sequence of the tokens ``get_batch_on_this_cp_rank`` gives ``cp_rank``."""
    chunk = seq_length // (2 * cp_size)
    starts = (cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


@functools.cache
def _causal_mask(local_length: int, cp_size: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    """[1, 1, local, local·CP], True where a query may not attend: keys in all-gather order (every
    rank's two chunks, rank by rank), queries this rank's."""
    seq_length = local_length * cp_size
    keys = torch.cat([chunk_positions(seq_length, cp_size, r, device) for r in range(cp_size)])
    queries = chunk_positions(seq_length, cp_size, cp_rank, device)
    return (keys[None, :] > queries[:, None])[None, None]


class ContextParallelAttention(DotProductAttention):
    """megatron-core's local attention over keys and values all-gathered from the CP group.

    The gather's backward reduce-scatters: each rank gets the gradient every rank's queries sent
    its keys and values. The mask is explicit (queries and keys are not aligned), so the softmax
    runs as for an arbitrary mask; the attention math is megatron-core's."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str, **kwargs) -> None:
        local = copy.copy(config)  # the parent refuses CP; it reads the config for heads and softmax only
        local.context_parallel_size = 1
        super().__init__(local, layer_number, AttnMaskType.arbitrary, attention_type, **kwargs)
        self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None:
            raise ValueError("context parallelism takes causal attention only (no per-document masks)")
        key = gather_from_sequence_parallel_region(key, group=self.cp_group)
        value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        mask = _causal_mask(query.shape[0], self.cp_group.size(), self.cp_group.rank(), query.device)
        return super().forward(query, key, value, mask, AttnMaskType.arbitrary, attention_bias, packed_seq_params)
