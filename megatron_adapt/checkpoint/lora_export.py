"""A LoRA run's checkpoint as a plain HF model (adapters merged) or as a PEFT adapter beside its base.

A LoRA run saves its adapters and vocabulary tables only (``format.in_adapter_checkpoint``); the
frozen base is where the run started, which its recorded config names (``model.init_from``'s
checkpoint, else ``model.hf_dir``). Tensors are read one at a time from both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from megatron_adapt.checkpoint.dist_reader import DistCheckpointReader
from megatron_adapt.checkpoint.format import latest, weights_dir, weights_kind
from megatron_adapt.checkpoint.hf import HFCheckpointReader
from megatron_adapt.model.config import LlamaArchitecture
from megatron_adapt.model.lora import LoraConfig, adapted_module, is_adapter_key
from megatron_adapt.model.weights import hf_shapes

Getter = Callable[[str], torch.Tensor]
ADAPTER_DIR = "adapter"
"""Where a PEFT export puts ``adapter_model.safetensors`` and ``adapter_config.json``."""


def base_reader(run_config: dict) -> Getter:
    """HF tensors of the base a LoRA run started from."""
    model = run_config.get("model", {})
    if model.get("init_from"):
        start = latest(model["init_from"])
        if start is None:
            raise FileNotFoundError(f"{model['init_from']}: the LoRA run's start (model.init_from) has no checkpoint")
        if weights_kind(start) == "dist":
            return DistCheckpointReader(start).__getitem__
        return HFCheckpointReader(weights_dir(start)).__getitem__
    if not model.get("hf_dir") or not Path(model["hf_dir"]).is_dir():
        raise FileNotFoundError(f"{model.get('hf_dir')!r}: the LoRA run's base (model.hf_dir) is not here; "
                                "export from the directory the run was started in")
    return HFCheckpointReader(model["hf_dir"]).__getitem__


def lora_run_reader(reader: DistCheckpointReader) -> Getter:
    """The LoRA checkpoint's tensors (adapters, vocabulary tables) over its base's."""
    base = base_reader(reader.meta.run_config)
    return lambda name: reader[name] if name in reader.sources else base(name)


def merged(get: Getter, lora: LoraConfig) -> Getter:
    """Base weights with ``alpha/rank · B @ A`` added where an adapter sits (in fp32)."""
    def tensor(name: str) -> torch.Tensor:
        weight = get(name)
        module = adapted_module(name, lora)
        if module is None:
            return weight
        delta = get(f"{module}.lora_B.weight").float() @ get(f"{module}.lora_A.weight").float()
        return (weight.float() + lora.scaling * delta).to(weight.dtype)
    return tensor


def write_peft_adapter(arch: LlamaArchitecture, get: Getter, lora: LoraConfig, out: Path, dtype: torch.dtype,
                       base_name: str) -> None:
    """``out/adapter_model.safetensors`` + ``adapter_config.json``, loadable with
    ``PeftModel.from_pretrained(model, out)`` over the base exported beside it."""
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in hf_shapes(arch, lora) if is_adapter_key(n)]
    save_file({f"base_model.model.{n}": get(n).to(dtype).contiguous() for n in names},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_name}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
