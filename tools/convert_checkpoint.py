"""Convert between Hugging Face LLaMA checkpoints and megatron-adapt training checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Llama-2-7b-hf --tokenizer-dir tokenizers/vi \
        --tp 2 --pp 2 --init subword-mean --output runs/vi-start
    python tools/convert_checkpoint.py megatron-to-hf --checkpoint runs/stage2 --output release/vi-llama --dtype bf16

Neither direction builds the model: peak memory is about one tensor (a layer's, for a training
checkpoint), not a shard or the model. hf-to-megatron writes a start checkpoint whose weights stay
in HF tensor layout (``iter_0000000/model/``, resized and streamed tensor by tensor through
``checkpoint/streaming.py``), which training at any TP/PP starts from (``model.init_from``);
training checkpoints are megatron-core distributed checkpoints, which megatron-to-hf reads one
layer slice at a time (``checkpoint/dist_reader.py``). Output is written under a temporary name and
renamed, so an interrupted conversion leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from megatron_adapt import distributed
from megatron_adapt.checkpoint.dist_reader import DistCheckpointReader
from megatron_adapt.checkpoint.hf import INDEX_NAME, HFCheckpointReader
from megatron_adapt.checkpoint.streaming import plan_shards, write_shard
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.resize import INIT_METHODS, RESIZED, resizing_reader
from megatron_adapt.model.weights import CheckpointMismatchError, hf_shapes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _write_sharded(arch: LlamaArchitecture, get, out: Path, dtype: torch.dtype, max_shard_bytes: int) -> int:
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


def _check_complete(reader: HFCheckpointReader, arch: LlamaArchitecture) -> None:
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


def hf_to_megatron(args) -> Path:
    reader = HFCheckpointReader(args.hf_dir)
    arch = LlamaArchitecture.from_hf_config(args.hf_dir)
    _check_complete(reader, arch)
    tok = Path(args.tokenizer_dir) / "tokenizer.model"
    get = resizing_reader(reader.__getitem__, args.base_tokenizer or str(Path(args.hf_dir) / "tokenizer.model"),
                          str(tok), args.init)
    arch = arch.with_vocab_size(get(RESIZED[0]).shape[0])
    arch.check_parallel_layout(args.tp, args.pp)
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_dir = tmp / "iter_0000000" / "model"
    model_dir.mkdir(parents=True)
    dtype = DTYPES[args.dtype] if args.dtype else reader["model.norm.weight"].dtype
    _write_sharded(arch, get, model_dir, dtype, args.max_shard_bytes)
    for config_dir in (model_dir, model_dir.parent):  # HF's place, and where every checkpoint has it
        (config_dir / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    meta = {"iteration": 0, "consumed_samples": 0, "layout": {"tp": args.tp, "pp": args.pp, "world": 0},
            "contents": ["model"], "optimizer": None, "scheduler": None,
            "config": {"converted_from": str(args.hf_dir), "tokenizer": str(tok), "init": args.init}}
    (tmp / "iter_0000000" / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "latest").write_text("iter_0000000")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _recorded_tokenizer_dir(checkpoint: Path) -> Path:
    """The tokenizer a checkpoint was trained (or converted) with, from its meta.json."""
    config = json.loads((checkpoint / "meta.json").read_text()).get("config", {})
    model_file = config.get("model", {}).get("tokenizer") or config.get("tokenizer")
    if not model_file:
        raise FileNotFoundError(f"{checkpoint}/meta.json records no tokenizer; pass --tokenizer-dir")
    return Path(model_file).parent


def megatron_to_hf(args) -> Path:
    source = Path(args.checkpoint)
    if (source / "latest").exists():
        source = source / (source / "latest").read_text().strip()
    if not (source / "meta.json").exists():
        raise FileNotFoundError(f"{source}: not a complete megatron-adapt checkpoint (no meta.json)")
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = DTYPES[args.dtype]
    if (source / "dist").exists():
        distributed.initialize()
        try:
            reader = DistCheckpointReader(source)
            _write_sharded(reader.arch, reader.__getitem__, tmp, dtype, args.max_shard_bytes)
        finally:
            distributed.destroy()
        arch = reader.arch
    else:  # a converted start checkpoint: HF layout already
        hf_reader = HFCheckpointReader(source / "model")
        arch = LlamaArchitecture.from_hf_config(source / "model")
        _check_complete(hf_reader, arch)
        _write_sharded(arch, hf_reader.__getitem__, tmp, dtype, args.max_shard_bytes)
    config = arch.to_hf_config()
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id, "do_sample": True,
                  "temperature": 0.7, "top_p": 0.9, "max_length": arch.max_position_embeddings}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else _recorded_tokenizer_dir(source)
    for name in TOKENIZER_FILES:
        if not (tok_dir / name).exists():
            raise FileNotFoundError(f"{tok_dir / name}: tokenizer file missing (run tools/extend_tokenizer.py)")
        shutil.copy(tok_dir / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-megatron")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--tokenizer-dir", required=True, help="output of tools/extend_tokenizer.py")
    a.add_argument("--base-tokenizer", help="the checkpoint's tokenizer (default HF_DIR/tokenizer.model)")
    a.add_argument("--init", choices=INIT_METHODS, default="subword-mean")
    a.add_argument("--dtype", choices=list(DTYPES), help="cast (default: keep)")
    a.add_argument("--output", required=True)
    a.add_argument("--max-shard-bytes", type=int, default=2 << 30)
    a.add_argument("--tp", type=int, default=1, help="checked to divide the heads (any layout can start from the output)")
    a.add_argument("--pp", type=int, default=1, help="checked to divide the layers")
    b = sub.add_parser("megatron-to-hf")
    b.add_argument("--checkpoint", required=True, help="run directory or iter_NNNNNNN directory")
    b.add_argument("--tokenizer-dir", help="tools/extend_tokenizer.py output (default: the one in meta.json)")
    b.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    b.add_argument("--output", required=True)
    b.add_argument("--max-shard-bytes", type=int, default=2 << 30)
    args = parser.parse_args(argv)
    try:
        out = hf_to_megatron(args) if args.direction == "hf-to-megatron" else megatron_to_hf(args)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
