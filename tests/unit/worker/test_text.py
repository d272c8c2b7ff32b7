"""Stop strings never leak into the answer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rbee.worker.engines.text import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    return out, matcher.stopped


def test_stop_string_split_across_tokens_is_cut_and_not_shown() -> None:
    assert run(["\n\n"], ["Paris", ".\n", "\nMore"]) == ("Paris.", True)


def test_text_that_only_looks_like_a_stop_start_is_released() -> None:
    assert run(["STOP"], ["a ST", "ART b"]) == ("a START b", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["world", "lo"], ["hello world"]) == ("hel", True)


def test_without_stops_everything_passes_through_at_once() -> None:
    matcher = StopMatcher([])
    assert matcher.push("abc") == "abc"


@given(st.text(max_size=40), st.text(min_size=1, max_size=4), st.integers(1, 5))
def test_output_is_the_text_before_the_first_stop(text: str, stop: str, size: int) -> None:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    out, stopped = run([stop], pieces)
    cut = text.find(stop)
    assert out == (text[:cut] if cut >= 0 else text)
    assert stopped == (cut >= 0)
