"""Convert between Hugging Face checkpoints, megatron-adapt training checkpoints and GGUF files.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Llama-2-7b-hf --tokenizer-dir tokenizers/vi \
        --tp 2 --pp 2 --init subword-mean --output runs/vi-start
    python tools/convert_checkpoint.py megatron-to-hf --checkpoint runs/stage2 --output release/vi-llama --dtype bf16
    python tools/convert_checkpoint.py megatron-to-hf --checkpoint runs/sft --output release/vi-chat --chat-template vbd
    python tools/convert_checkpoint.py megatron-to-hf --checkpoint runs/bo-lora --output release/bo --lora peft
    python tools/convert_checkpoint.py gguf-to-hf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2
    python tools/convert_checkpoint.py hf-to-gguf --hf-dir release/vi-llama --output release/vi-llama.q8_0.gguf \
        --outtype q8_0

Streaming, one tensor in memory at a time; see ``megatron_adapt/checkpoint/convert.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_adapt.atomic import write_text
from megatron_adapt.checkpoint.convert import DEFAULT_SHARD_BYTES, hf_to_megatron, megatron_to_hf
from megatron_adapt.checkpoint.gguf import gguf_to_hf
from megatron_adapt.checkpoint.gguf_export import hf_to_gguf
from megatron_adapt.data.chat import CHAT_TEMPLATES
from megatron_adapt.model.resize import INIT_METHODS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-megatron")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--tokenizer-dir", required=True, help="output of tools/extend_tokenizer.py")
    a.add_argument("--base-tokenizer", help="the checkpoint's tokenizer (default: the one in HF_DIR)")
    a.add_argument("--init", choices=INIT_METHODS, default="subword-mean")
    a.add_argument("--dtype", choices=list(DTYPES), help="cast (default: keep)")
    a.add_argument("--output", required=True)
    a.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    a.add_argument("--tp", type=int, default=1, help="checked to divide the heads (any layout can start from the output)")
    a.add_argument("--pp", type=int, default=1, help="checked to divide the layers")
    b = sub.add_parser("megatron-to-hf")
    b.add_argument("--checkpoint", required=True, help="run directory or iter_NNNNNNN directory")
    b.add_argument("--tokenizer-dir", help="tools/extend_tokenizer.py output (default: the one in meta.json)")
    b.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    b.add_argument("--output", required=True)
    b.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    b.add_argument("--lora", choices=["merge", "peft"], default="merge",
                   help="a LoRA run: adapters merged into the weights, or the base plus a PEFT adapter in OUTPUT/adapter")
    b.add_argument("--eval", help="tools/evaluate.py's JSON: its figures go into the model card (README.md)")
    b.add_argument("--chat-template", choices=list(CHAT_TEMPLATES),
                   help="the template the SFT data was rendered with, written into tokenizer_config.json")
    c = sub.add_parser("gguf-to-hf", help="a GGUF model (dequantized to fp32) as an HF directory")
    c.add_argument("--gguf", required=True)
    c.add_argument("--output", required=True)
    d = sub.add_parser("hf-to-gguf", help="an HF model directory (a megatron-to-hf export) as one GGUF file for llama.cpp")
    d.add_argument("--hf-dir", required=True)
    d.add_argument("--output", required=True, help="the .gguf file; its stats go beside it as NAME.stats.json")
    d.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16")
    d.add_argument("--tokenizer-pre", help="llama.cpp's pre-tokenizer name (default: read from tokenizer.json)")
    args = parser.parse_args(argv)
    try:
        if args.direction == "gguf-to-hf":
            out = gguf_to_hf(args.gguf, args.output)
        elif args.direction == "hf-to-gguf":
            stats = hf_to_gguf(args.hf_dir, args.output, args.outtype, args.tokenizer_pre)
            out = Path(args.output)
            write_text(out.with_suffix(".stats.json"), json.dumps(stats, indent=2))
            print(f"{stats['architecture']} GGUF, {stats['outtype']}, {stats['tensors']} tensors, "
                  f"{stats['bytes'] / 1e6:.1f} MB, tokenizer {stats['tokenizer_model']}/{stats['tokenizer_pre']}")
        elif args.direction == "hf-to-megatron":
            out = hf_to_megatron(args.hf_dir, args.tokenizer_dir, args.output, args.base_tokenizer, args.init,
                                 DTYPES.get(args.dtype), args.tp, args.pp, args.max_shard_bytes)
        else:
            out = megatron_to_hf(args.checkpoint, args.output, args.tokenizer_dir, DTYPES[args.dtype],
                                 args.max_shard_bytes, args.chat_template, args.lora, args.eval)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
