"""HF → GGUF (``checkpoint/gguf_export.py``), read back by transformers' GGUF reader: an
implementation of llama.cpp's conventions (tensor names, the LLaMA q/k RoPE permutation, the
tokenizer metadata) that is not ours. llama.cpp itself is not installed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from megatron_adapt.checkpoint.gguf import gguf_to_hf
from megatron_adapt.checkpoint.gguf_export import halves_to_adjacent_pairs, hf_to_gguf
from megatron_adapt.model.config import UnsupportedConfigError
from megatron_adapt.tokenizer.load import load_tokenizer
from tools.convert_checkpoint import main as convert

TEXT = "Hà Nội là thủ đô của Việt Nam, 1010 năm tuổi. The capital of Vietnam is Hanoi; 12345 people."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def tiny_model(family: str, tokenizer: Path, out: Path, **shape) -> transformers.PreTrainedModel:
    """A random ``family`` model for ``tokenizer``'s vocabulary, its norms and biases non-trivial, saved
    with the tokenizer's files in ``out``."""
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, vocab_size=load_tokenizer(tokenizer).vocab_size)
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
               "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=128))}  # the reader assumes 128
    config_class, model_class, extra = classes[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**dims | extra | shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, out / name)
    return model.eval()


def read_back(gguf_file: Path):
    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    return (transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(**where))


def tokenizer_json_ids(directory: Path, text: str) -> list[int]:
    """The ids ``directory``'s tokenizer.json gives (read as itself: AutoTokenizer would pick a class
    by the model's family)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def assert_same_model(model, back, tokenizer_dir: Path, gguf_tokenizer) -> None:
    expected, got = model.state_dict(), back.state_dict()
    differ = [k for k in expected if not torch.equal(expected[k], got.get(k, torch.empty(0)))]
    assert not differ, f"tensors changed by HF → GGUF → HF: {differ[:4]}"
    ids = tokenizer_json_ids(tokenizer_dir, TEXT)
    assert gguf_tokenizer(TEXT, add_special_tokens=False)["input_ids"] == ids, \
        "the GGUF's tokenizer cuts the text differently from the HF tokenizer"
    with torch.no_grad():
        tokens = torch.tensor([ids])
        assert torch.equal(back(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_families_round_trip(family, recipe, tmp_path):
    """Each family (Qwen2's biases, Qwen3's q/k norms, tied and untied tables): every tensor
    bit-exact in f32 and the same logits through transformers' reader, and our GGUF reader
    (gguf-to-hf) gives the tensors back too. (A small SentencePiece vocabulary keeps the reads
    quick: transformers parses a GGUF's token list in Python, about a minute for Qwen's.)"""
    model = tiny_model(family, recipe / "tokenizer", tmp_path / "hf")
    stats = hf_to_gguf(tmp_path / "hf", tmp_path / "model.gguf", "f32")
    assert stats["architecture"] == ("llama" if family == "mistral" else family), stats
    back, gguf_tokenizer = read_back(tmp_path / "model.gguf")
    assert_same_model(model, back, tmp_path / "hf", gguf_tokenizer)
    again = transformers.AutoModelForCausalLM.from_pretrained(gguf_to_hf(tmp_path / "model.gguf", tmp_path / "again"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items()), \
        "gguf-to-hf did not give the exported tensors back"


@pytest.mark.parametrize("tokenizer,pre", [("smollm2_vi", "gpt2"), ("qwen_vi", "qwen2")])
def test_byte_level_tokenizers(tokenizer, pre, request, tmp_path):
    """Real byte-level tokenizers extended with Vietnamese — SmolLM2's (GPT-2's split) and Qwen's
    (its own regex, llama.cpp's "qwen2") — cut text into the same ids once read from the GGUF,
    their special tokens whole."""
    tokenizer_dir = request.getfixturevalue(tokenizer)
    tiny_model("qwen2", tokenizer_dir, tmp_path / "hf", hidden_size=32, intermediate_size=32, num_hidden_layers=1)
    assert hf_to_gguf(tmp_path / "hf", tmp_path / "model.gguf", "f16")["tokenizer_pre"] == pre
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = TEXT + transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token
    assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer_json_ids(tmp_path / "hf", text), \
        "the GGUF's tokenizer cuts the text differently"


def test_sentencepiece_export_of_an_extended_model(recipe, tmp_path):
    """The recipe's own path: a tiny LLaMA resized for its SentencePiece tokenizer extended with
    Vietnamese, exported by megatron-to-hf, then to GGUF: pieces, scores and types as llama.cpp's
    "llama" tokenizer, q/k rows in llama.cpp's RoPE order (transformers' reader undoes it)."""
    from megatron_adapt.checkpoint.convert import hf_to_megatron

    hf_to_megatron(recipe / "base_llama", recipe / "tokenizer", tmp_path / "start")
    assert convert(["megatron-to-hf", "--checkpoint", str(tmp_path / "start"), "--output", str(tmp_path / "hf"),
                    "--dtype", "fp32"]) == 0
    assert convert(["hf-to-gguf", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "vi.gguf"),
                    "--outtype", "f32"]) == 0
    stats = json.loads((tmp_path / "vi.stats.json").read_text())
    assert stats["tokenizer_model"] == "llama" and stats["vocab_size"] == load_tokenizer(recipe / "tokenizer").vocab_size
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    back, gguf_tokenizer = read_back(tmp_path / "vi.gguf")
    assert_same_model(model, back, tmp_path / "hf", gguf_tokenizer)


def test_rope_pair_order():
    """Per head, HF's feature i rotates with i + d/2; llama.cpp's 2i with 2i + 1."""
    rows = torch.arange(8.0).repeat_interleave(3).reshape(8, 3)  # 2 heads of 4 features
    assert halves_to_adjacent_pairs(rows, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q8_0_and_f16(recipe, tmp_path):
    """q8_0: each weight within half a quantization step (its 32-block's absmax / 127, an fp16 scale) of the original,
    matrices whose rows are not whole blocks (intermediate 80: down_proj) written f16, norms f32."""
    import gguf

    model = tiny_model("llama", recipe / "tokenizer", tmp_path / "hf", intermediate_size=80)
    for outtype in ("q8_0", "f16"):
        hf_to_gguf(tmp_path / "hf", tmp_path / f"{outtype}.gguf", outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0", types
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32", types
    back, _ = read_back(tmp_path / "q8_0.gguf")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        w, q = model.state_dict()[name], back.state_dict()[name]
        step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
        ratio = ((q.reshape(-1, 32) - w.reshape(-1, 32)).abs() / step).max()
        assert ratio <= 0.5 + 127 * 2**-11, f"{name}: off by {ratio:.3f} steps"  # half a step, and the fp16 scale
    half, _ = read_back(tmp_path / "f16.gguf")
    w = model.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(half.state_dict()["model.layers.0.mlp.gate_proj.weight"], w.half().float())


def test_refusals_name_the_field_and_write_nothing(smollm2_vi, tmp_path):
    tiny_model("llama", smollm2_vi, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"rope_parameters": llama3}))
    with pytest.raises(UnsupportedConfigError, match="rope_scaling"):
        hf_to_gguf(tmp_path / "hf", tmp_path / "a.gguf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\S"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="--tokenizer-pre"):
        hf_to_gguf(tmp_path / "hf", tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf*")), "a refused export left a file"
    assert convert(["hf-to-gguf", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "a.gguf")]) == 2
