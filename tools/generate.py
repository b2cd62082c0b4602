"""Generate text with an exported HF model (offline), to see what training did.

    python tools/generate.py --model release/vi-llama --prompt "Việt Nam là" --max-new-tokens 40
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--greedy", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(0)
    for prompt in args.prompt:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                             pad_token_id=tokenizer.eos_token_id)
        print(f"> {prompt}\n{tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
