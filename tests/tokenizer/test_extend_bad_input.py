"""Bad input to tools/extend_tokenizer.py: a clear error and nothing left in OUT."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from tests.shared_data import LLAMA2_TOKENIZER, require
from tools.extend_tokenizer import main


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "vi.txt"
    path.write_text("xin chào các bạn\nchúng tôi là người Việt Nam\n" * 50)
    return path


def _run(tmp_path, capsys, **overrides) -> tuple[int, str]:
    require(LLAMA2_TOKENIZER)
    args = {"--base-model": str(LLAMA2_TOKENIZER), "--num-new-tokens": "50",
            "--output-dir": str(tmp_path / "out")} | overrides
    argv = [a for k, v in args.items() for a in ([k] + (v if isinstance(v, list) else [v]))]
    code = main(argv)
    return code, capsys.readouterr().err


def _left_behind(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out")))


def test_missing_corpus(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, **{"--corpus": str(tmp_path / "nope.jsonl")})
    assert code == 2 and "nope.jsonl: no such file" in err
    assert not _left_behind(tmp_path)


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    code, err = _run(tmp_path, capsys, **{"--corpus": str(tmp_path / "empty.txt")})
    assert code == 2 and "has no text lines" in err
    assert not _left_behind(tmp_path), "a failed run left files behind"


@pytest.mark.parametrize("n", ["0", "-5"])
def test_non_positive_count(tmp_path, capsys, corpus, n):
    code, err = _run(tmp_path, capsys, **{"--corpus": str(corpus), "--num-new-tokens": n})
    assert code == 2 and "--num-new-tokens must be positive" in err


def test_bad_scripts_and_sizes_are_refused_by_name(tmp_path, capsys, corpus):
    code, err = _run(tmp_path, capsys, **{"--corpus": str(corpus), "--scripts": "LATIN,KLINGON"})
    assert code == 2 and "unknown script 'KLINGON'" in err, err
    with pytest.raises(SystemExit) as exit_:
        _run(tmp_path, capsys, **{"--corpus": str(corpus), "--num-new-tokens": "2000,x"})
    assert exit_.value.code == 2 and "comma-separated list of numbers, got '2000,x'" in capsys.readouterr().err
    assert not _left_behind(tmp_path)


def test_base_model_not_bpe(tmp_path, capsys, corpus):
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "uni"), vocab_size=29,
                                   model_type="unigram", minloglevel=2)
    code, err = _run(tmp_path, capsys, **{"--corpus": str(corpus), "--base-model": str(tmp_path / "uni.model")})
    assert code == 2 and "model_type is UNIGRAM" in err
    (tmp_path / "garbage.model").write_bytes(b"\x00not a model" * 10)
    code, err = _run(tmp_path, capsys, **{"--corpus": str(corpus), "--base-model": str(tmp_path / "garbage.model")})
    assert code == 2 and "not a SentencePiece model" in err
    assert not _left_behind(tmp_path)


def test_output_not_writable(tmp_path, capsys, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(tmp_path, capsys, **{"--corpus": str(corpus), "--output-dir": str(blocker / "out")})
    assert code == 2 and "cannot write there" in err


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = _run(tmp_path, capsys, **{"--corpus": str(corpus)})
    assert code == 2 and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
