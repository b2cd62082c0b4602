"""Continued pretraining on megatron-core: one loop for both stages, CPU (gloo) and GPU (NCCL).

The model is megatron-core's GPTModel in its DistributedDataParallel wrapper with its optimizer
(``optim.py``: mixed precision with fp32 master weights for bf16, warmup + cosine LR, global
gradient-norm clipping); micro-batches go through its pipeline schedule (``step.py``). Steps consume the global
batch in a fixed order of sample indices, so the data position is one number (consumed samples)
and a resumed run sees exactly the samples an uninterrupted one would.

A stop request, ``RUN/stop`` (written by the Slurm script's trap for the warning signal it asks
for before the time limit), or a SIGTERM/SIGUSR2 delivered to the workers, is seen at the next
step boundary; every rank agrees on it (an all-reduce), the run saves a checkpoint, writes
``RUN/stopped`` and exits with code 0, and the requeued job resumes from it. Polling a file needs
nothing from torchrun, whose signal relaying and shutdown grace period differ across torch
versions.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from megatron_adapt import distributed
from megatron_adapt.checkpoint import train_state
from megatron_adapt.checkpoint.format import DONE_NAME, STOP_REQUEST_NAME, STOPPED_NAME
from megatron_adapt.checkpoint.hf import HFCheckpointReader
from megatron_adapt.data.blend import bytes_per_token
from megatron_adapt.kernels.self_check import use_fused_vocab
from megatron_adapt.model.build import LlamaGPTModel, build_llama
from megatron_adapt.model.config import gpu_fusions
from megatron_adapt.model.freeze import apply_freeze_policy
from megatron_adapt.model.resize import resizing_reader
from megatron_adapt.model.weights import load_hf_state
from megatron_adapt.training.config import Config, to_dict, transformer_overrides
from megatron_adapt.training.data import DatasetTokenizer, build_datasets, micro_batches
from megatron_adapt.training.metrics import MetricsSink, Throughput
from megatron_adapt.training.optim import build_optimizer, build_scheduler
from megatron_adapt.training.plan import RunPlan, plan_run
from megatron_adapt.training.step import StepLoss, forward_backward
from megatron_adapt.training.validation import validate

log = logging.getLogger(__name__)
_STOP = {"requested": False}


def _request_stop(signum, frame) -> None:
    _STOP["requested"] = True
    log.warning("signal %d: will save and exit at the end of this step", signum)


def train(config: Config, plan: RunPlan | None = None) -> dict:
    """Run (or resume) the configured stage; returns the last metrics. ``plan`` is
    ``plan_run(config)`` when the caller has already made it."""
    plan = plan or plan_run(config)
    distributed.initialize(config.parallel.tp, config.parallel.pp, seed=config.data.seed,
                           cp_size=config.parallel.context_parallel, timeout_minutes=config.parallel.timeout_minutes)
    for signum in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, _request_stop)
    run_dir = Path(config.checkpoint.save)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.get_rank() == 0:
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
        for stale in (STOP_REQUEST_NAME, STOPPED_NAME):  # a request or a mark of the job before
            (run_dir / stale).unlink(missing_ok=True)
    dist.barrier()
    model = build_model(config, plan)
    optimizer = build_optimizer(config, model, plan.params_dtype, plan.distributed_optimizer)
    scheduler = build_scheduler(config, optimizer)
    iteration, consumed, gbs, steps = 0, 0, config.train.global_batch_size, config.train.steps
    if plan.resuming:
        meta = train_state.load(plan.resume_from, model, optimizer, scheduler)
        iteration, consumed = meta.iteration, meta.consumed_samples
        log.info("resumed from %s at step %d", plan.resume_from, iteration)
    train_set, valid_sets = _datasets(config, plan, run_dir)
    byte_rates = bytes_per_token(plan.blend)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    first_replica = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    sink = MetricsSink(config, active=_holds_loss() and first_replica)
    throughput = _throughput(config, plan)
    metrics: dict[str, float] = {}
    reported = iteration
    # The next step's samples are read and stacked (pinned) on a host thread while this step computes.
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    def fetch(start: int):
        return prefetch.submit(micro_batches, train_set, start, gbs, config.train.micro_batch_size, dp_rank, dp_size)

    next_batches = fetch(consumed) if iteration < steps else None
    while iteration < steps:
        batches = next_batches.result()
        if iteration + 1 < steps:
            next_batches = fetch(consumed + gbs)
        loss, grad_norm = train_step(model, optimizer, scheduler, batches, gbs)
        consumed, iteration = consumed + gbs, iteration + 1
        if iteration % config.train.log_interval == 0 or iteration == steps:
            metrics = {"loss": distributed.data_parallel_loss(loss), "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": grad_norm}
            metrics |= throughput.report(iteration - reported, time.time())
            reported = iteration
            _log_step(sink, iteration, steps, metrics)
        if config.train.eval_interval and iteration % config.train.eval_interval == 0:
            _log_step(sink, iteration, steps, validate(model, valid_sets, config, iteration, byte_rates))
        stop = distributed.any_rank(_stop_requested(run_dir))
        if stop or iteration % config.checkpoint.save_interval == 0 or iteration == steps:
            gather_parameters(model)
            train_state.save(run_dir, iteration, model, optimizer, scheduler, consumed, to_dict(config),
                             config.checkpoint.keep, config.checkpoint.optimizer_format)
        if stop:
            if dist.get_rank() == 0:
                (run_dir / STOPPED_NAME).write_text(str(iteration))
            log.warning("stopped at step %d on request; resume by running the same command", iteration)
            break
    prefetch.shutdown(cancel_futures=True)
    if iteration == steps and dist.get_rank() == 0:
        (run_dir / DONE_NAME).write_text(str(iteration))
    distributed.destroy()
    return metrics


def _stop_requested(run_dir: Path) -> bool:
    """A signal reached this process, or (rank 0 looks, one stat a step) a launcher wrote RUN/stop."""
    return _STOP["requested"] or (dist.get_rank() == 0 and (run_dir / STOP_REQUEST_NAME).exists())


def train_step(model: DistributedDataParallel, optimizer, scheduler, batches: list[dict[str, torch.Tensor]],
               global_batch_size: int) -> tuple[StepLoss | None, float]:
    """One optimizer step over a global batch's micro-batches: (its loss on the last stage, the
    gradient norm). The benchmarks time this function."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = forward_backward(model, batches)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=global_batch_size)
    return loss, float(grad_norm or 0.0)


def gather_parameters(model: DistributedDataParallel) -> None:
    """Make every rank's parameters whole now. With ``overlap_param_gather`` the distributed
    optimizer updates this rank's shard and leaves the all-gather to the next forward's hooks, so a
    checkpoint written in between would hold the other ranks' shards one step old (Megatron-LM
    gathers before saving too)."""
    if model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)


def build_model(config: Config, plan: RunPlan, load_weights: bool = True) -> DistributedDataParallel:
    """This rank's model with its start weights (random ones without ``load_weights``: benchmarks),
    what trains set, in megatron-core's DDP wrapper."""
    fused = config.model.fused_vocab and use_fused_vocab(plan.params_dtype, config.model.fused_vocab_fallback)
    model = build_llama(plan.arch, params_dtype=plan.params_dtype, seq_length=config.data.seq_length,
                        first_trainable_row=plan.first_trainable_row(config), fused_vocab=fused,
                        per_document_attention=config.data.per_document_attention, lora=config.train.lora,
                        **transformer_overrides(config))
    # A resume restores every weight, except under LoRA: its checkpoints hold the adapters and
    # vocabulary tables, the frozen base comes from where the run started.
    if load_weights and (not plan.resuming or config.train.lora is not None):
        if plan.start_from is None:
            _load_hf_start(model, config, plan)
        else:
            train_state.load(plan.start_from, model)
    apply_freeze_policy(model, config.train.freeze)
    d = config.ddp
    gather = d.overlap_param_gather and plan.distributed_optimizer
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=d.overlap_grad_reduce,
                                               overlap_param_gather=gather, bucket_size=d.bucket_size,
                                               use_distributed_optimizer=plan.distributed_optimizer)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    # The schedule finishes the gradients (DP reduction, tied and sequence-parallel all-reduces, the
    # division by the step's target tokens); with overlap it holds the reduction until the last micro-batch.
    model.config.finalize_model_grads_func = finalize_model_grads
    if d.overlap_grad_reduce:
        model.config.no_sync_func = ddp.no_sync
    c = model.config
    fused = [name.removesuffix("_fusion") for name in gpu_fusions() if getattr(c, name)]
    log.info("performance: sequence parallel %s, context parallel %d, recompute %s, attention backend %s, gradient "
             "accumulation fusion %s, fused kernels %s, overlap grad reduce %s, overlap param gather %s%s",
             c.sequence_parallel, c.context_parallel_size, c.recompute_granularity or "none", c.attention_backend.name,
             c.gradient_accumulation_fusion, ", ".join(fused) or "none", d.overlap_grad_reduce, gather,
             " (needs the distributed optimizer)" if d.overlap_param_gather and not gather else "")
    return ddp


def _load_hf_start(model: LlamaGPTModel, config: Config, plan: RunPlan) -> None:
    """Weights from the HF checkpoint, rows added for the extended tokenizer where it grew."""
    get = HFCheckpointReader(config.model.hf_dir).__getitem__
    if plan.arch.vocab_size != get("model.embed_tokens.weight").shape[0]:  # added rows, or dropped padding
        get = resizing_reader(get, plan.base_tokenizer, plan.tokenizer, config.model.init_method)
    load_hf_state(model, get)


def _datasets(config: Config, plan: RunPlan, run_dir: Path):
    """(training dataset over the blend, {group: validation dataset}), sized for the whole run."""
    samples = config.train.steps * config.train.global_batch_size
    eval_rounds = config.train.steps // config.train.eval_interval + 1 if config.train.eval_interval else 0
    return build_datasets(plan.blend, config.data.seq_length, config.data.seed, config.data.split, samples,
                          config.train.eval_steps * config.train.global_batch_size * eval_rounds,
                          DatasetTokenizer(plan.arch.vocab_size, plan.eod_id),
                          config.data.cache_dir or str(run_dir / "data_cache"), config.data.per_document_attention)


def _holds_loss() -> bool:
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def _throughput(config: Config, plan: RunPlan) -> Throughput:
    seq = config.data.seq_length
    peak = config.train.peak_tflops if torch.cuda.is_available() else None  # MFU only means something on GPUs
    return Throughput(config.train.global_batch_size * seq, plan.arch.training_flops_per_token(seq),
                      dist.get_world_size(), peak, time.time())


def _log_step(sink: MetricsSink, iteration: int, steps: int, metrics: dict[str, float]) -> None:
    if sink.active and metrics:
        log.info("step %d/%d %s", iteration, steps, " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    sink(iteration, metrics)
