"""Continued pretraining on megatron-core: one loop for both stages, CPU (gloo) and GPU (NCCL).

The model is megatron-core's GPTModel in its DistributedDataParallel wrapper with its optimizer
(mixed precision with fp32 master weights for bf16), warmup + cosine LR (``OptimizerParamScheduler``) and global
gradient-norm clipping; micro-batches go through its pipeline schedule. Steps consume the global
batch in a fixed order of sample indices, so the data position is one number (consumed samples)
and a resumed run sees exactly the samples an uninterrupted one would.

A SIGTERM or SIGUSR2 (Slurm's warning before the time limit, forwarded by torchrun) sets a flag;
at the next step boundary every rank agrees on it (an all-reduce), the run saves a checkpoint and
exits with code 0, and the requeued job resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_adapt import distributed
from megatron_adapt.checkpoint.hf import HFCheckpointReader
from megatron_adapt.data.blend import load_blend
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.freeze import apply_freeze_policy
from megatron_adapt.model.fused_vocab import fused_vocab_supported, use_fused_vocab
from megatron_adapt.model.resize import resizing_reader
from megatron_adapt.model.weights import load_hf_state
from megatron_adapt.training import checkpoint
from megatron_adapt.training.config import Config, ConfigError, to_dict
from megatron_adapt.training.data import DatasetTokenizer, build_datasets
from megatron_adapt.training.step import forward_backward

log = logging.getLogger(__name__)
_STOP = {"requested": False}


def _request_stop(signum, frame) -> None:
    _STOP["requested"] = True
    log.warning("signal %d: will save and exit at the end of this step", signum)


def _source_checkpoint(config: Config) -> tuple[Path | None, bool]:
    """(checkpoint to start from, whether it is this run's own = a resume)."""
    own = checkpoint.latest(config.checkpoint.save)
    if own is not None:
        return own, True
    if config.model.init_from:
        other = checkpoint.latest(config.model.init_from)
        if other is None:
            raise ConfigError(f"model.init_from: {config.model.init_from} has no complete checkpoint")
        return other, False
    return None, False


def check_inputs(config: Config) -> tuple[LlamaArchitecture, Path | None, bool, int]:
    """Everything that can be refused before a model is built: (arch, source, resuming, base vocab)."""
    source, resuming = _source_checkpoint(config)
    arch = LlamaArchitecture.from_hf_config(source if source else Path(config.model.hf_dir))
    base_tokenizer = Path(config.model.base_tokenizer or Path(config.model.hf_dir) / "tokenizer.model")
    if base_tokenizer.exists():
        base_vocab = spm.SentencePieceProcessor(model_file=str(base_tokenizer)).get_piece_size()
    elif source is None:
        base_vocab = arch.vocab_size  # the HF checkpoint's own rows are the base vocabulary
    elif config.train.freeze.train == "new_vocab_rows":
        raise ConfigError(f"model.base_tokenizer: {base_tokenizer} does not exist; it tells which rows are new")
    else:
        base_vocab = arch.vocab_size
    if config.model.tokenizer:
        vocab = spm.SentencePieceProcessor(model_file=config.model.tokenizer).get_piece_size()
        if source is not None and vocab != arch.vocab_size:
            raise ConfigError(f"model.tokenizer: {config.model.tokenizer} has {vocab} pieces but checkpoint "
                              f"{source} has {arch.vocab_size} vocabulary rows")
        if source is None and vocab < arch.vocab_size:
            raise ConfigError(f"model.tokenizer: {config.model.tokenizer} has {vocab} pieces, fewer than "
                              f"{config.model.hf_dir}'s {arch.vocab_size}")
        arch = arch.with_vocab_size(vocab)
    if resuming:
        saved = json.loads((source / "meta.json").read_text()).get("optimizer")
        planned = "distributed" if _use_distributed_optimizer() else "replicated"
        if saved and saved != planned:
            raise ConfigError(f"{source} was saved by the {saved} optimizer, this run uses the {planned} one "
                              "(their states differ in form): resume on the same kind of machine")
    load_blend(config.data.blend)  # names any missing data prefix
    arch.check_parallel_layout(config.parallel.tp, config.parallel.pp)
    return arch, source, resuming, base_vocab


def _flops_per_token(arch: LlamaArchitecture, seq_length: int) -> float:
    """Training FLOPs per token: 6 × matmul parameters (embedding lookup excluded) + attention."""
    h, f, L = arch.hidden_size, arch.intermediate_size, arch.num_layers
    attn = h * arch.head_dim * (arch.num_attention_heads * 2 + arch.num_key_value_heads * 2)
    params = L * (attn + 3 * h * f) + arch.vocab_size * h
    return 6 * params + 12 * L * h * seq_length


def _batches(dataset, start: int, config: Config, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch that begins at sample ``start``."""
    per_rank = config.train.global_batch_size // dp_size
    first = start + dp_rank * per_rank
    out = []
    for m in range(per_rank // config.train.micro_batch_size):
        samples = [dataset[first + m * config.train.micro_batch_size + k] for k in range(config.train.micro_batch_size)]
        out.append({key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")})
    return out


class _Logger:
    """Metrics from the rank that holds the loss: log lines, RUN/metrics.jsonl, wandb, tensorboard."""

    def __init__(self, config: Config, active: bool) -> None:
        self.active, self.wandb, self.tb = active, None, None
        self.path = Path(config.checkpoint.save) / "metrics.jsonl"
        if not active:
            return
        if config.logging.wandb_project:
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            self.wandb = wandb.init(project=config.logging.wandb_project, name=config.logging.wandb_run or None,
                                    dir=config.checkpoint.save, config=to_dict(config), resume="allow")
        if config.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(config.checkpoint.save) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard requested but not installed; skipping it")

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)


def train(config: Config, checked: tuple | None = None) -> dict:
    """Run (or resume) the configured stage; returns the last metrics. ``checked`` is
    ``check_inputs(config)`` when the caller has already run it."""
    arch, source, resuming, base_vocab = checked or check_inputs(config)
    distributed.initialize(config.parallel.tp, config.parallel.pp, seed=config.data.seed)
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGUSR2, _request_stop)
    run_dir = Path(config.checkpoint.save)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))

    dtype = torch.bfloat16 if config.optim.bf16 else torch.float32
    model = build_llama(arch, params_dtype=dtype, seq_length=config.data.seq_length)
    if source is None:
        reader = HFCheckpointReader(config.model.hf_dir)
        get = reader.__getitem__
        if arch.vocab_size > get("model.embed_tokens.weight").shape[0]:
            base_tokenizer = config.model.base_tokenizer or str(Path(config.model.hf_dir) / "tokenizer.model")
            get = resizing_reader(get, base_tokenizer, config.model.tokenizer, config.model.init_method)
        load_hf_state(model, get)
    elif not resuming:
        checkpoint.load(source, model)
    apply_freeze_policy(model, config.train.freeze, base_vocab)
    if config.model.fused_vocab and fused_vocab_supported(dtype):
        use_fused_vocab(model)
    else:
        log.info("vocabulary layers: megatron-core's%s", "" if not config.model.fused_vocab else
                 " (the fused kernels take CUDA tensors or float32 CPU tensors)")

    sharded_optimizer = _use_distributed_optimizer()
    log.info("optimizer: %s", "distributed, state sharded over DP" if sharded_optimizer else
             "state replicated over DP (the distributed optimizer needs CUDA and TransformerEngine or apex)")
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=sharded_optimizer)
    model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=config.optim.lr, min_lr=config.optim.min_lr, weight_decay=config.optim.weight_decay,
        adam_beta1=config.optim.adam_beta1, adam_beta2=config.optim.adam_beta2, clip_grad=config.optim.clip_grad,
        bf16=config.optim.bf16, params_dtype=dtype, use_distributed_optimizer=sharded_optimizer), [model])
    gbs = config.train.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=config.optim.lr, min_lr=config.optim.min_lr,
        lr_warmup_steps=config.optim.warmup_steps * gbs, lr_decay_steps=config.train.steps * gbs, lr_decay_style="cosine",
        start_wd=config.optim.weight_decay, end_wd=config.optim.weight_decay, wd_incr_steps=config.train.steps * gbs,
        wd_incr_style="constant")
    iteration, consumed = 0, 0
    if resuming:
        meta = checkpoint.load(source, model, optimizer, scheduler)
        iteration, consumed = meta["iteration"], meta["consumed_samples"]
        log.info("resumed from %s at step %d", source, iteration)

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    cache_dir = config.data.cache_dir or str(run_dir / "data_cache")
    eval_rounds = config.train.steps // config.train.eval_interval + 1 if config.train.eval_interval else 0
    train_set, valid_sets = build_datasets(
        load_blend(config.data.blend), config.data.seq_length, config.data.seed, config.data.split,
        config.train.steps * gbs, config.train.eval_steps * gbs * eval_rounds,
        DatasetTokenizer(arch.vocab_size, _eod_id(config, arch)), cache_dir)

    holds_loss = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    logger = _Logger(config, holds_loss and dp_rank == 0)
    flops_per_token = _flops_per_token(arch, config.data.seq_length)
    metrics: dict[str, float] = {}
    tick = time.time()
    while iteration < config.train.steps:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = forward_backward(model, _batches(train_set, consumed, config, dp_rank, dp_size))
        finalize_model_grads([model])
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=gbs)
        consumed += gbs
        iteration += 1

        if iteration % config.train.log_interval == 0 or iteration == config.train.steps:
            elapsed, tick = time.time() - tick, time.time()
            steps_done = config.train.log_interval if iteration % config.train.log_interval == 0 else 1
            tokens_per_s = steps_done * gbs * config.data.seq_length / elapsed / dist.get_world_size()
            tflops = tokens_per_s * flops_per_token / 1e12
            metrics = {"loss": _dp_mean(loss), "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm or 0.0), "tokens_per_s_per_device": tokens_per_s,
                       "tflops_per_device": tflops}
            if torch.cuda.is_available():
                metrics["mfu"] = tflops / config.train.peak_tflops
            if logger.active:
                log.info("step %d/%d loss %.4f lr %.2e grad %.3f %.0f tok/s/dev %.2f TFLOP/s/dev", iteration,
                         config.train.steps, metrics["loss"], metrics["lr"], metrics["grad_norm"], tokens_per_s, tflops)
            logger(iteration, metrics)
        if config.train.eval_interval and iteration % config.train.eval_interval == 0:
            evaluation = evaluate(model, valid_sets, config, dp_rank, dp_size, iteration)
            if logger.active and evaluation:
                log.info("step %d validation %s", iteration, " ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
            logger(iteration, evaluation)

        stop = _agree(_STOP["requested"])
        if stop or iteration % config.checkpoint.save_interval == 0 or iteration == config.train.steps:
            checkpoint.save(run_dir, iteration, model, optimizer, scheduler, consumed, to_dict(config),
                            config.checkpoint.keep)
        if stop:
            log.warning("stopped at step %d on request; resume by running the same command", iteration)
            break
    if iteration == config.train.steps and rank == 0:
        (run_dir / "done").write_text(str(iteration))
    distributed.destroy()
    return metrics


def _use_distributed_optimizer() -> bool:
    """Shard optimizer state over DP ranks where megatron-core's distributed optimizer works whole:
    on GPUs (it takes CUDA tensors only) with TransformerEngine or apex (without them it cannot
    load its own checkpoints: it reads Adam's step from state that does not exist yet)."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    return torch.cuda.is_available() and HAVE_APEX_OR_TE


def _eod_id(config: Config, arch: LlamaArchitecture) -> int:
    """The end-of-document id the data was preprocessed with (the tokenizer's EOS)."""
    if config.model.tokenizer:
        return spm.SentencePieceProcessor(model_file=config.model.tokenizer).eos_id()
    return arch.eos_token_id if isinstance(arch.eos_token_id, int) else 2


def _agree(flag: bool) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    tensor = torch.tensor([int(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _dp_mean(value: float | None) -> float:
    if value is None:
        return math.nan
    tensor = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor.item() / parallel_state.get_data_parallel_world_size()


def evaluate(model, valid_sets: dict, config: Config, dp_rank: int, dp_size: int, iteration: int) -> dict[str, float]:
    """Validation loss per blend group, over ``eval_steps`` global batches (different each round)."""
    out = {}
    model.eval()
    gbs = config.train.global_batch_size
    round_index = iteration // config.train.eval_interval - 1
    with torch.no_grad():
        for group, dataset in valid_sets.items():
            if dataset is None:
                continue
            losses = []
            for k in range(config.train.eval_steps):
                start = ((round_index * config.train.eval_steps + k) * gbs) % max(len(dataset) - gbs + 1, 1)
                losses.append(forward_backward(model, _batches(dataset, start, config, dp_rank, dp_size),
                                               forward_only=True))
            if losses[0] is not None:
                out[f"valid_loss/{group}"] = _dp_mean(sum(losses) / len(losses))
    model.train()
    return out
