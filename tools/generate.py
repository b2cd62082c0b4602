"""Generate text with an exported HF model (offline), to see what training did.

    python tools/generate.py --model release/vi-llama --prompt "Việt Nam là" --max-new-tokens 40
    python tools/generate.py --model release/vi-chat --chat --prompt "Xin chào" --prompt "Hà Nội ở đâu?"

With ``--chat`` the prompts are the user's turns of one conversation, rendered by the export's
chat template (``tokenizer.apply_chat_template``, the training format) with the answers so far.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_adapt.evaluation.hf_model import DTYPES, load_causal_lm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--chat", action="store_true", help="prompts are user turns of one conversation")
    parser.add_argument("--system", help="--chat: a system message (default: the template's own)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--device", help="default: cuda if there is a GPU, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_causal_lm(args.model, args.device, args.dtype)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.chat and not tokenizer.chat_template:
        print(f"error: {args.model} has no chat template; export with "
              "tools/convert_checkpoint.py megatron-to-hf --chat-template NAME", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def complete(ids: torch.Tensor) -> str:
        ids = ids.to(model.device)
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                             pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True).strip()

    for prompt in args.prompt:
        if args.chat:
            messages.append({"role": "user", "content": prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            answer = complete(ids)
            messages.append({"role": "assistant", "content": answer})
        else:
            answer = complete(tokenizer(prompt, return_tensors="pt").input_ids)
        print(f"> {prompt}\n{answer}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
