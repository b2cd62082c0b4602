"""Training configuration: nested dataclasses read from YAML, overridable by ``--set a.b=value``.

Every key is checked: an unknown key, a missing file or a value of the wrong type is refused
before any model is built, naming the key, so a typo never costs a queue wait and a GPU hour.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_adapt.checkpoint.format import OptimizerFormat
from megatron_adapt.model.freeze import FreezePolicy
from megatron_adapt.model.lora import LoraConfig
from megatron_adapt.model.resize import InitMethod


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclasses.dataclass
class ModelConfig:
    hf_dir: str = ""
    """HF LLaMA checkpoint to start from (config.json + safetensors) when no checkpoint exists."""
    tokenizer: str = ""
    """Tokenizer of the training data (tokenizer.model, tokenizer.json or a directory with one); rows are
    added if it extends the checkpoint's."""
    base_tokenizer: str = ""
    """The checkpoint's own tokenizer (defaults to hf_dir's tokenizer.model, else its tokenizer.json)."""
    init_method: InitMethod = "subword-mean"
    """How added rows start: subword-mean, mean, multivariate-normal."""
    init_from: str = ""
    """Another run's checkpoint directory to start from (stage 2 from stage 1); weights only."""
    fused_vocab: bool = True
    """Embedding lookup and output loss through the fused kernels (no logits tensor, gradient
    only for trainable rows) where the device has them; false: megatron-core's own layers."""
    fused_vocab_fallback: bool = False
    """When the fused kernels fail their start-up check on a GPU, use megatron-core's layers
    (logged) instead of stopping the run."""
    attention_backend: Literal["auto", "flash", "fused", "unfused"] = "auto"
    """TransformerEngine's attention kernel (Megatron-LM's --attention-backend): auto lets TE pick
    per shape and mask; ignored on megatron-core's local spec."""


@dataclasses.dataclass
class DataConfig:
    blend: str = ""
    """Blend JSON from tools/make_blend.py (training and per-group validation data)."""
    seq_length: int = 2048
    split: str = "99,1,0"
    """train,valid,test shares of every dataset."""
    cache_dir: str = ""
    """Where megatron-core keeps its sample-index caches (default: <save>/data_cache)."""
    seed: int = 1234
    per_document_attention: bool = False
    """Tokens attend only within their own document of a packed sample (SFT: one conversation never
    sees another); boundaries from the dataset index. Off: plain causal attention across documents,
    as in pretraining."""


@dataclasses.dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    """Split the norms' and dropouts' activations along the sequence over the TP group (Megatron-LM's
    --sequence-parallel): activation memory / TP, all-reduces become all-gather + reduce-scatter.
    Megatron-LM turns it off at TP=1, and so does this."""
    context_parallel: int = 1
    """Ranks that split every sequence between them (Megatron-LM's --context-parallel-size): for
    sequences whose activations do not fit otherwise. Attention gathers keys and values over them
    (TransformerEngine's ring exchange, or an all-gather on the local spec); causal attention only."""
    timeout_minutes: int = 60
    """How long a collective may wait for the other ranks (Megatron-LM's --distributed-timeout-minutes):
    rank 0 alone builds the blend's sample index at the first run, which for a 140B-token blend
    takes longer than torch's 10-minute default."""


@dataclasses.dataclass
class DDPConfig:
    """megatron-core's DistributedDataParallel (gradient buckets over the data-parallel group)."""

    overlap_grad_reduce: bool = False
    """Reduce each gradient bucket as soon as the backward pass has filled it, during the rest of
    the backward pass (Megatron-LM's --overlap-grad-reduce)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: gather the updated parameters bucket by bucket during the
    next forward pass (--overlap-param-gather). Off on machines without that optimizer."""
    bucket_size: int | None = None
    """Elements per gradient bucket; None: megatron-core's default (40M, or one bucket without overlap)."""


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    bf16: bool = True
    """bf16 weights with fp32 master copies (GPU); fp32 everywhere when false (CPU)."""
    vocab_lr: float | None = None
    """Peak LR of the embedding and output layers (Megatron-LM's --decoupled-lr; NVIDIA's language
    adaptation study found a higher one helps the new language); None: optim.lr."""
    vocab_min_lr: float | None = None
    """Final LR of the embedding and output layers; None: optim.min_lr."""


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 1
    freeze: FreezePolicy = dataclasses.field(default_factory=FreezePolicy)
    lora: LoraConfig | None = None
    """LoRA adapters on the transformer's linear layers ({rank, alpha, dropout, targets}); None: none."""
    eval_interval: int = 200
    eval_steps: int = 10
    log_interval: int = 10
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (Megatron-LM's --recompute-granularity): selective recomputes the
    attention core, full recomputes every layer's forward in the backward pass."""
    gradient_accumulation_fusion: bool = False
    """Accumulate weight gradients straight into the fp32 gradient buffer in the GEMM (Megatron-LM's
    --gradient-accumulation-fusion); needs apex's fused_weight_gradient_mlp_cuda, off without."""
    peak_tflops: float = 989.0
    """Per-device dense bf16 peak used for MFU (H100 SXM: 989)."""


@dataclasses.dataclass
class CheckpointConfig:
    save: str = ""
    """Run directory: checkpoints iter_NNNNNNN/, the latest pointer, logs."""
    save_interval: int = 500
    keep: int = 3
    """Complete checkpoints kept (older ones are deleted after a newer one is complete)."""
    optimizer_format: OptimizerFormat = "dp_reshardable"
    """How the distributed optimizer saves its state (Megatron-LM's default and
    --dist-ckpt-optim-fully-reshardable): 'dp_reshardable' writes each rank's own shard, nothing
    gathered, and resumes at another DP size only; 'fully_reshardable' gathers every DP rank's
    state (host memory of the whole optimizer state per TP/PP rank) and resumes at any layout:
    use it for the save before changing TP, PP or CP. The replicated optimizer (no TE/apex)
    always reshards fully."""


@dataclasses.dataclass
class LoggingConfig:
    wandb_project: str = ""
    """Empty: no wandb. Runs offline unless WANDB_MODE says otherwise."""
    wandb_run: str = ""
    tensorboard: bool = False


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    ddp: DDPConfig = dataclasses.field(default_factory=DDPConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Check files and values that would otherwise fail late."""
        if not self.checkpoint.save:
            raise ConfigError("checkpoint.save: a run directory is required")
        if not self.model.init_from and not self.model.hf_dir:
            raise ConfigError("model.hf_dir: required unless model.init_from names a checkpoint")
        for key, path in (("model.hf_dir", self.model.hf_dir), ("model.tokenizer", self.model.tokenizer),
                          ("model.init_from", self.model.init_from), ("data.blend", self.data.blend)):
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: {path} does not exist")
        if not self.data.blend:
            raise ConfigError("data.blend: a blend file is required")
        if not 0 <= self.optim.warmup_steps < self.train.steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} must be below train.steps={self.train.steps}")
        lora, train_what = self.train.lora, self.train.freeze.train
        if lora is not None and train_what == "all":
            raise ConfigError("train.lora: the base weights stay frozen under LoRA; set train.freeze.train to "
                              "none (adapters only), new_vocab_rows, new_input_rows, new_output_rows or vocab")
        if self.ddp.bucket_size is not None and self.ddp.bucket_size <= 0:
            raise ConfigError(f"ddp.bucket_size={self.ddp.bucket_size} must be positive (or null for the default)")
        if lora is None and train_what == "none":
            raise ConfigError("train.freeze.train=none trains nothing without train.lora")
        o = self.optim
        if o.vocab_min_lr is not None and o.vocab_lr is None:
            raise ConfigError("optim.vocab_min_lr needs optim.vocab_lr")
        if o.vocab_lr is not None and not 0 <= (o.vocab_min_lr if o.vocab_min_lr is not None else o.min_lr) <= o.vocab_lr:
            raise ConfigError(f"optim.vocab_lr={o.vocab_lr} must be at least the vocabulary's min LR "
                              f"({o.vocab_min_lr if o.vocab_min_lr is not None else o.min_lr})")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError("train.global_batch_size must be a multiple of train.micro_batch_size")
        self._validate_context_parallel()

    def _validate_context_parallel(self) -> None:
        p = self.parallel
        if p.context_parallel < 1:
            raise ConfigError(f"parallel.context_parallel={p.context_parallel} must be at least 1")
        if p.context_parallel == 1:
            return
        if self.data.per_document_attention:
            raise ConfigError("parallel.context_parallel: causal attention only; data.per_document_attention "
                              "needs the whole sequence's document boundaries on every rank")
        # every rank holds 2 chunks of the sequence, split again over TP under sequence parallelism
        split_over_tp = p.sequence_parallel and p.tp > 1
        unit = 2 * p.context_parallel * (p.tp if split_over_tp else 1)
        if self.data.seq_length % unit:
            raise ConfigError(f"data.seq_length={self.data.seq_length} must be a multiple of {unit} "
                              f"(2 chunks per context-parallel rank{' × TP' if split_over_tp else ''})")


def transformer_overrides(config: Config) -> dict[str, Any]:
    """The megatron-core TransformerConfig fields set by the run's performance settings, as far as
    this machine has what they need."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_adapt.model.config import gpu_module_available

    # calculate_per_token_loss: a step's gradient is that of the mean loss over the global batch's
    # target tokens; megatron-core's default averages per micro-batch means, which weights tokens
    # by how the batch was split into micro-batches and DP ranks once loss masks differ in length.
    out: dict[str, Any] = {"calculate_per_token_loss": True,
                           "sequence_parallel": config.parallel.sequence_parallel and config.parallel.tp > 1,
                           "context_parallel_size": config.parallel.context_parallel,
                           "attention_backend": AttnBackend[config.model.attention_backend],
                           # megatron-core's linears accumulate in the GEMM with apex's CUDA
                           # extension, and refuse the setting without it
                           "gradient_accumulation_fusion": config.train.gradient_accumulation_fusion
                           and gpu_module_available("fused_weight_gradient_mlp_cuda")}
    if config.train.recompute == "selective":
        out["recompute_granularity"] = "selective"
    elif config.train.recompute == "full":
        out |= {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return out


def _coerce(value: Any, kind: Any, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(kind, value, key + ".")
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        if value not in typing.get_args(kind):
            choices = ", ".join(str(c) for c in typing.get_args(kind))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        if value is None:
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
        return _coerce(value, kind, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if kind is str and value is None:  # `--set model.tokenizer=` clears a path
        return ""
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None


def _build(cls: type, data: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


_VARIABLE = re.compile(r"\$\{(\w+)\}")


def expand_variables(data: Any, source: str, key: str = "") -> Any:
    """``${NAME}`` in every string replaced by the environment's NAME (the recipe's ``WORK`` and
    ``BASE_MODEL``), so one config serves any work directory; an unset NAME is refused by key."""
    if isinstance(data, dict):
        return {k: expand_variables(v, source, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_variables(v, source, key) for v in data]
    if not isinstance(data, str):
        return data

    def value(match: re.Match) -> str:
        if match.group(1) not in os.environ:
            raise ConfigError(f"{source}: {key} uses ${{{match.group(1)}}}, which is not set in the environment "
                              f"(export {match.group(1)}=...)")
        return os.environ[match.group(1)]
    return _VARIABLE.sub(value, data)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The YAML file (if any) with ``a.b=value`` overrides applied and ``${NAME}``s expanded, validated."""
    try:
        data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {} if path else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    config = _build(Config, expand_variables(data, str(path or "--set")))
    config.validate()
    return config


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
