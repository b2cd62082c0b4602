"""Vietnamese normalization: NFC and one tone placement, nothing else touched."""

import unicodedata

import pytest

from megatron_adapt.text.normalize import get_normalizer, normalize_vi
from tests.shared_data import UDHR, require


@pytest.mark.parametrize("raw,expected", [
    ("hoà bình", "hòa bình"), ("thuỷ", "thủy"), ("khoẻ", "khỏe"), ("HOÀ", "HÒA"), ("Thuỵ Điển", "Thụy Điển"),
    ("xoá.", "xóa."), ("toả sáng", "tỏa sáng"),
    # already canonical or unambiguous: unchanged
    ("hòa", "hòa"), ("quý", "quý"), ("quỳ", "quỳ"), ("quà", "quà"), ("hoàn", "hoàn"), ("thuyền", "thuyền"),
    ("hello world", "hello world"),
])
def test_tone_placement(raw, expected):
    assert normalize_vi(raw) == expected


def test_decomposed_input_becomes_nfc():
    assert normalize_vi(unicodedata.normalize("NFD", "Việt Nam hoà bình")) == "Việt Nam hòa bình"


def test_udhr_combining_marks_are_composed():
    require(UDHR / "udhr_vie.txt")
    text = (UDHR / "udhr_vie.txt").read_text()
    assert sum(map(unicodedata.combining, text)) > 0, "fixture should contain combining tone marks"
    out = normalize_vi(text)
    assert not any(map(unicodedata.combining, out)), "combining marks left after normalization"
    assert out == unicodedata.normalize("NFC", out) and normalize_vi(out) == out, "not idempotent NFC"
    assert len(out.split()) == len(text.split()), "normalization changed the word count"


def test_unknown_normalizer_is_refused():
    assert get_normalizer("none") is None
    with pytest.raises(ValueError, match="unknown normalization 'xx'"):
        get_normalizer("xx")
