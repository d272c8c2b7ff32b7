"""Invariants of the registry under arbitrary sequences of heartbeats and clock moves."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.queen.registry import WorkerRegistry
from rbee_testing.clock import FakeClock

TIMEOUT = 30.0
ids = st.sampled_from([f"w{i}" for i in range(8)])
models = st.sampled_from(["a", "b", "c"])
statuses = st.sampled_from(list(WorkerStatus))


@st.composite
def heartbeats(draw: st.DrawFn) -> WorkerHeartbeat:
    slots = draw(st.integers(1, 4))
    return WorkerHeartbeat(
        worker=WorkerInfo(
            id=draw(ids),
            model_id=draw(models),
            port=8080,
            status=draw(statuses),
            version="1",
            slots=slots,
            in_flight=draw(st.integers(0, slots)),
        )
    )


steps = st.lists(st.one_of(heartbeats(), st.floats(0, 2 * TIMEOUT, allow_nan=False)), max_size=40)


def replay(sequence: list[WorkerHeartbeat | float]) -> tuple[WorkerRegistry, FakeClock]:
    clock = FakeClock()
    registry = WorkerRegistry(timeout_s=TIMEOUT, clock=clock)
    for step in sequence:
        if isinstance(step, WorkerHeartbeat):
            registry.update_worker(step)
        else:
            clock.advance(step)
    return registry, clock


@settings(max_examples=300)
@given(steps)
def test_available_within_online_within_all(sequence: list[WorkerHeartbeat | float]) -> None:
    registry, _ = replay(sequence)
    every = {w.id for w in registry.list_all_workers()}
    online = {w.id for w in registry.list_online_workers()}
    available = {w.id for w in registry.list_available_workers()}
    assert available <= online <= every
    assert all(w.status is not WorkerStatus.STOPPED for w in registry.list_all_workers())


@settings(max_examples=300)
@given(steps)
def test_cleanup_removes_exactly_the_stale(sequence: list[WorkerHeartbeat | float]) -> None:
    registry, _ = replay(sequence)
    before = {w.id for w in registry.list_all_workers()}
    online = {w.id for w in registry.list_online_workers()}
    removed = len(registry.remove_stale_workers())
    after = {w.id for w in registry.list_all_workers()}
    assert after == online
    assert removed == len(before - online)
