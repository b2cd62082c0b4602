"""An HF model directory (an export of this project) as one GGUF file, for llama.cpp and what runs on it.

The file is written with llama.cpp's own ``gguf`` package: metadata and the tensor table first,
then the tensors one at a time, so memory holds one tensor whatever the model's size. What has to
be decided here, per family:

- the architecture llama.cpp knows it by (Mistral without a sliding window is its ``llama``);
- llama.cpp applies RoPE to adjacent pairs of q/k features for ``llama``, where HF rotates the two
  halves of each head, so those rows are permuted (Qwen2/3 use the halves, as HF does);
- the tokenizer as GGUF metadata: a SentencePiece model's pieces, scores and piece types, or a
  byte-level BPE's tokens, merges and the name of its pre-tokenizer split (``tokenizer.ggml.pre``),
  which llama.cpp needs to cut text the way the merges were learned.

Norms and biases stay float32, as llama.cpp keeps them; q8_0 applies to matrices whose rows are a
multiple of its 32-value blocks (others are written f16).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from megatron_adapt.atomic import atomic_file
from megatron_adapt.checkpoint.hf import HFCheckpointReader
from megatron_adapt.model.config import LlamaArchitecture, UnsupportedConfigError
from megatron_adapt.model.weights import hf_shapes
from megatron_adapt.tokenizer.load import locate
from megatron_adapt.tokenizer.sentencepiece_model import load_model_proto

log = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ADJACENT_PAIR_ROPE = {"llama"}
"""GGUF architectures whose q/k rows llama.cpp expects in adjacent-pair RoPE order."""


@dataclass
class GGUFTokenizer:
    """The ``tokenizer.ggml.*`` metadata of one tokenizer."""

    model: str
    """"llama" (SentencePiece) or "gpt2" (byte-level BPE)."""
    tokens: list[str]
    types: list[int]
    """gguf.TokenType per token: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte."""
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special_ids: dict[str, int] | None = None
    """bos / eos / unk / pad → id, those the tokenizer has."""
    add_bos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def hf_to_gguf(hf_dir: str | Path, output: str | Path, outtype: OutType = "f16",
               tokenizer_pre: str | None = None, name: str | None = None) -> dict:
    """Write ``output`` (one .gguf file) from ``hf_dir``; returns what was written (for a stats JSON)."""
    import gguf

    hf_dir, output = Path(hf_dir), Path(output)
    arch = LlamaArchitecture.from_hf_config(hf_dir / "config.json")
    if arch.rope_scaling is not None:
        raise UnsupportedConfigError(f"{hf_dir / 'config.json'}: rope_scaling {arch.rope_scaling!r}: GGUF export "
                                     "of scaled RoPE is not built (llama.cpp needs its rope_freqs table)")
    gguf_arch = GGUF_ARCHITECTURES[arch.model_type]
    tokenizer = read_tokenizer(hf_dir, arch.vocab_size, tokenizer_pre)
    reader = HFCheckpointReader(hf_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()], arch.num_layers)
    tensors = [(hf_name, names.get_name(hf_name, try_suffixes=(".weight", ".bias")), shape)
               for hf_name, shape in hf_shapes(arch).items()]
    if missing := [hf_name for hf_name, gguf_name, _ in tensors if gguf_name is None]:
        raise UnsupportedConfigError(f"gguf has no {gguf_arch} tensor names for {missing[:3]}")

    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf_arch)
        _write_model_metadata(writer, arch, gguf_arch, outtype, name or hf_dir.name)
        _write_tokenizer_metadata(writer, tokenizer)
        planned = []
        for hf_name, gguf_name, shape in tensors:
            qtype = _tensor_type(shape, outtype)
            writer.add_tensor_info(gguf_name, _stored_shape(shape, qtype), _numpy_dtype(qtype),
                                   _nbytes(shape, qtype), raw_dtype=qtype)
            planned.append((hf_name, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, qtype in planned:
            writer.write_tensor_data(_convert(reader[hf_name], hf_name, arch, gguf_arch, qtype))
        writer.close()
    stats = {"gguf": str(output), "architecture": gguf_arch, "family": arch.model_type, "outtype": outtype,
             "tensors": len(tensors), "bytes": output.stat().st_size, "vocab_size": arch.vocab_size,
             "tokenizer_model": tokenizer.model, "tokenizer_pre": tokenizer.pre}
    log.info("GGUF written: %s", stats)
    return stats


def _write_model_metadata(writer, arch: LlamaArchitecture, gguf_arch: str, outtype: OutType, name: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_attention_heads)
    writer.add_head_count_kv(arch.num_key_value_heads)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_file_type(file_types[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer_metadata(writer, tok: GGUFTokenizer) -> None:
    writer.add_tokenizer_model(tok.model)
    if tok.pre:
        writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.types)
    if tok.scores is not None:
        writer.add_token_scores(tok.scores)
    if tok.merges is not None:
        writer.add_token_merges(tok.merges)
    for role, token_id in (tok.special_ids or {}).items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)
    if tok.add_space_prefix is not None:
        writer.add_add_space_prefix(tok.add_space_prefix)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# --- tensors ----------------------------------------------------------------------------------

def _tensor_type(shape: tuple[int, ...], outtype: OutType):
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16}[outtype]


def _numpy_dtype(qtype) -> np.dtype:
    import gguf

    q = gguf.GGMLQuantizationType
    return {q.F32: np.dtype(np.float32), q.F16: np.dtype(np.float16)}.get(qtype, np.dtype(np.uint8))


def _stored_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    """The numpy array's shape as written: quantized and bf16 rows are stored as their bytes."""
    import gguf

    return tuple(shape) if _numpy_dtype(qtype) != np.uint8 else gguf.quant_shape_to_byte_shape(shape, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * block_bytes


def _convert(tensor: torch.Tensor, hf_name: str, arch: LlamaArchitecture, gguf_arch: str, qtype) -> np.ndarray:
    import gguf

    data = tensor.to(torch.float32)
    if gguf_arch in ADJACENT_PAIR_ROPE and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = arch.num_attention_heads if "q_proj" in hf_name else arch.num_key_value_heads
        data = halves_to_adjacent_pairs(data, heads)
    array = data.numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def halves_to_adjacent_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows reordered per head from HF's RoPE layout (feature i pairs with i + d/2) to
    llama.cpp's (feature 2i pairs with 2i + 1)."""
    rows, *rest = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


# --- tokenizer --------------------------------------------------------------------------------

def read_tokenizer(hf_dir: Path, rows: int, pre: str | None) -> GGUFTokenizer:
    """The tokenizer in ``hf_dir`` as GGUF metadata, its token list padded to the model's ``rows``."""
    kind, path = locate(hf_dir)
    config = _json(hf_dir / "tokenizer_config.json")
    template = config.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    tok = _sentencepiece(path) if kind == "sentencepiece" else _byte_level(path, config, pre)
    if len(tok.tokens) > rows:
        raise ValueError(f"{path}: {len(tok.tokens)} tokens but the model has {rows} rows")
    for i in range(len(tok.tokens), rows):  # rows no token reaches (Qwen's padded tables)
        tok.tokens.append(f"[PAD{i}]")
        tok.types.append(5)
        if tok.scores is not None:
            tok.scores.append(-1e4)
    tok.chat_template = template
    return tok


def _sentencepiece(path: Path) -> GGUFTokenizer:
    proto = load_model_proto(path)
    trainer = proto.trainer_spec
    ids = {"bos": trainer.bos_id, "eos": trainer.eos_id, "unk": trainer.unk_id, "pad": trainer.pad_id}
    # SentencePiece's piece types are numbered as gguf.TokenType (NORMAL 1 … BYTE 6).
    return GGUFTokenizer(model="llama", pre="default", tokens=[p.piece for p in proto.pieces],
                         types=[int(p.type) for p in proto.pieces], scores=[p.score for p in proto.pieces],
                         special_ids={k: v for k, v in ids.items() if v >= 0}, add_bos=True,
                         add_space_prefix=proto.normalizer_spec.add_dummy_prefix)


def _byte_level(path: Path, config: dict, pre: str | None) -> GGUFTokenizer:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["model"].get("type") != "BPE":
        raise ValueError(f"{path}: model.type {data['model'].get('type')!r}: only BPE tokenizers export to GGUF")
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    types = {i: 1 for i in by_id}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and token in tokens:
            special[role] = tokens.index(token)
    return GGUFTokenizer(model="gpt2", pre=pre or pre_tokenizer_name(path, data.get("pre_tokenizer")),
                         tokens=tokens, types=[types.get(i, 5) for i in range(size)], merges=merges,
                         special_ids=special, add_bos=bool(config.get("add_bos_token", False)))


def pre_tokenizer_name(path: Path, pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for the split a tokenizer.json's pre-tokenizer makes: a Split regex that
    transformers' GGUF reader knows by a name (LLaMA-3's, Qwen2's, …), or GPT-2's regex when the
    ByteLevel step splits by itself."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if regexes:
        for known, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regexes[0] == regex:
                return known
        raise ValueError(f"{path}: pre_tokenizer splits with a regex no GGUF pre-tokenizer name is known for; "
                         "pass --tokenizer-pre with llama.cpp's name for it")
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt2"
    raise ValueError(f"{path}: pre_tokenizer {pre_tokenizer!r} has no split llama.cpp can name; "
                     "pass --tokenizer-pre")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
