"""The optimizer and learning-rate schedule: megatron-core's, configured from ``OptimConfig``.

Mixed precision keeps fp32 master weights for bf16 parameters; the schedule is linear warm-up then
cosine decay, counted in samples as Megatron-LM counts it (so a changed global batch size keeps
the schedule's shape).
"""

from __future__ import annotations

import logging

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_adapt.checkpoint.format import OptimizerKind
from megatron_adapt.training.config import Config

log = logging.getLogger(__name__)


def optimizer_kind_for_this_machine() -> OptimizerKind:
    """Shard optimizer state over DP ranks where megatron-core's distributed optimizer works whole:
    on GPUs (it takes CUDA tensors only) with TransformerEngine or apex (without them it cannot
    load its own checkpoints: it reads Adam's step from state that does not exist yet)."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    return "distributed" if torch.cuda.is_available() and HAVE_APEX_OR_TE else "replicated"


def build_optimizer(config: Config, model, params_dtype: torch.dtype, distributed: bool):
    """megatron-core's Adam over the model's trainable parameters (``model`` in its DDP wrapper).

    ``optim.vocab_lr`` is megatron-core's decoupled LR: a parameter group of the parameters marked
    ``is_embedding_or_output_parameter`` (the vocabulary layers, their trainable rows included)
    with its own max/min LR, which the scheduler follows."""
    log.info("optimizer: %s; %s parameters%s", "distributed, state sharded over DP" if distributed else
             "state replicated over DP (the distributed optimizer needs CUDA and TransformerEngine or apex)",
             str(params_dtype).removeprefix("torch."), " with fp32 master weights" if config.optim.bf16 else "")
    o = config.optim
    return get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, clip_grad=o.clip_grad, bf16=o.bf16, params_dtype=params_dtype,
        use_distributed_optimizer=distributed, decoupled_lr=o.vocab_lr, decoupled_min_lr=o.vocab_min_lr), [model])


def build_scheduler(config: Config, optimizer) -> OptimizerParamScheduler:
    samples = config.train.steps * config.train.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=config.optim.lr, min_lr=config.optim.min_lr,
        lr_warmup_steps=config.optim.warmup_steps * config.train.global_batch_size, lr_decay_steps=samples,
        lr_decay_style="cosine", start_wd=config.optim.weight_decay, end_wd=config.optim.weight_decay,
        wd_incr_steps=samples, wd_incr_style="constant")
