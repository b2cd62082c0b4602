"""Paths into ../shared/data (beside the project root), where the real test data lives."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2_TOKENIZER = SHARED / "tokenizer" / "llama2_tokenizer.model"
VIWIKI = SHARED / "vi" / "viwiki_undertheseanlp.jsonl.xz"
GUTENBERG = SHARED / "en" / "gutenberg_classics.jsonl.xz"
TIBETAN = SHARED / "bo" / "nanhai_modern_writing_subset.jsonl.xz"
CHINESE = SHARED / "zh" / "hongloumeng.txt.xz"
PARALLEL = SHARED / "parallel"
UDHR = SHARED / "udhr"
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
"""A real pretrained LLaMA-architecture model: tied embeddings, byte-level BPE (49152 tokens)."""


def require(*paths: Path) -> None:
    """Skip (naming the file) when the shared data set is not beside the checkout."""
    for path in paths:
        if not path.exists():
            pytest.skip(f"shared data missing: {path} (see ../shared/data/README.md)")
