"""Conversions between Hugging Face LLaMA checkpoints and megatron-adapt run directories.

Neither direction builds the model: peak memory is about one tensor (a layer's, for a training
checkpoint), not a shard or the model. ``hf_to_megatron`` writes a start checkpoint whose weights
stay in HF tensor layout (resized and streamed tensor by tensor through ``streaming``), which
training at any TP/PP starts from (``model.init_from``); ``megatron_to_hf`` reads a training
checkpoint (megatron-core distributed) one layer slice at a time through ``dist_reader``. Output is
written under a temporary name and renamed, so an interrupted conversion leaves nothing that
looks complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors import safe_open
from tqdm import tqdm

from megatron_adapt import distributed
from megatron_adapt.atomic import atomic_dir
from megatron_adapt.checkpoint.dist_reader import DistCheckpointReader
from megatron_adapt.checkpoint.format import (
    WEIGHTS_HF,
    CheckpointMeta,
    commit,
    resolve_checkpoint,
    staging_dir,
    weights_dir,
    weights_kind,
)
from megatron_adapt.checkpoint.hf import INDEX_NAME, HFCheckpointReader
from megatron_adapt.checkpoint.lora_export import ADAPTER_DIR, lora_run_reader, merged, write_peft_adapter
from megatron_adapt.checkpoint.model_card import model_card
from megatron_adapt.checkpoint.streaming import plan_shards, write_shard
from megatron_adapt.data.chat import CHAT_TEMPLATES
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.resize import RESIZED, InitMethod, resizing_reader
from megatron_adapt.model.weights import CheckpointMismatchError, hf_shapes
from megatron_adapt.tokenizer import byte_level_bpe
from megatron_adapt.tokenizer.hf_files import write_hf_files
from megatron_adapt.tokenizer.load import locate
from megatron_adapt.tokenizer.sentencepiece_model import load_model_proto

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""What ``tokenizer.hf_files.write_hf_files`` writes beside a ``tokenizer.model``."""
DEFAULT_SHARD_BYTES = 2 << 30


def write_hf_shards(arch: LlamaArchitecture, get: Callable[[str], torch.Tensor], out: Path, dtype: torch.dtype,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """All tensors of ``arch`` in safetensors shards with an index, one tensor in memory at a time."""
    shapes = hf_shapes(arch)
    shards = plan_shards(shapes, dtype, max_shard_bytes)
    weight_map, total = {}, 0
    bar = tqdm(total=len(shapes), desc="tensors", disable=not sys.stderr.isatty())
    for i, names in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(out / name, names, shapes, dtype, get, on_tensor=bar.update)
        weight_map.update({n: name for n in names})
    bar.close()
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def check_complete(reader: HFCheckpointReader, arch: LlamaArchitecture) -> None:
    """Every tensor ``arch`` implies is in the checkpoint, readable, with its shape; a tied checkpoint
    carries no ``lm_head.weight`` other than its embedding."""
    if arch.tie_word_embeddings and "lm_head.weight" in reader.weight_map:
        if not torch.equal(reader["lm_head.weight"], reader["model.embed_tokens.weight"]):
            raise CheckpointMismatchError(
                f"{reader.directory}: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight (set tie_word_embeddings=false to keep both)")
    for name, shape in hf_shapes(arch).items():
        if name not in reader.weight_map:
            raise CheckpointMismatchError(f"{reader.directory}: index has no entry for {name}")
        shard = reader.directory / reader.weight_map[name]
        try:
            with safe_open(shard, "pt") as f:
                got = tuple(f.get_slice(name).get_shape())
        except Exception as err:  # truncated or corrupt shard
            raise CheckpointMismatchError(f"{shard}: cannot read {name} ({err})") from None
        if got != shape:
            raise CheckpointMismatchError(f"tensor {name}: checkpoint shape {got} != shape {shape} implied by the config")


def hf_to_megatron(hf_dir: str | Path, tokenizer_dir: str | Path, output: str | Path,
                   base_tokenizer: str | Path | None = None, init: InitMethod = "subword-mean",
                   dtype: torch.dtype | None = None, tp: int = 1, pp: int = 1,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A start checkpoint (run directory) from an HF checkpoint, its vocabulary grown to the tokenizer
    in ``tokenizer_dir``. ``tp``/``pp`` are only checked to divide the model: any layout starts
    from the output. ``dtype`` None keeps the checkpoint's."""
    reader = HFCheckpointReader(hf_dir)
    arch = LlamaArchitecture.from_hf_config(hf_dir)
    check_complete(reader, arch)
    _, tokenizer = locate(tokenizer_dir)
    get = resizing_reader(reader.__getitem__, str(base_tokenizer or hf_dir), str(tokenizer), init)
    arch = arch.with_vocab_size(get(RESIZED[0]).shape[0])
    arch.check_parallel_layout(tp, pp)
    out = Path(output)
    with atomic_dir(out) as tmp:
        model_dir = staging_dir(tmp, 0) / WEIGHTS_HF
        model_dir.mkdir(parents=True)
        write_hf_shards(arch, get, model_dir, dtype or reader["model.norm.weight"].dtype, max_shard_bytes)
        (model_dir / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
        meta = CheckpointMeta(iteration=0, consumed_samples=0, layout={"tp": tp, "pp": pp, "world": 0},
                              contents=["model"],
                              converted_from={"hf_dir": str(hf_dir), "tokenizer": str(tokenizer), "init": init})
        commit(tmp, meta, arch)
    return out


def megatron_to_hf(checkpoint: str | Path, output: str | Path, tokenizer_dir: str | Path | None = None,
                   dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   chat_template: str | None = None, lora_export: Literal["merge", "peft"] = "merge",
                   evaluation: str | Path | None = None) -> Path:
    """An HF model directory (weights, config, generation config, tokenizer files) from a run directory's
    latest checkpoint or an ``iter_N`` directory. The tokenizer defaults to the one the checkpoint
    records; ``chat_template`` (a name in ``data.chat.CHAT_TEMPLATES``) is written into its
    tokenizer_config.json. A LoRA run's checkpoint is exported with its adapters merged, or with
    ``lora_export="peft"`` as its base (trained vocabulary rows included) plus a PEFT adapter in
    ``OUTPUT/adapter`` (``lora_export.py``). The model card (README.md, ``model_card.py``) gets
    ``evaluation``'s figures (``tools/evaluate.py``'s JSON) when given. Joins a one-process
    torch.distributed group for a training checkpoint."""
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {chat_template!r}; expected one of {', '.join(CHAT_TEMPLATES)}")
    source = resolve_checkpoint(checkpoint)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else _recorded_tokenizer_dir(source)
    locate(tok_dir)  # refuse a directory without a tokenizer before writing anything
    figures = None
    if evaluation is not None:
        try:
            figures = json.loads(Path(evaluation).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--eval {evaluation}: not an evaluation JSON ({err})") from None
        if not isinstance(figures, dict) or not isinstance(figures.get("models"), dict):
            raise ValueError(f"--eval {evaluation}: no 'models' object (tools/evaluate.py writes one)")
    out = Path(output)
    with atomic_dir(out) as tmp:
        arch = _write_hf_model(source, tmp, dtype, max_shard_bytes, lora_export, str(out))
        config = arch.to_hf_config()
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id, "do_sample": True,
                      "temperature": 0.7, "top_p": 0.9, "max_length": arch.max_position_embeddings}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        export_tokenizer(tok_dir, tmp, chat_template)
        (tmp / "README.md").write_text(model_card(source, tok_dir, figures), encoding="utf-8")
    return out


def _write_hf_model(source: Path, out: Path, dtype: torch.dtype, max_shard_bytes: int,
                    lora_export: Literal["merge", "peft"], base_name: str) -> LlamaArchitecture:
    """The weights of checkpoint ``source`` as HF shards in ``out``; returns its architecture."""
    if weights_kind(source) == "dist":
        distributed.initialize()
        try:
            reader = DistCheckpointReader(source)
            get = reader.__getitem__
            if reader.adapters_only:
                get = lora_run_reader(reader)
                if lora_export == "peft":
                    write_peft_adapter(reader.arch, get, reader.lora, out / ADAPTER_DIR, dtype, base_name)
                else:
                    get = merged(get, reader.lora)
            write_hf_shards(reader.arch, get, out, dtype, max_shard_bytes)
        finally:
            distributed.destroy()
        return reader.arch
    hf_reader = HFCheckpointReader(weights_dir(source))  # a converted start: HF layout already
    arch = LlamaArchitecture.from_hf_config(weights_dir(source))
    check_complete(hf_reader, arch)
    write_hf_shards(arch, hf_reader.__getitem__, out, dtype, max_shard_bytes)
    return arch


def export_tokenizer(tok_dir: Path, out: Path, chat_template: str | None = None) -> None:
    """The tokenizer files beside the weights; a directory with only ``tokenizer.model`` (a base
    tokenizer, say) gets its HF files written from it. A named chat template goes into
    tokenizer_config.json, where ``apply_chat_template`` finds it (a copied standalone
    chat_template file, which transformers would prefer, is left out)."""
    tok_dir, out = Path(tok_dir), Path(out)
    kind, file = locate(tok_dir)
    if kind == "byte_level_bpe":
        for name in ("tokenizer.json", *byte_level_bpe.COMPANION_FILES):
            if (tok_dir / name).is_file():
                shutil.copy(tok_dir / name, out / name)
    else:
        shutil.copy(file, out / "tokenizer.model")
        if all((tok_dir / name).exists() for name in HF_TOKENIZER_FILES):
            for name in HF_TOKENIZER_FILES:
                shutil.copy(tok_dir / name, out / name)
        else:
            write_hf_files(load_model_proto(tok_dir / "tokenizer.model"), out)
    if chat_template is not None:
        for name in ("chat_template.jinja", "chat_template.json"):
            (out / name).unlink(missing_ok=True)
        config_file = out / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        config["chat_template"] = CHAT_TEMPLATES[chat_template]
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _recorded_tokenizer_dir(checkpoint: Path) -> Path:
    """The tokenizer a checkpoint was trained (or converted) with, from its meta.json."""
    recorded = CheckpointMeta.read(checkpoint).tokenizer
    if not recorded:
        raise FileNotFoundError(f"{checkpoint}/meta.json records no tokenizer; pass --tokenizer-dir")
    return Path(recorded) if Path(recorded).is_dir() else Path(recorded).parent
