"""Load an HF LLaMA checkpoint into megatron-core at a TP/PP layout and compare logits with HF.

    torchrun --nproc-per-node 2 tools/check_against_hf.py --hf-dir LLAMA_DIR --tp 2
    torchrun --nproc-per-node 4 tools/check_against_hf.py --tp 2 --pp 2   # tiny random LLaMA

Without --hf-dir a tiny random LLaMA is made with transformers in --work-dir. With --export-dir
the megatron-core model is written back as an HF checkpoint and compared tensor by tensor. Prints
a summary and writes check.json (max logits difference, layout, seconds) to --work-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_adapt import distributed
from megatron_adapt.checkpoint.hf import HFCheckpointReader, load_hf_checkpoint, save_hf_checkpoint
from megatron_adapt.log_setup import setup_logging
from megatron_adapt.model.build import build_llama
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.tiny import make_tiny_llama
from megatron_adapt.training.step import forward_backward


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", help="HF LLaMA checkpoint (default: make a tiny random one)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--work-dir", default="runs/check_against_hf")
    parser.add_argument("--export-dir", help="also write the megatron-core model back as HF here")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logits diff| in fp32")
    args = parser.parse_args()
    setup_logging()

    start = time.time()
    work_dir = Path(args.work_dir)
    distributed.initialize(args.tp, args.pp)
    hf_dir = args.hf_dir or str(work_dir / "tiny_llama_hf")
    if args.hf_dir is None and dist.get_rank() == 0:
        make_tiny_llama(hf_dir, vocab_size=3000, heads=8, kv_heads=4, max_positions=512)
    dist.barrier()

    arch = LlamaArchitecture.from_hf_config(hf_dir)
    model = build_llama(arch, seq_length=args.seq_len)
    load_hf_checkpoint(model, hf_dir)
    tokens = torch.randint(0, arch.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        forward_backward(model, [dict(tokens=tokens, labels=tokens)], forward_only=True,
                         on_logits=lambda l: captured.append(gather_from_tensor_model_parallel_region(l)))

    report: dict = {}
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        ours = captured[0][..., : arch.vocab_size].float().cpu()  # HF's model runs on the host
        report["max_abs_logits_diff"] = (ours - hf_logits(hf_dir, tokens)).abs().max().item()
    if args.export_dir:
        save_hf_checkpoint(model, args.export_dir)
        if dist.get_rank() == 0:
            original, exported = HFCheckpointReader(hf_dir), HFCheckpointReader(args.export_dir)
            differing = [n for n in original.weight_map if not torch.equal(original[n], exported[n])]
            report["export_dir"], report["export_tensors_differing"] = args.export_dir, differing
    reports: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        merged = {k: v for r in reports for k, v in r.items()}
        merged.update(hf_dir=hf_dir, tp=args.tp, pp=args.pp, seq_len=args.seq_len,
                      seconds=round(time.time() - start, 1))
        ok = merged["max_abs_logits_diff"] <= args.tolerance and not merged.get("export_tensors_differing")
        merged["ok"] = ok
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "check.json").write_text(json.dumps(merged, indent=2))
        print(f"megatron-core TP={args.tp} PP={args.pp} vs HF: max |logits diff| = "
              f"{merged['max_abs_logits_diff']:.2e} (tolerance {args.tolerance:.0e})")
        if args.export_dir:
            print(f"exported to {args.export_dir}: {len(merged['export_tensors_differing'])} tensors differ")
        print(f"{'OK' if ok else 'MISMATCH'}; report: {work_dir / 'check.json'}")
        if not ok:
            os._exit(1)
    distributed.destroy()


if __name__ == "__main__":
    main()
