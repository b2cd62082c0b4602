"""Load an exported Hugging Face causal LM for scoring or generation, where it runs best here.

A 7B export scored on the CPU in fp32 takes hours and 28 GB; on a GPU in bf16 it takes minutes.
So the default is the GPU in bf16 when there is one, the CPU in fp32 otherwise (bf16 matmuls are
slow on CPUs, and fp32 keeps CPU figures comparable with earlier ones).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, str]:
    """The device and dtype name to load with: the defaults above, or the ones asked for, checked."""
    try:
        where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {device!r}: {err}") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine")
    if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    dtype = dtype or ("bf16" if where.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return where, dtype


def load_causal_lm(path: str, device: str | None = None, dtype: str | None = None):
    """(model in eval mode on its device, tokenizer); a directory that is not an HF causal LM is
    refused with its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, dtype = device_and_dtype(device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot load it as a Hugging Face causal LM ({err})") from None
    return model.to(where).eval(), tokenizer
