"""Peak memory and time of tools/convert_checkpoint.py on a ~1.1B-parameter random LLaMA.

    python bench/convert_memory.py --work-dir /tmp/convert-bench \
        --base-tokenizer ../shared/data/tokenizer/llama2_tokenizer.model --tokenizer-dir tokenizers/vi

Makes a TinyLlama-1.1B-shaped checkpoint (bf16, 32000 vocab, shards of --shard-gb) with random
weights, written tensor by tensor, then runs hf-to-megatron (growing the vocabulary to the
extended tokenizer, subword-mean) and megatron-to-hf, each in its own process, and prints their
wall time and peak RSS against the size of the largest input shard (target: RSS ≤ 2× shard).
Each direction is measured in its own process. megatron-to-hf runs twice: from the converted start checkpoint (HF layout) and from a training
checkpoint (megatron-core distributed checkpoint, saved here from the loaded start model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_adapt.checkpoint.convert import write_hf_shards  # noqa: E402
from megatron_adapt.model.config import LlamaArchitecture  # noqa: E402
from megatron_adapt.model.weights import hf_shapes  # noqa: E402


def make_random_llama(directory: Path, tokenizer: str, shard_bytes: int) -> int:
    arch = LlamaArchitecture(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, head_dim=64, torch_dtype="bfloat16")
    directory.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(arch)
    generator = torch.Generator().manual_seed(0)

    def random(name: str) -> torch.Tensor:
        return torch.randn(shapes[name], generator=generator) * 0.02

    write_hf_shards(arch, random, directory, torch.bfloat16, shard_bytes)
    (directory / "config.json").write_text(json.dumps(arch.to_hf_config()))
    shutil.copy(tokenizer, directory / "tokenizer.model")
    return max(p.stat().st_size for p in directory.glob("*.safetensors"))


def save_training_checkpoint(start: Path, out: Path) -> None:
    """A training checkpoint of the start model, as a run's first save would write it (run in a child)."""
    from megatron_adapt import distributed
    from megatron_adapt.checkpoint import train_state
    from megatron_adapt.checkpoint.format import latest
    from megatron_adapt.model.build import build_llama

    distributed.initialize()
    source = latest(start)
    model = build_llama(LlamaArchitecture.from_hf_config(source), params_dtype=torch.bfloat16)
    train_state.load(source, model)
    train_state.save(out, 1, model)
    distributed.destroy()


def run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one conversion in a fresh process (its own rusage, via wait4)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert_checkpoint.py {' '.join(args)} failed")
    return time.time() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--base-tokenizer", required=True, help="LLaMA-2's tokenizer.model (32000 pieces)")
    parser.add_argument("--tokenizer-dir", required=True, help="its extension (tools/extend_tokenizer.py)")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--direction", choices=["both", "hf-to-megatron", "megatron-to-hf"], default="both")
    parser.add_argument("--save-training-checkpoint", nargs=2, metavar=("START", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_training_checkpoint:
        return save_training_checkpoint(*map(Path, args.save_training_checkpoint))
    work = Path(args.work_dir)
    hf = work / "hf"
    largest = make_random_llama(hf, args.base_tokenizer, int(args.shard_gb * 2**30)) if not hf.exists() else \
        max(p.stat().st_size for p in hf.glob("*.safetensors"))
    params = sum(torch.Size(s).numel() for s in hf_shapes(LlamaArchitecture.from_hf_config(hf)).values())
    rows = []
    if args.direction in ("both", "hf-to-megatron"):
        rows.append(("hf-to-megatron (+resize)", *run(["hf-to-megatron", "--hf-dir", str(hf), "--tokenizer-dir",
                                                         args.tokenizer_dir, "--output", str(work / "megatron")])))
    if args.direction in ("both", "megatron-to-hf"):
        rows.append(("megatron-to-hf, start ckpt", *run(["megatron-to-hf", "--checkpoint", str(work / "megatron"),
                                                          "--tokenizer-dir", args.tokenizer_dir,
                                                          "--output", str(work / "release")])))
        shutil.rmtree(work / "trained", ignore_errors=True)
        subprocess.run([sys.executable, __file__, "--work-dir", str(work), "--base-tokenizer", args.base_tokenizer,
                        "--tokenizer-dir", args.tokenizer_dir, "--save-training-checkpoint", str(work / "megatron"),
                        str(work / "trained")], check=True, capture_output=True)
        rows.append(("megatron-to-hf, training ckpt", *run(["megatron-to-hf", "--checkpoint", str(work / "trained"),
                                                             "--tokenizer-dir", args.tokenizer_dir,
                                                             "--output", str(work / "release2")])))
    print(f"model: {params / 1e9:.2f}B parameters, bf16; largest input shard {largest / 2**30:.2f} GiB")
    print(f"{'':31}{'seconds':>9}{'peak RSS GiB':>14}{'RSS / shard':>13}")
    for name, seconds, rss in rows:
        print(f"{name:31}{seconds:>9.1f}{rss / 2**30:>14.2f}{rss / largest:>12.2f}x")


if __name__ == "__main__":
    main()
