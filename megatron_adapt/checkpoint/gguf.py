"""A GGUF file (llama.cpp's format) as a plain Hugging Face model directory.

transformers reads GGUF (dequantizing to float) but its ``save_pretrained`` refuses a model loaded
that way, so the directory is written here: safetensors weights (without ``lm_head.weight`` when
the embeddings are tied, as HF saves such models), config.json and the tokenizer files. Everything
downstream (extension, conversion, evaluation) then takes the ordinary HF directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_adapt.atomic import atomic_dir
from megatron_adapt.model.config import FAMILIES


def gguf_to_hf(gguf_file: str | Path, output: str | Path, with_weights: bool = True) -> Path:
    """Write ``output`` (config, tokenizer and, unless ``with_weights`` is False, fp32 weights)."""
    gguf_file, out = Path(gguf_file), Path(output)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    try:
        with atomic_dir(out) as tmp:
            _write_hf(gguf_file, tmp, with_weights)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"{gguf_file}: cannot read it as a GGUF model ({err})") from None
    return out


def _write_hf(gguf_file: Path, out: Path, with_weights: bool) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    AutoTokenizer.from_pretrained(**where).save_pretrained(out)
    if with_weights:
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        config = model.config
    else:
        config = AutoConfig.from_pretrained(**where)
    config = config.to_dict()
    config.pop("quantization_config", None)  # the weights written are plain floats
    family = FAMILIES.get(config.get("model_type"))
    if not config.get("architectures") and family is not None:  # transformers' GGUF configs leave it out
        config["architectures"] = [family.hf_class]
    (out / "config.json").write_text(json.dumps(config, indent=2))
