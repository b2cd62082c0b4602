"""A GGUF file (llama.cpp's format) as a plain Hugging Face model directory.

transformers reads GGUF (dequantizing to float) but its ``save_pretrained`` refuses a model loaded
that way, so the directory is written here: safetensors weights (without ``lm_head.weight`` when
the embeddings are tied, as HF saves such models), config.json and the tokenizer files. Everything
downstream (extension, conversion, evaluation) then takes the ordinary HF directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def gguf_to_hf(gguf_file: str | Path, output: str | Path, with_weights: bool = True) -> Path:
    """Write ``output`` (config, tokenizer and, unless ``with_weights`` is False, fp32 weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(output)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    try:
        AutoTokenizer.from_pretrained(**where).save_pretrained(tmp)
        if with_weights:
            model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
            config = model.config
        else:
            config = AutoConfig.from_pretrained(**where)
        config = config.to_dict()
        config.pop("quantization_config", None)  # the weights written are plain floats
        if not config.get("architectures") and config.get("model_type") == "llama":
            config["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    except (ValueError, OSError, KeyError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{gguf_file}: cannot read it as a GGUF model ({err})") from None
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
