"""The byte-level tokenizer: exact round trips of any text, specials, a full 201088-id vocab."""

from __future__ import annotations

import time

import pytest

from runtime.tokenizer import HARMONY_SPECIALS, Tokenizer


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.byte_level(259)


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  leading and  double spaces\n\ttabs\r\n", "naïve café — 日本語",
     "emoji 🎉👩‍👩‍👧 and flags 🇫🇷", "", "\x00\x7f control bytes"],
)
def test_text_round_trips_exactly(tiny, text):
    ids = tiny.encode(text)
    assert ids == list(text.encode("utf-8"))  # one token per UTF-8 byte, id = byte value
    assert tiny.decode(ids) == text


def test_tiny_specials(tiny):
    assert tiny.vocab_size == 259
    assert [tiny.token_to_id(s) for s in ("<|startoftext|>", "<|endoftext|>", "<|pad|>")] == [
        256, 257, 258]
    assert tiny.decode([104, 105, 257]) == "hi<|endoftext|>"
    assert tiny.decode([104, 105, 257], skip_special_tokens=True) == "hi"
    assert tiny.encode("hi") == [104, 105]  # no special tokens inserted


def test_partial_utf8_decodes_to_replacement_char(tiny):
    snowman = list("☃".encode())
    assert len(snowman) == 3
    assert tiny.decode(snowman[:2]) == "\ufffd"
    assert tiny.decode(snowman) == "☃"
    assert tiny.decode([0xFF]) == "\ufffd"


def test_file_round_trip(tmp_path, tiny):
    tiny.to_file(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.vocab_size == 259 and again.to_str() == tiny.to_str()
    assert again.decode(again.encode("añb")) == "añb"


def test_large_vocab_decodes_every_id(tmp_path):
    big = Tokenizer.byte_level(201088)
    big.to_file(tmp_path / "tokenizer.json")
    t0 = time.perf_counter()
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    print(f"loading a 201088-token tokenizer.json took {time.perf_counter() - t0:.3f}s")
    assert loaded.vocab_size == 201088
    for token_id, name in HARMONY_SPECIALS.items():
        assert loaded.token_to_id(name) == token_id
    assert loaded.decode([200002]) == "<|return|>"
    sample = [*range(0, 201088, 997), 201087, 199999, 256, 255]
    for token_id in sample:
        assert isinstance(loaded.decode([token_id]), str)
        assert loaded.id_to_token(token_id) is not None
    assert loaded.decode([300]) == "<|reserved_300|>"
    assert loaded.decode(loaded.encode("héllo 🎉")) == "héllo 🎉"


def test_byte_level_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Tokenizer.byte_level(100)
    with pytest.raises(ValueError):
        Tokenizer.byte_level(300, {42: "<|bad|>"})
