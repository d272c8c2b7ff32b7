"""Replicas follow the load: when a model's pool gets another worker, over snapshots."""

from __future__ import annotations

import asyncio
import math

from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.scheduler.lifecycle import IdleSnapshot, idle_expired
from rbee.queen.scheduler.replicas import PoolLoad, wants_replica
from rbee_testing.clock import FakeClock


def pool(**fields: object) -> PoolLoad:
    busy = {
        "model": "m",
        "embedding": False,
        "workers": 1,
        "free_slots": 0,
        "starting": 0,
        "waiting": 7,
        "oldest_wait_s": 2.5,
        "max_replicas": None,
    }
    return PoolLoad(**{**busy, **fields})  # type: ignore[arg-type]


def test_a_busy_pool_whose_requests_waited_past_the_threshold_gets_another_worker() -> None:
    assert wants_replica(pool(), after_s=2.0)
    assert wants_replica(pool(oldest_wait_s=2.0), after_s=2.0)


def test_no_replica_before_the_threshold_or_with_nothing_waiting() -> None:
    assert not wants_replica(pool(oldest_wait_s=1.9), after_s=2.0)
    assert not wants_replica(pool(waiting=0, oldest_wait_s=0.0), after_s=0.0)


def test_no_replica_while_a_slot_is_free() -> None:
    assert not wants_replica(pool(free_slots=1), after_s=2.0)


def test_one_start_at_a_time() -> None:
    assert not wants_replica(pool(starting=1, oldest_wait_s=60.0), after_s=2.0)


def test_at_most_max_replicas() -> None:
    assert wants_replica(pool(workers=2, max_replicas=3), after_s=2.0)
    assert not wants_replica(pool(workers=3, max_replicas=3), after_s=2.0)
    assert not wants_replica(pool(workers=4, max_replicas=3), after_s=2.0)
    assert wants_replica(pool(workers=40, max_replicas=None), after_s=2.0)


def test_a_pool_without_workers_is_left_to_the_request_that_starts_one() -> None:
    assert not wants_replica(pool(workers=0), after_s=2.0)


def idle(worker_id: str, model: str = "m", since: float = 0.0, **kw: object) -> IdleSnapshot:
    fields = {"keep_alive_s": 60.0, "busy": False, **kw}
    return IdleSnapshot(worker_id, model, idle_since=since, **fields)  # type: ignore[arg-type]


def test_idle_replicas_unload_down_to_min_replicas_least_recently_used_first() -> None:
    workers = [idle("a", since=30.0), idle("b", since=10.0), idle("c", since=20.0)]
    assert idle_expired(workers, 1000.0) == ["a", "b", "c"]
    assert idle_expired(workers, 1000.0, lambda model: 1) == ["b", "c"]
    assert idle_expired(workers, 1000.0, lambda model: 2) == ["b"]
    assert idle_expired(workers, 1000.0, lambda model: 3) == []


def test_min_replicas_counts_busy_and_pinned_workers_and_is_per_model() -> None:
    workers = [
        idle("busy", busy=True),
        idle("pinned", keep_alive_s=math.inf),
        idle("a"),
        idle("x", model="other"),
    ]
    mins = {"m": 2, "other": 0}
    assert idle_expired(workers, 1000.0, mins.__getitem__) == ["a", "x"]
    assert idle_expired(workers, 1000.0, lambda model: 3) == []


async def test_the_queue_tells_how_long_its_first_request_has_waited() -> None:
    clock = FakeClock(start=0.0)
    queue = AdmissionQueue(max_waiting=8, max_wait_s=60, clock=clock)
    assert queue.longest_waits() == {}
    key = ("m", False)
    free: list[str] = []

    def take() -> str | None:
        return free.pop() if free else None

    first = asyncio.create_task(queue.acquire(key, take))
    await asyncio.sleep(0)
    clock.advance(3)
    second = asyncio.create_task(queue.acquire(key, take))
    await asyncio.sleep(0)
    clock.advance(1)
    assert queue.longest_waits() == {key: (2, 4.0)}
    free.append("slot")
    queue.notify(key)
    assert await first == "slot"
    assert queue.longest_waits() == {key: (1, 1.0)}
    free.append("slot")
    queue.notify(key)
    assert await second == "slot"
    assert queue.longest_waits() == {}
