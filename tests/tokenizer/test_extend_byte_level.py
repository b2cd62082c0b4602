"""SmolLM2's byte-level BPE tokenizer + Vietnamese Wikipedia through tools/extend_tokenizer.py,
checked against the base tokenizer, a plain-Python replay of the appended merges and transformers'
AutoTokenizer on lines the training never saw."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from megatron_adapt.text.normalize import normalize_vi
from megatron_adapt.tokenizer import byte_level_bpe
from megatron_adapt.tokenizer.extend import split_lines
from tests.shared_data import CHINESE, VIWIKI, require
from tests.tokenizer.test_extend_vi import _english_lines
from tools.extend_tokenizer import main

BASE_VOCAB = 49152


@pytest.fixture(scope="module")
def heldout_vi():
    require(VIWIKI)
    return [normalize_vi(line) for line in split_lines([VIWIKI], "text", 10, progress=False).heldout]


def _spec(directory) -> dict:
    return json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))


def test_base_ids_merges_and_specials_unchanged(smollm2_tokenizer, smollm2_vi):
    base, ext = _spec(smollm2_tokenizer), _spec(smollm2_vi)
    report = json.loads((smollm2_vi / "report.json").read_text())
    added = report["added"]
    assert 0 < added <= 16000 and report["tokenizer_kind"] == "byte_level_bpe"
    for token, i in base["model"]["vocab"].items():
        assert ext["model"]["vocab"].get(token) == i, f"base token {token!r} (id {i}) changed"
    new_ids = sorted(i for t, i in ext["model"]["vocab"].items() if t not in base["model"]["vocab"])
    assert new_ids == list(range(BASE_VOCAB, BASE_VOCAB + added)), "new ids must follow the highest base id"
    base_merges, ext_merges = byte_level_bpe.merge_pairs(base), byte_level_bpe.merge_pairs(ext)
    assert ext_merges[: len(base_merges)] == base_merges, "base merges changed or reordered"
    assert len(ext_merges) == len(base_merges) + added
    assert ext["added_tokens"] == base["added_tokens"], "special/added tokens changed"
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ext[key] == base[key], f"{key} changed"


def test_every_added_token_is_reachable(smollm2_vi):
    tokenizer = Tokenizer.from_file(str(smollm2_vi / "tokenizer.json"))
    assert byte_level_bpe.unreachable(tokenizer, BASE_VOCAB) == []
    assert json.loads((smollm2_vi / "report.json").read_text())["unreachable_added"] == 0


def test_vietnamese_fertility(smollm2_tokenizer, smollm2_vi, heldout_vi):
    assert len(heldout_vi) > 1000
    words = sum(len(line.split()) for line in heldout_vi)
    counts = {}
    for name, directory in (("base", smollm2_tokenizer), ("extended", smollm2_vi)):
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        counts[name] = sum(len(e.ids) for e in tokenizer.encode_batch(heldout_vi, add_special_tokens=False)) / words
    assert counts["base"] > 3.0, f"SmolLM2 fertility {counts['base']:.3f}: is this Vietnamese?"
    assert counts["extended"] <= 1.5, f"extended fertility {counts['extended']:.3f} tokens/word (base {counts['base']:.3f})"


def test_english_ids_unchanged(smollm2_tokenizer, smollm2_vi):
    """English from corpora the tool never read (TED talks, Tatoeba) keeps SmolLM2's ids."""
    lines = _english_lines()
    base = Tokenizer.from_file(str(smollm2_tokenizer / "tokenizer.json"))
    ext = Tokenizer.from_file(str(smollm2_vi / "tokenizer.json"))
    changed = [line for line, a, b in zip(lines, base.encode_batch(lines), ext.encode_batch(lines)) if a.ids != b.ids]
    assert len(changed) <= 0.001 * len(lines), f"{len(changed)}/{len(lines)} English lines changed: {changed[:3]}"


def _replay(base: Tokenizer, merges: list[tuple[str, str]], vocab: dict[str, int], text: str) -> list[int]:
    """Base pre-tokenization and segmentation, then the appended merges by rank, in plain Python."""
    rank = {pair: r for r, pair in enumerate(merges)}
    ids = []
    for word, _ in base.pre_tokenizer.pre_tokenize_str(text):
        symbols = [t.value for t in base.model.tokenize(word)]
        while len(symbols) > 1:
            pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids += [vocab[s] for s in symbols]
    return ids


def test_autotokenizer_equals_base_plus_appended_merges(smollm2_tokenizer, smollm2_vi, heldout_vi):
    from transformers import AutoTokenizer

    base = Tokenizer.from_file(str(smollm2_tokenizer / "tokenizer.json"))
    ext_spec = _spec(smollm2_vi)
    appended = byte_level_bpe.merge_pairs(ext_spec)[len(byte_level_bpe.merge_pairs(_spec(smollm2_tokenizer))):]
    auto = AutoTokenizer.from_pretrained(smollm2_vi)
    lines = heldout_vi[:1000]
    for line, got in zip(lines, auto(lines, add_special_tokens=False)["input_ids"]):
        assert got == _replay(base, appended, ext_spec["model"]["vocab"], line), f"line differs: {line[:80]!r}"
        assert auto.decode(got) == line, f"decoding does not give the line back: {line[:80]!r}"
    base_auto = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    chat = [{"role": "user", "content": "Xin chào! How are you?"}]
    assert auto.chat_template == base_auto.chat_template and auto.chat_template
    assert auto.apply_chat_template(chat, tokenize=False) == base_auto.apply_chat_template(chat, tokenize=False)
    assert (auto.eos_token, auto.eos_token_id, auto.bos_token_id) == \
        (base_auto.eos_token, base_auto.eos_token_id, base_auto.bos_token_id)


def test_chinese_through_the_same_tool(smollm2_tokenizer, tmp_path):
    require(CHINESE)
    out = tmp_path / "zh"
    assert main(["--base-model", str(smollm2_tokenizer / "tokenizer.json"), "--corpus", str(CHINESE),
                 "--num-new-tokens", "2000", "--lang", "zh", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["unreachable_added"] == 0 and report["added"] > 1000
    zh = report["fertility"]["zh"]
    assert zh["chars_per_token_extended"] >= 1.5 * zh["chars_per_token_base"], zh
    from tests.tokenizer.test_script_budget import foreign_letters

    spec = json.loads((out / "tokenizer.json").read_text())
    added = [byte_level_bpe.token_text(a + b) for a, b in byte_level_bpe.merge_pairs(spec)[-report["added"]:]]
    foreign = [t for t in added if foreign_letters(t.replace("\ufffd", ""), "CJK")]
    assert len(foreign) <= 0.01 * len(added), f"{len(foreign)} of {len(added)} pieces hold non-Han letters: {foreign[:20]}"


def _write_other_model(tmp_path, model) -> str:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = (trainers.UnigramTrainer if isinstance(model, models.Unigram) else trainers.WordPieceTrainer)(
        vocab_size=60, special_tokens=["[UNK]"])
    tokenizer.train_from_iterator(["xin chào các bạn", "the cat sat on the mat"] * 20, trainer)
    path = tmp_path / f"{type(model).__name__}" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))
    return str(path)


@pytest.mark.parametrize("model", [models.Unigram(), models.WordPiece(unk_token="[UNK]")], ids=["unigram", "wordpiece"])
def test_refuses_tokenizers_that_are_not_bpe(tmp_path, capsys, model):
    path = _write_other_model(tmp_path, model)
    corpus = tmp_path / "vi.txt"
    corpus.write_text("xin chào các bạn\n" * 20)
    code = main(["--base-model", path, "--corpus", str(corpus), "--num-new-tokens", "10",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and path in err and "not BPE" in err, err
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir()), "a failed run left files behind"


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_llama3_style_tokenizer(tmp_path):
    """LLaMA-3's layout in miniature: a Split regex before a regex-free ByteLevel, ignore_merges, and
    special tokens with ids past the BPE vocabulary. New ids must start after the highest of them."""
    from tokenizers import Regex, decoders
    from transformers import AutoTokenizer

    from megatron_adapt.text.corpus import iter_documents
    from tests.conftest import SAMPLE

    english = [t for _, t in iter_documents(SAMPLE / "en_gutenberg.jsonl.xz", "text")]
    base = Tokenizer(models.BPE(ignore_merges=True))
    base.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    base.decoder = decoders.ByteLevel()
    base.train_from_iterator(english, trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    base.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_0|>"])
    first_new = base.get_vocab_size(with_added_tokens=True)
    base_dir = tmp_path / "llama3ish"
    base_dir.mkdir()
    base.save(str(base_dir / "tokenizer.json"))
    (base_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))

    out = tmp_path / "vi"
    assert main(["--base-model", str(base_dir), "--corpus", str(SAMPLE / "vi_wiki.jsonl.xz"),
                 "--english", str(SAMPLE / "en_gutenberg.jsonl.xz"), "--num-new-tokens", "300", "--lang", "vi",
                 "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["unreachable_added"] == 0 and report["added"] > 100
    assert report["base_vocab_size"] == first_new and report["vocab_size"] == first_new + report["added"]
    ext = Tokenizer.from_file(str(out / "tokenizer.json"))
    for special in ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_0|>"):
        assert ext.token_to_id(special) == base.token_to_id(special), f"{special} moved"
    new_ids = sorted(i for t, i in ext.get_vocab(with_added_tokens=False).items() if i >= first_new)
    assert new_ids == list(range(first_new, first_new + report["added"]))
    assert report["fertility"]["vi"]["extended"] < 0.8 * report["fertility"]["vi"]["base"], report["fertility"]
    auto = AutoTokenizer.from_pretrained(out)
    lines = [t.split("\n")[0] for _, t in iter_documents(SAMPLE / "vi_wiki.jsonl.xz", "text")][:200]
    for line in lines:
        ids = auto(line, add_special_tokens=False)["input_ids"]
        assert ids == ext.encode(line, add_special_tokens=False).ids and auto.decode(ids) == line
    assert auto.eos_token_id == base.token_to_id("<|end_of_text|>")
