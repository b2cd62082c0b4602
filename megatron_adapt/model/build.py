"""Build a megatron-core GPTModel for a LLaMA architecture on the current parallel rank."""

from __future__ import annotations

import functools
import logging

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)

from megatron_adapt.model.config import LlamaArchitecture

log = logging.getLogger(__name__)


@functools.cache
def transformer_engine_available() -> bool:
    """TransformerEngine is an optional GPU acceleration; it needs CUDA to be of any use."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(use_transformer_engine: bool | None = None):
    """TE's fused layers when importable, megatron-core's local (torch) layers otherwise."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        log.info("layer spec: TransformerEngine")
        return get_gpt_layer_with_transformer_engine_spec()
    log.info("layer spec: megatron-core local (TransformerEngine not available)")
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_llama(arch: LlamaArchitecture, params_dtype: torch.dtype = torch.float32,
                seq_length: int | None = None, use_transformer_engine: bool | None = None,
                **config_overrides) -> GPTModel:
    """The GPTModel piece this rank owns (its pipeline stage, its tensor-parallel shard).

    ``model.vocab_size`` is the TP-padded size megatron-core allocates; the true size stays in
    ``model.true_vocab_size`` so that logits and exports can drop the padding rows.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = arch.transformer_config(tp, pp, params_dtype, **config_overrides)
    seq_length = seq_length or arch.max_position_embeddings
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_transformer_engine),
        vocab_size=arch.padded_vocab_size(tp),
        max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling == "llama3",
        rope_scaling_factor=arch.rope_scaling_factor,
        seq_len_interpolation_factor=arch.rope_scaling_factor if arch.rope_scaling == "linear" else None,
    )
    model.true_vocab_size = arch.vocab_size
    model.architecture = arch
    return model
