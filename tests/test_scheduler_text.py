"""Incremental detokenization: whole characters only, stop strings across token boundaries."""

from __future__ import annotations

import pytest

from scheduler.text import IncrementalText
from tests.service_fakes import ByteTokenizer

TOK = ByteTokenizer()


def run(text_ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalText]:
    inc = IncrementalText(TOK.decode, stop)
    deltas = []
    for t in text_ids:
        deltas.append(inc.push(t))
        if inc.stopped_by:
            return deltas, inc
    deltas.append(inc.flush())
    return deltas, inc


@pytest.mark.parametrize("text", ["héllo wörld", "€100 — 数字 😀!", "plain ascii"])
def test_deltas_are_whole_characters_and_concatenate_to_the_text(text: str) -> None:
    deltas, _ = run(TOK.encode(text))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # A 4-byte emoji arrives as one delta, after its last byte.
    if "😀" in text:
        assert "😀" in deltas or any(d.startswith("😀") for d in deltas)


def test_invalid_bytes_are_emitted_as_replacement_once_decided() -> None:
    ids = [0xE2, 0x82, ord("A"), ord("B")]  # a truncated 3-byte sequence, then ASCII
    deltas, _ = run(ids)
    assert "".join(deltas) == TOK.decode(ids)


def test_stop_string_spanning_tokens_ends_text_before_it() -> None:
    deltas, inc = run(TOK.encode("hello STOP world"), stop=("STOP",))
    assert inc.stopped_by == "STOP"
    assert "".join(deltas) == "hello "


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    inc = IncrementalText(TOK.decode, ("STOP",))
    got = [inc.push(t) for t in TOK.encode("ab ST")]
    assert "".join(got) == "ab "  # "ST" may start "STOP": held
    assert inc.push(ord("x")) == "STx"  # decided: not a stop
    assert inc.stopped_by is None


def test_earliest_of_several_stop_strings_wins() -> None:
    deltas, inc = run(TOK.encode("one two three"), stop=("three", "two"))
    assert inc.stopped_by == "two"
    assert "".join(deltas) == "one "


def test_stop_string_with_multibyte_characters() -> None:
    deltas, inc = run(TOK.encode("price: 5€ end"), stop=("€",))
    assert inc.stopped_by == "€"
    assert "".join(deltas) == "price: 5"


def test_check_stop_false_lets_a_stop_string_through() -> None:
    inc = IncrementalText(TOK.decode, ("S",))
    assert inc.push(ord("S"), check_stop=False) == "S"
    assert inc.stopped_by is None
    inc.push(ord("S"))
    assert inc.stopped_by == "S"


def test_flush_returns_held_text_and_partial_characters() -> None:
    inc = IncrementalText(TOK.decode, ("STOP",))
    pushed = "".join(inc.push(t) for t in [*TOK.encode("ab ST"), 0xE2])
    assert pushed == "ab "
    assert inc.flush() == "ST\ufffd"
