"""Each worker gets cores of its own while there are free ones; only then do workers share."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rbee.hive.cores import CorePlacement, place_cores

MACHINE = (0, 1, 2, 3)


def test_a_worker_alone_gets_the_whole_machine() -> None:
    assert place_cores(MACHINE, []) == CorePlacement((0, 1, 2, 3), shared=False)


def test_by_default_each_worker_gets_an_even_share_of_the_free_cores() -> None:
    assert place_cores(MACHINE, [(0, 1)]) == CorePlacement((2, 3), shared=False)
    assert place_cores(MACHINE, [(0,), (1,)]) == CorePlacement((2,), shared=False)
    assert place_cores((0, 1), [(0,)]) == CorePlacement((1,), shared=False)


def test_asked_for_cores_come_from_the_free_ones_first() -> None:
    assert place_cores(MACHINE, [(0,)], wanted=2) == CorePlacement((1, 2), shared=False)
    assert place_cores((0, 1), [], wanted=1) == CorePlacement((0,), shared=False)


def test_with_too_few_free_cores_the_worker_shares_the_least_used_and_says_so() -> None:
    assert place_cores(MACHINE, [(0, 1, 2, 3)]) == CorePlacement((0, 1), shared=True)
    placed = place_cores(MACHINE, [(0, 1, 2), (0, 1)], wanted=2)
    assert placed == CorePlacement((2, 3), shared=True)
    assert place_cores(MACHINE, [], wanted=9) == CorePlacement(MACHINE, shared=False)


def test_cores_outside_the_machine_are_neither_given_nor_counted_as_used() -> None:
    assert place_cores((2, 3), [(0, 1)]) == CorePlacement((2,), shared=False)


@given(
    st.lists(st.lists(st.sampled_from(MACHINE), min_size=1, unique=True), max_size=6),
    st.one_of(st.none(), st.integers(min_value=1, max_value=8)),
)
def test_always_some_machine_cores_and_shared_exactly_when_overlapping(
    held: list[list[int]], wanted: int | None
) -> None:
    placed = place_cores(MACHINE, held, wanted)
    assert placed.cpus
    assert set(placed.cpus) <= set(MACHINE)
    assert placed.shared == bool(set(placed.cpus) & {c for cpus in held for c in cpus})
    if wanted is not None:
        assert len(placed.cpus) == min(wanted, len(MACHINE))
