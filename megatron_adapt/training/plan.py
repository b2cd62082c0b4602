"""What a training run will do, decided once from its config before anything is built.

Everything that can be refused is refused here, on one process, before ``distributed.initialize``
and before a model is built, so a bad config never costs a queue wait and a GPU hour: which
checkpoint the run starts from and whether it resumes, the architecture with its vocabulary size,
which rows are the base vocabulary, the end-of-document id the data was made with, the optimizer
kind, the data blend and the parallel layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron_adapt.checkpoint.format import CheckpointMeta, latest
from megatron_adapt.data.blend import BlendEntry, load_blend
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.tokenizer.load import TextTokenizer, load_tokenizer
from megatron_adapt.training.config import Config, ConfigError
from megatron_adapt.training.optim import optimizer_kind_for_this_machine


@dataclasses.dataclass(frozen=True)
class RunPlan:
    arch: LlamaArchitecture
    """The model as it trains (vocabulary grown to ``tokenizer`` where that extends the checkpoint)."""
    resume_from: Path | None
    """This run's own latest checkpoint, when it resumes: weights, optimizer, schedule and data
    position come back from it."""
    start_from: Path | None
    """Where the run's first weights come from: ``model.init_from``'s latest checkpoint; None: the
    HF checkpoint ``model.hf_dir``. A LoRA run's checkpoints hold adapters and vocabulary tables
    only: it resumes on this base."""
    base_vocab: int
    """Rows of the vocabulary the start checkpoint was trained with (stage 1 trains the rest)."""
    base_tokenizer: str
    tokenizer: str | None
    """The tokenizer (file or directory) the data was preprocessed with, if the config names one."""
    eod_id: int
    blend: list[BlendEntry]
    params_dtype: torch.dtype
    distributed_optimizer: bool

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    def first_trainable_row(self, config: Config) -> int | None:
        """The vocabulary row split the model is built with (stage 1: rows past the base vocabulary)."""
        return config.train.freeze.first_trainable_row(self.base_vocab)


def _start_checkpoint(config: Config) -> Path | None:
    if not config.model.init_from:
        return None
    start = latest(config.model.init_from)
    if start is None:
        raise ConfigError(f"model.init_from: {config.model.init_from} has no complete checkpoint")
    if CheckpointMeta.read(start).adapters_only:
        raise ConfigError(f"model.init_from: {start} holds LoRA adapters, not a whole model; export it merged "
                          "(tools/convert_checkpoint.py megatron-to-hf) and start from that with model.hf_dir")
    return start


def _tokenizer(path: str | Path, field: str) -> TextTokenizer:
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}: {err}") from None


def _base_tokenizer(config: Config) -> str:
    """The checkpoint's own tokenizer: model.base_tokenizer, else whichever kind hf_dir holds."""
    if config.model.base_tokenizer:
        return config.model.base_tokenizer
    hf_dir = Path(config.model.hf_dir)
    return str(hf_dir / "tokenizer.json") if (hf_dir / "tokenizer.json").is_file() and \
        not (hf_dir / "tokenizer.model").is_file() else str(hf_dir / "tokenizer.model")


def _base_vocab(config: Config, arch: LlamaArchitecture, base_tokenizer: str, source: Path | None) -> int:
    if Path(base_tokenizer).exists():
        return _tokenizer(base_tokenizer, "model.base_tokenizer").vocab_size
    if source is not None and config.train.freeze.new_rows_only:
        raise ConfigError(f"model.base_tokenizer: {base_tokenizer} does not exist; it tells which rows are new")
    return arch.vocab_size  # the checkpoint's own rows are the base vocabulary


def _eod_id(tokenizer: TextTokenizer | None, arch: LlamaArchitecture) -> int:
    """The end-of-document id the data was preprocessed with: the tokenizer's EOS."""
    if tokenizer is not None and tokenizer.eos_id is not None:
        return tokenizer.eos_id
    if isinstance(arch.eos_token_id, int):
        return arch.eos_token_id
    raise ConfigError(f"model.tokenizer: config.json's eos_token_id is {arch.eos_token_id!r}, not one id; name "
                      "the tokenizer the data was preprocessed with, whose EOS ends every document")


def _check_optimizer_layout(meta: CheckpointMeta, config: Config, checkpoint: Path) -> None:
    """A distributed optimizer's 'dp_reshardable' state resumes at its own TP/PP/CP only."""
    if meta.optimizer != "distributed" or meta.optimizer_format != "dp_reshardable":
        return
    saved = {k: meta.layout.get(k, 1) for k in ("tp", "pp", "cp")}
    wanted = {"tp": config.parallel.tp, "pp": config.parallel.pp, "cp": config.parallel.context_parallel}
    if saved != wanted:
        raise ConfigError(f"parallel: {checkpoint} was saved at TP {saved['tp']} × PP {saved['pp']} × CP {saved['cp']} with "
                          "checkpoint.optimizer_format=dp_reshardable, which resumes at that layout only (any DP size); "
                          "resume there once with checkpoint.optimizer_format=fully_reshardable and save, then change "
                          "the layout")


def plan_run(config: Config) -> RunPlan:
    resume_from, start_from = latest(config.checkpoint.save), _start_checkpoint(config)
    source = resume_from or start_from  # the checkpoint whose config.json describes the model now
    arch = LlamaArchitecture.from_hf_config(source if source else Path(config.model.hf_dir))
    base_tokenizer = _base_tokenizer(config)
    base_vocab = _base_vocab(config, arch, base_tokenizer, source)
    tokenizer = _tokenizer(config.model.tokenizer, "model.tokenizer") if config.model.tokenizer else None
    if tokenizer is not None:
        vocab = tokenizer.vocab_size
        if source is not None and vocab != arch.vocab_size:
            raise ConfigError(f"model.tokenizer: {config.model.tokenizer} has {vocab} pieces but checkpoint "
                              f"{source} has {arch.vocab_size} vocabulary rows")
        if source is None and vocab < base_vocab:  # rows past the base tokenizer's ids are padding (Qwen)
            raise ConfigError(f"model.tokenizer: {config.model.tokenizer} has {vocab} pieces, fewer than "
                              f"the base tokenizer {base_tokenizer}'s {base_vocab}")
        arch = arch.with_vocab_size(vocab)
    planned = optimizer_kind_for_this_machine()
    if resume_from is not None:
        meta = CheckpointMeta.read(resume_from)
        saved = meta.optimizer
        _check_optimizer_layout(meta, config, resume_from)
        if saved and saved != planned:
            raise ConfigError(f"{resume_from} was saved by the {saved} optimizer, this run uses the {planned} one "
                              "(their states differ in form): resume on the same kind of machine")
    blend = load_blend(config.data.blend)  # names any missing data prefix
    arch.check_parallel_layout(config.parallel.tp, config.parallel.pp)
    return RunPlan(arch=arch, resume_from=resume_from, start_from=start_from, base_vocab=base_vocab,
                   base_tokenizer=base_tokenizer, tokenizer=config.model.tokenizer or None,
                   eod_id=_eod_id(tokenizer, arch), blend=blend,
                   params_dtype=torch.bfloat16 if config.optim.bf16 else torch.float32,
                   distributed_optimizer=planned == "distributed")


def random_weights_plan(arch: LlamaArchitecture, config: Config, base_vocab: int) -> RunPlan:
    """A plan for a model with random weights and no data (benchmarks): rows from ``base_vocab``
    on are the added ones, the machine picks the optimizer as for a run."""
    return RunPlan(arch=arch, resume_from=None, start_from=None, base_vocab=base_vocab, base_tokenizer="",
                   tokenizer=None, eod_id=arch.eos_token_id if isinstance(arch.eos_token_id, int) else 0, blend=[],
                   params_dtype=torch.bfloat16 if config.optim.bf16 else torch.float32,
                   distributed_optimizer=optimizer_kind_for_this_machine() == "distributed")
