"""Multiple-choice scoring speed: an item's prompt once and its choices as one padded batch on the
prompt's key/value cache, against one whole forward pass per choice, side by side on the same
model and items.

    python bench/multiple_choice.py --model smollm2 --task-data ../shared/data/eval/vi --task arc_vi --items 60

Prints tokens scored per second (every token of every prompt + choice sequence) for both, and
that both give the same log-likelihoods.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_adapt.evaluation.hf_model import DTYPES, device_and_dtype, load_causal_lm
from megatron_adapt.evaluation.multiple_choice import _pair_tokens, choice_logliks, load_task


@torch.no_grad()
def one_at_a_time(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    out = []
    for choice in choices:
        context_ids, continuation = _pair_tokens(tokenizer, context, " " + choice)
        ids = torch.tensor([context_ids + continuation], device=model.device)
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, len(context_ids):]
        out.append(log_probs[len(context_ids) - 1:].gather(1, targets[:, None]).sum().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task-data", required=True)
    parser.add_argument("--task", default="arc_vi")
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=list(DTYPES))
    args = parser.parse_args()
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, tokenizer = load_causal_lm(args.model, str(device), dtype)
    _, items, _ = load_task(args.task, args.task_data, limit=args.items)
    tokens = sum(len(sum(_pair_tokens(tokenizer, it.query, " " + c), [])) for it in items for c in it.choices)
    rows, results = [], {}
    for name, score in (("shared prompt, batched choices", lambda it: choice_logliks(model, tokenizer, it.query,
                                                                                       it.choices, 4096)),
                        ("one forward per choice", lambda it: one_at_a_time(model, tokenizer, it.query, it.choices))):
        score(items[0])  # warm-up
        start = time.perf_counter()
        results[name] = [score(it) for it in items]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append((name, seconds, tokens / seconds))
    (a, b) = results.values()
    diff = max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    print(f"{args.task}, {len(items)} items, {tokens} tokens, {device} {dtype}; max |Δ loglik| {diff:.2e}")
    print(f"{'':34}{'seconds':>10}{'tokens/s':>12}{'ratio':>8}")
    for name, seconds, rate in rows:
        print(f"{name:34}{seconds:>10.2f}{rate:>12.0f}{rate / rows[1][2]:>7.2f}×")


if __name__ == "__main__":
    main()
