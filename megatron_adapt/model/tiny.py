"""Small random LLaMA checkpoints in HF format, for the CPU quickstart and checks."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(directory: str | Path, vocab_size: int, hidden: int = 128, intermediate: int = 344,
                    layers: int = 4, heads: int = 4, kv_heads: int = 2, max_positions: int = 1024,
                    bos_token_id: int = 1, eos_token_id: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialized ``LlamaForCausalLM`` of this shape to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return Path(directory)
