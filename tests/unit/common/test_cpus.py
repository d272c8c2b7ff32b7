"""CPU lists in Linux's own notation, both ways."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbee.common.cpus import format_cpu_set, parse_cpu_set


def test_ranges_and_single_cores() -> None:
    assert parse_cpu_set("0-3,6") == (0, 1, 2, 3, 6)
    assert format_cpu_set([6, 0, 1, 2, 3]) == "0-3,6"
    assert parse_cpu_set("2") == (2,)


@pytest.mark.parametrize("text", ["", "a", "3-1", "1,,2", "-1"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"CPU list|backwards"):
        parse_cpu_set(text)


@given(st.sets(st.integers(min_value=0, max_value=300), min_size=1))
def test_printing_then_parsing_gives_the_same_set(cpus: set[int]) -> None:
    assert parse_cpu_set(format_cpu_set(cpus)) == tuple(sorted(cpus))
