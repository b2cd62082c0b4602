"""Multiple-choice benchmarks scored as lm-evaluation-harness scores them: by the log-likelihood
of each choice given the prompt.

The Vietnamese tasks the VBD-LLaMA2 model card reports (arc_vi, mmlu_vi, truthfulqa_vi) come in
Okapi's format, one JSON object a line: ``{"id", "question", "choices", "gold", "query"}``, where
``query`` is the exact prompt; TruthfulQA adds ``mc2_choices`` / ``mc2_labels``. For a choice c
the score is ``loglik(" " + c | query)``, its tokens cut as lm-eval cuts them (the pair encoded
whole, the prompt's tokens taken off the front; no BOS). Metrics:

- ``acc``: the gold choice has the highest log-likelihood (a tie with a wrong choice counts wrong);
- ``acc_norm``: the same with each log-likelihood divided by its choice's length in characters;
- TruthfulQA ``mc1``: ``acc`` over its single-answer choices; ``mc2``: the probability mass of the
  true answers among ``mc2_choices``, normalized over them, read from ``mc2_labels`` (two items
  list their labels out of order, so the labels are used, not their positions).

An item whose gold text also appears as a wrong choice (three in mmlu_vi's validation split) has
no right answer: it is left out and counted in ``dropped``. Each standard error is the sample one
over items. The prompt of an item goes through the model once; its choices then run as one
padded batch on its key/value cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class TaskSpec:
    file: str
    """The items, in ``--task-data``."""
    fewshot_file: str | None = None
    """The pool few-shot examples are drawn from (same subject first), if the task has one."""
    mc2: bool = False


TASKS = {
    "arc_vi": TaskSpec("arc_vi_test.jsonl"),
    "mmlu_vi": TaskSpec("mmlu_vi_val.jsonl", fewshot_file="mmlu_vi_dev.jsonl"),
    "truthfulqa_vi": TaskSpec("truthfulqa_vi_mc.jsonl", mc2=True),
}


class TaskDataError(ValueError):
    """A task name or a task file that cannot be scored, named with its file, line and field."""


@dataclass
class Item:
    id: str
    query: str
    choices: list[str]
    gold: int
    subject: str | None = None
    mc2_choices: list[str] = field(default_factory=list)
    mc2_labels: list[int] = field(default_factory=list)


def _field(record: dict, name: str, kind: type, where: str):
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TaskDataError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    return value


def read_items(path: Path, mc2: bool = False) -> list[Item]:
    """The items of one Okapi-format file, each line checked."""
    if not path.is_file():
        raise TaskDataError(f"{path}: no such task file")
    items = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{where}: not a JSON object")
            choices = _field(record, "choices", list, where)
            gold = _field(record, "gold", int, where)
            if not choices or not all(isinstance(c, str) for c in choices) or not 0 <= gold < len(choices):
                raise TaskDataError(f"{where}: field 'gold' ({gold}) must index the {len(choices)} string choices")
            item = Item(id=str(record.get("id", lineno)), query=_field(record, "query", str, where),
                        choices=choices, gold=gold, subject=record.get("subject"))
            if mc2:
                item.mc2_choices = _field(record, "mc2_choices", list, where)
                item.mc2_labels = _field(record, "mc2_labels", list, where)
                if len(item.mc2_choices) != len(item.mc2_labels) or not 0 < sum(item.mc2_labels) < len(item.mc2_labels):
                    raise TaskDataError(f"{where}: fields 'mc2_choices' and 'mc2_labels' must pair up, with true "
                                        "and false answers both present")
            items.append(item)
    if not items:
        raise TaskDataError(f"{path}: no items")
    return items


def ambiguous(item: Item) -> bool:
    """The gold text is also a wrong choice: no choice can be right."""
    return item.choices.count(item.choices[item.gold]) > 1


def fewshot_prefix(item: Item, pool: list[Item], k: int) -> str:
    """k solved examples from ``pool`` (the item's subject first, in file order), lm-eval's way:
    "query answer" blocks joined by blank lines, before the item's own query."""
    if k == 0:
        return ""
    same = [p for p in pool if p.subject == item.subject and p.id != item.id]
    others = [p for p in pool if p.subject != item.subject and p.id != item.id]
    shots = (same + others)[:k]
    return "".join(f"{s.query} {s.choices[s.gold]}\n\n" for s in shots)


def _pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of the whole past the context's own token count."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def choice_logliks(model, tokenizer, context: str, choices: list[str], max_length: int) -> list[float]:
    """log p(" " + choice | context) for every choice: the prompt's forward pass once, its
    key/value cache repeated for the choices, their continuations as one padded batch."""
    pairs = [_pair_tokens(tokenizer, context, " " + choice) for choice in choices]
    for choice, (_, continuation) in zip(choices, pairs):
        if not continuation:
            raise TaskDataError(f"choice {choice!r} encodes to no tokens after its prompt")
    prompt = pairs[0][0]  # the same for every choice: the context alone, encoded
    if len(prompt) < 2 or len(prompt) + max(len(c) for _, c in pairs) > max_length + 1:
        return _logliks_whole(model, tokenizer, [p + c for p, c in pairs], [len(c) for _, c in pairs], max_length)
    device = model.device
    shared = model(input_ids=torch.tensor([prompt[:-1]], device=device), use_cache=True)
    cache = shared.past_key_values
    cache.batch_repeat_interleave(len(choices))
    # each row: the prompt's last token, then the continuation but its last token
    rows = [[prompt[-1], *continuation[:-1]] for _, continuation in pairs]
    inputs, mask = _right_padded(rows, tokenizer)
    mask = torch.cat([torch.ones((len(rows), len(prompt) - 1), dtype=torch.long), mask], dim=1)
    logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device), past_key_values=cache).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
    return [log_probs[i, torch.arange(len(c)), torch.tensor(c)].sum().item() for i, (_, c) in enumerate(pairs)]


def _right_padded(rows: list[list[int]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    inputs = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        inputs[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return inputs, mask


def _logliks_whole(model, tokenizer, sequences: list[list[int]], scored: list[int], max_length: int) -> list[float]:
    """The same without a shared prompt (one-token prompts, or sequences past ``max_length``,
    whose prompt is cut at the front as lm-eval cuts it)."""
    sequences = [ids[-(max_length + 1):] for ids in sequences]
    inputs, mask = _right_padded([ids[:-1] for ids in sequences], tokenizer)
    logits = model(input_ids=inputs.to(model.device), attention_mask=mask.to(model.device)).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1).cpu()
    out = []
    for i, (ids, n) in enumerate(zip(sequences, scored)):
        positions = torch.arange(len(ids) - 1 - n, len(ids) - 1)
        out.append(log_probs[i, positions, torch.tensor(ids[-n:])].sum().item())
    return out


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _argmax_is(scores: list[float], gold: int) -> bool:
    """The gold choice scores strictly above every other (a tie is wrong)."""
    return all(scores[gold] > s for j, s in enumerate(scores) if j != gold)


def evaluate_task(model, tokenizer, items: list[Item], mc2: bool = False, pool: list[Item] | None = None,
                  num_fewshot: int = 0, max_length: int = 2048, progress: bool = False,
                  desc: str = "scoring") -> dict:
    """acc / acc_norm (TruthfulQA: mc1 / mc2) over ``items``, with standard errors and counts."""
    kept = [item for item in items if not ambiguous(item)]
    acc, acc_norm, mc2_scores = [], [], []
    for item in tqdm(kept, desc=desc, unit="item", disable=not progress):
        context = fewshot_prefix(item, pool or [], num_fewshot) + item.query
        scores = choice_logliks(model, tokenizer, context, item.choices, max_length)
        acc.append(float(_argmax_is(scores, item.gold)))
        acc_norm.append(float(_argmax_is([s / len(c) for s, c in zip(scores, item.choices)], item.gold)))
        if mc2:
            lls = choice_logliks(model, tokenizer, context, item.mc2_choices, max_length)
            probs = [math.exp(ll - max(lls)) for ll in lls]
            mc2_scores.append(sum(p for p, label in zip(probs, item.mc2_labels) if label) / sum(probs))
    if not kept:
        raise TaskDataError("every item is ambiguous: nothing to score")
    result: dict = {"n": len(kept), "dropped": len(items) - len(kept), "num_fewshot": num_fewshot}
    names = ("mc1",) if mc2 else ("acc", "acc_norm")
    for name, values in zip(names, (acc, acc_norm)):
        result[name], result[f"{name}_stderr"] = _mean_and_stderr(values)
    if mc2:
        result["mc2"], result["mc2_stderr"] = _mean_and_stderr(mc2_scores)
    return result


def load_task(name: str, task_data: Path | str, num_fewshot: int = 0,
              limit: int | None = None) -> tuple[TaskSpec, list[Item], list[Item] | None]:
    """(spec, items — the first ``limit``, few-shot pool) of a task, refused by name when unknown,
    when its file is missing, or when it has no few-shot pool and ``num_fewshot`` asks for one."""
    if name not in TASKS:
        raise TaskDataError(f"--tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
    spec, directory = TASKS[name], Path(task_data)
    items = read_items(directory / spec.file, spec.mc2)[:limit]
    pool = None
    if num_fewshot:
        if spec.fewshot_file is None:
            raise TaskDataError(f"--num-fewshot {num_fewshot}: {name} has no few-shot pool here (its prompt is "
                                "zero-shot, or its training split is not in --task-data)")
        pool = read_items(directory / spec.fewshot_file)
    return spec, items, pool
