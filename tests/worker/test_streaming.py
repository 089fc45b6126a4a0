"""UTF-8 safe incremental detokenizing and stop-sequence holding, as a client would see the text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from rbees.worker.streaming import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher


def _byte_decoder(table: dict[int, bytes]) -> Callable[[Sequence[int]], str]:
    def decode(ids: Sequence[int]) -> str:
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    return decode


def test_multibyte_character_split_across_tokens_is_emitted_whole() -> None:
    bee = "🐝".encode()  # 4 bytes, one token each
    table = {0: b"a ", 1: bee[:1], 2: bee[1:2], 3: bee[2:3], 4: bee[3:], 5: b" b"}
    detok = IncrementalDetokenizer(_byte_decoder(table))
    pieces = [detok.push(i) for i in range(6)]
    assert pieces == ["a ", "", "", "", "🐝", " b"]
    assert detok.flush() == ""


def test_real_tokenizer_stream_never_splits_characters(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    text = "Zürich Привет ✓ 😀 日本語 ğ, Kraków!"  # mostly outside the tiny vocabulary
    ids = tok.encode(text, add_special_tokens=False)
    split = [i for i in ids if REPLACEMENT_CHAR in tok.decode([i])]
    assert split, "some characters should be split across byte-level tokens"

    def decode(seq: Sequence[int]) -> str:
        return str(tok.decode(list(seq), clean_up_tokenization_spaces=False))

    detok = IncrementalDetokenizer(decode)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)


def test_context_tokens_are_not_re_emitted() -> None:
    table = {0: b"Hello", 1: b",", 2: b" world"}
    detok = IncrementalDetokenizer(_byte_decoder(table), context=[0, 1])
    assert detok.push(2) == " world"


def test_incomplete_character_at_the_end_is_flushed() -> None:
    table = {0: b"ok", 1: "é".encode()[:1]}
    detok = IncrementalDetokenizer(_byte_decoder(table))
    assert detok.push(0) == "ok"
    assert detok.push(1) == ""
    assert detok.flush() == REPLACEMENT_CHAR


def _run_stops(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.matched:
            break
    else:
        out.append(matcher.flush())
    return "".join(out), matcher.matched


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["Hello ", "wor", "ld. END", " more"], ("Hello world. ", "END")),
        (["Hello E", "N", "D"], ("Hello ", "END")),
        (["Hello EN", "ough"], ("Hello ENough", None)),
        (["xEND"], ("x", "END")),
        (["no stop here"], ("no stop here", None)),
    ],
)
def test_stop_sequence_is_never_emitted(pieces: list[str], expected: tuple[str, str | None]) -> None:
    assert _run_stops(["END"], pieces) == expected


def test_possible_stop_prefix_is_held_back_until_decided() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.feed("answer\n") == "answer"
    assert matcher.feed("\nUs") == ""
    assert matcher.feed("ual") == "\n\nUsual"
    assert matcher.matched is None


def test_earliest_of_several_stops_wins() -> None:
    assert _run_stops(["b", "abc"], ["xxabc"]) == ("xx", "abc")
    assert _run_stops(["cd", "bcd"], ["abcd"]) == ("a", "bcd")
