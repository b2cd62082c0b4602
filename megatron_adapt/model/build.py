"""Build a megatron-core GPTModel for a LLaMA architecture on the current parallel rank."""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_adapt.model.config import LlamaArchitecture, gpu_module_available
from megatron_adapt.model.context_parallel import ContextParallelAttention
from megatron_adapt.model.lora import LoraConfig, init_adapters, lora_linear
from megatron_adapt.model.loss import fused_loss_sum, masked_sum, token_losses
from megatron_adapt.model.vocab import adopt_vocab_layer, trainable_table_param, vocab_layers

log = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    return gpu_module_available("transformer_engine")


class RMSNorm(torch.nn.RMSNorm):
    """The local spec's norm: torch's RMSNorm in the model's dtype, usable with sequence parallelism.

    megatron-core's own torch norm refuses sequence parallelism. Under it each TP rank normalizes
    its part of the sequence, so the weight's gradient is partial: the ``sequence_parallel`` mark
    makes megatron-core's ``finalize_model_grads`` all-reduce it over the TP group, as TE's norms are."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


UNFUSED_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                     "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
"""Checkpoint names of norms that are their own modules: those of TE's fused layernorm + linear."""


def layer_spec(config, use_transformer_engine: bool | None = None,
               per_document_attention: bool = False, lora: LoraConfig | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's transformer block: TE's fused layers when importable, megatron-core's
    local (torch) layers with ``RMSNorm`` otherwise (and ``ContextParallelAttention`` under CP);
    with the config's ``qk_layernorm`` (Qwen3), per-head norms of q and k of the same kind.

    With ``per_document_attention`` self-attention takes the mask it is given (``arbitrary``);
    a causal layer may ignore it (TE's and the fused softmax's causal kernels do). With ``lora``
    the adapted linears are ``lora.lora_linear`` classes, and TE's norms are their own modules
    before plain TE linears: its fused layernorm + linear keeps the normalized input, which the
    adapters of linear_qkv and linear_fc1 take, inside."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        log.info("layer spec: TransformerEngine")
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm))
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
        final_norm = TENorm
        if lora:
            log.info("LoRA: TE's norms unfused from linear_qkv and linear_fc1 (the adapters take the normalized input)")
            spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TENorm
            spec.submodules.self_attention.submodules.linear_qkv = TEColumnParallelLinear
            spec.submodules.mlp.submodules.linear_fc1 = TEColumnParallelLinear
            # A whole-model checkpoint stores the norms under TE's fused names, as the local spec maps them.
            spec.submodules.sharded_state_dict_keys_map = dict(spec.submodules.sharded_state_dict_keys_map,
                                                               **UNFUSED_NORM_KEYS)
    else:
        log.info("layer spec: megatron-core local (TransformerEngine not available)")
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm))
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = final_norm = RMSNorm
        if config.qk_layernorm:
            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = RMSNorm
        if config.context_parallel_size > 1:
            spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    if per_document_attention:
        spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    if lora is not None:
        _add_adapters(spec, lora)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=final_norm)


def _add_adapters(spec, lora: LoraConfig) -> None:
    """Name the adapted class of each linear ``lora`` targets in the layer spec."""
    for linear_name in lora.linears():
        block, linear = linear_name.split(".")
        submodules = getattr(spec.submodules, block).submodules
        setattr(submodules, linear, lora_linear(linear_name, getattr(submodules, linear), lora))


def unwrap(model: torch.nn.Module) -> "LlamaGPTModel":
    """The model inside megatron-core's DDP (or any ``.module``) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


class LlamaGPTModel(GPTModel):
    """megatron-core's GPTModel for a LLaMA architecture.

    ``first_trainable_row``: rows from this id on train alone (stage 1; None: every row), through
    the row-split vocabulary layers (``model.vocab``). ``fused_vocab``: the lookup and the loss go
    through the fused kernels; the last stage's forward then returns its final hidden states
    [b, s, h] in place of logits, for ``loss_sum`` to apply the output weight. ``lora``: the
    adapters the layer spec declared (``layer_spec(lora=...)``), initialized here.

    ``vocab_size`` is the TP-padded size megatron-core allocates; the true size is
    ``true_vocab_size``, so that the loss and exports leave the padding rows out.
    """

    def __init__(self, arch: LlamaArchitecture, config, transformer_layer_spec, seq_length: int,
                 first_trainable_row: int | None = None, fused_vocab: bool = False,
                 lora: LoraConfig | None = None) -> None:
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            rope_scaling=arch.rope_scaling == "llama3",
            rope_scaling_factor=arch.rope_scaling_factor,
            seq_len_interpolation_factor=arch.rope_scaling_factor if arch.rope_scaling == "linear" else None,
        )
        self.architecture = arch
        self.first_trainable_row = first_trainable_row
        self.fused_vocab = fused_vocab
        self.lora = lora
        layers = vocab_layers(self)
        tied_here = arch.tie_word_embeddings and self.pre_process and self.post_process
        for layer in layers:
            adopt_vocab_layer(layer, first_trainable_row, arch.vocab_size,
                              table=layers[0] if tied_here and layer is not layers[0] else None)
        if self.pre_process:
            self.embedding.word_embeddings.fused = fused_vocab
        if lora is not None:
            init_adapters(self)
        kernels = "megatron-core's"
        if fused_vocab:
            kernels = "fused kernels, " + ("Triton" if torch.cuda.is_available() else "C++ CPU")
        rows = f"rows from id {first_trainable_row} trainable" if first_trainable_row is not None else \
            "every row trainable"
        log.info("vocabulary layers: %s; %s", kernels, rows)

    @property
    def true_vocab_size(self) -> int:
        return self.architecture.vocab_size

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """With tied embeddings, the Parameter whose gradient megatron-core all-reduces between the
        first and last pipeline stage: the trainable rows when the table is row-split."""
        if self.pre_process:
            return trainable_table_param(self.embedding.word_embeddings)
        if self.post_process:
            return trainable_table_param(self.output_layer)
        return None

    def tie_embeddings_and_output_weights_state_dict(self, sharded_state_dict, output_layer_weight_key: str,
                                                     first_stage_word_emb_key: str, metadata: dict = {}) -> None:
        """The last stage's copy of a tied table is saved as a replica of the embedding (megatron-core
        builds that entry from ``shared_embedding_or_output_weight()``, not the whole table here)."""
        if not self.post_process or self.pre_process:
            return
        entry = sharded_state_dict[output_layer_weight_key]
        dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        sharded_state_dict[output_layer_weight_key] = dataclasses.replace(
            entry, key=first_stage_word_emb_key, replica_id=(1, 0, dp_rank), allow_shape_mismatch=True)

    def _postprocess(self, hidden_states, *args, **kwargs):
        """megatron-core's logits, or with ``fused_vocab`` the final hidden states [b, s, h] (the
        whole sequence under sequence parallelism, whose backward reduce-scatters their gradient,
        which the fused loss leaves unreduced)."""
        if not (self.fused_vocab and self.post_process):
            return super()._postprocess(hidden_states, *args, **kwargs)
        if self.output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                                 group=self.output_layer.tp_group)
        return hidden_states.transpose(0, 1).contiguous()

    def loss_sum(self, output: torch.Tensor, labels: torch.Tensor,
                 loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the masked token losses, tokens counted) from what ``forward`` returned on the last
        stage: vocab-parallel logits, or with ``fused_vocab`` the final hidden states."""
        if self.fused_vocab:
            return fused_loss_sum(self, output, labels, loss_mask)
        return masked_sum(token_losses(output, labels, self.true_vocab_size), loss_mask)


def build_llama(arch: LlamaArchitecture, params_dtype: torch.dtype = torch.float32,
                seq_length: int | None = None, use_transformer_engine: bool | None = None,
                first_trainable_row: int | None = None, fused_vocab: bool = False,
                per_document_attention: bool = False, lora: LoraConfig | None = None,
                **config_overrides) -> LlamaGPTModel:
    """The GPTModel piece this rank owns (its pipeline stage, its tensor-parallel shard); with
    ``per_document_attention`` its forward takes a [b, 1, s, s] mask (True: may not attend); with
    ``lora`` its linear layers carry adapters. ``first_trainable_row`` and ``fused_vocab``: see
    ``LlamaGPTModel``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = arch.transformer_config(tp, pp, params_dtype, **config_overrides)
    seq_length = seq_length or arch.max_position_embeddings
    spec = layer_spec(config, use_transformer_engine, per_document_attention, lora=lora)
    model = LlamaGPTModel(arch, config, spec, seq_length, first_trainable_row, fused_vocab, lora)
    if torch.cuda.is_available():  # megatron-core initialized on the GPU; torch modules (norms) were not
        model.cuda(torch.cuda.current_device())
    return model
