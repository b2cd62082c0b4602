"""Conversations → chat-template text whose assistant turns are the training targets.

A conversation is rendered by a Jinja chat template, the very string that transformers'
``tokenizer.apply_chat_template`` renders at inference, then tokenized whole, as it does. That is
what makes the exported model's chat format the training format, token for token (encoding the
prompt and the answer separately would not: SentencePiece adds a dummy prefix to each piece).

Which characters are targets comes from rendering prefixes of the conversation: the text an
assistant turn adds to ``render(turns before it, add_generation_prompt=True)`` is its answer and
the template's end-of-turn marker (the EOS, for ``vbd`` and ``llama2``). A token is a target when
its first character is. A template that renders earlier turns differently once later turns
follow has no such prefixes and is refused for that conversation.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from megatron_adapt.text.corpus import BadInputError

Segments = list[tuple[str, bool]]
Message = dict[str, str]

VBD_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                     "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# Written for this project; each renders the format its name says.
CHAT_TEMPLATES = {
    # VBD-LLaMA2-Chat (Vicuna v1.1 layout): "{system} USER: {q} ASSISTANT: {a}</s>USER: …".
    "vbd": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '" + VBD_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
        "{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token ~ system ~ ' ' -}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' ~ message['content'] ~ ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' ~ message['content'] ~ eos_token -}}"
        "{%- else -%}{{- raise_exception('vbd: a ' ~ message['role'] ~ ' turn after the first message') -}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    ),
    # LLaMA-2-Chat: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] …".
    "llama2": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('llama2: turns must alternate user, assistant, user, …') -}}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set text = message['content'] -%}"
        "{%- if loop.first and system -%}{%- set text = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ text -%}"
        "{%- endif -%}"
        "{{- bos_token ~ '[INST] ' ~ text ~ ' [/INST]' -}}"
        "{%- else -%}{{- ' ' ~ message['content'] ~ ' ' ~ eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    ),
}
TEMPLATE_NAMES = (*CHAT_TEMPLATES, "tokenizer")

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant"}  # the last two: ShareGPT's names


def conversation(record: dict[str, Any]) -> list[Message]:
    """The turns of an OpenAI-style ``messages``, ShareGPT ``conversations`` or
    ``{instruction, input?, output}`` record, roles normalized to system/user/assistant."""
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    for key, role_key, content_key in (("messages", "role", "content"), ("conversations", "from", "value")):
        if key in record:
            turns = record[key]
            break
    else:
        raise BadInputError("expected 'messages', 'conversations' or 'instruction' and 'output' fields")
    if not isinstance(turns, list) or not turns:
        raise BadInputError(f"'{key}' must be a non-empty list of turns")
    out = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise BadInputError(f"{key}[{n}] needs a string '{content_key}'")
        role = ROLES.get(turn.get(role_key))
        if role is None:
            raise BadInputError(f"{key}[{n}]: unknown role {turn.get(role_key)!r} "
                                f"(expected one of {', '.join(ROLES)})")
        if role == "system" and n > 0:
            raise BadInputError(f"{key}[{n}]: a system turn is only allowed first")
        out.append({"role": role, "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadInputError(f"'{key}' has no assistant turn (nothing to learn)")
    return out


def load_chat_tokenizer(tokenizer_path: str | Path, template: str):
    """The transformers tokenizer an export of a model trained on this tokenizer will carry, with
    ``template`` (a name in CHAT_TEMPLATES, or "tokenizer" for its own) as its chat template."""
    from transformers import AutoTokenizer

    from megatron_adapt.tokenizer.load import locate

    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
    kind, file = locate(tokenizer_path)
    if (file.parent / "tokenizer.json").is_file() and (file.parent / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(file.parent)
    elif kind == "sentencepiece":  # a bare tokenizer.model: the HF files the export would write
        from megatron_adapt.tokenizer.hf_files import write_hf_files
        from megatron_adapt.tokenizer.sentencepiece_model import load_model_proto

        with tempfile.TemporaryDirectory() as tmp:
            write_hf_files(load_model_proto(file), tmp)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    else:
        raise FileNotFoundError(f"{file.parent}: tokenizer.json without tokenizer_config.json")
    if template != "tokenizer":
        tokenizer.chat_template = CHAT_TEMPLATES[template]
    elif not tokenizer.chat_template:
        raise ValueError(f"{tokenizer_path}: the tokenizer has no chat_template; choose one of "
                         f"{', '.join(CHAT_TEMPLATES)}")
    return tokenizer


def render(tokenizer, messages: list[Message]) -> Segments:
    """The rendered conversation as (text, is_target) segments; BadInputError if the template
    refuses it or has no prefix property (see the module docstring)."""
    from jinja2 import TemplateError

    apply = functools.partial(tokenizer.apply_chat_template, tokenize=False)
    try:
        full = apply(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, through = apply(messages[:i], add_generation_prompt=True) if i else "", apply(messages[:i + 1])
            if not (through.startswith(prompt) and full.startswith(through)):
                raise BadInputError(f"the template renders turn {i} differently once later turns follow; "
                                    "its assistant tokens cannot be found")
            spans.append((len(prompt), len(through)))
    except TemplateError as err:
        raise BadInputError(f"chat template: {err}") from None
    segments, position = [], 0
    for start, stop in spans:
        segments += [(full[position:start], False), (full[start:stop], True)]
        position = stop
    return [s for s in segments + [(full[position:], False)] if s[0]]


class ChatEncoder:
    """Encodes rendered conversations whole (as ``apply_chat_template`` does) and reports, per
    segment, how many tokens begin in it; ids and lengths as the other encoders return them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1

    def encode_documents(self, docs: list[Segments]) -> tuple[np.ndarray, np.ndarray]:
        texts = ["".join(text for text, _ in doc) for doc in docs]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids, lengths = [], []
        for doc, doc_ids, offsets in zip(docs, encoded["input_ids"], encoded["offset_mapping"]):
            bounds = np.cumsum([len(text) for text, _ in doc])
            starts = np.array([start for start, _ in offsets], dtype=np.int64)
            owner = np.searchsorted(bounds, starts, side="right")  # the segment of each token's first character
            ids.append(np.asarray(doc_ids, dtype=np.int32))
            lengths.append(np.bincount(owner, minlength=len(doc))[:len(doc)])
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        return flat, (np.concatenate(lengths) if lengths else np.zeros(0, np.int64))
