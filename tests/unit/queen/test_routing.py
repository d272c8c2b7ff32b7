"""Routing policies, the admission queue and the router's own load and failure rules."""

from __future__ import annotations

import asyncio

import pytest

from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue, QueueFull, WaitExpired
from rbee.queen.routing.load import LoadTracker
from rbee.queen.routing.policies import Candidate, least_loaded, round_robin
from rbee.queen.routing.router import Router
from rbee_testing.clock import FakeClock


def cand(worker_id: str, in_flight: int = 0, slots: int = 1) -> Candidate:
    return Candidate(worker_id, f"http://{worker_id}", slots, in_flight)


def test_least_loaded_picks_the_lowest_load() -> None:
    picked = least_loaded([cand("a", 2, 4), cand("b", 1, 4), cand("c", 1, 1)], 0)
    assert picked.worker_id == "b"


def test_least_loaded_spreads_ties_evenly() -> None:
    pool = [cand("a"), cand("b"), cand("c")]
    assert [least_loaded(pool, t).worker_id for t in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_ignores_load() -> None:
    pool = [cand("a", 3, 4), cand("b", 0, 4)]
    assert [round_robin(pool, t).worker_id for t in range(4)] == ["a", "b", "a", "b"]


async def test_admission_serves_waiters_first_in_first_out() -> None:
    queue = AdmissionQueue(max_waiting=10, max_wait_s=5)
    free = [0]
    order: list[int] = []

    def take() -> int | None:
        if free[0] > 0:
            free[0] -= 1
            return 1
        return None

    async def request(n: int) -> None:
        await queue.acquire("m", take)
        order.append(n)

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(request(n)))
        await asyncio.sleep(0)
    assert queue.waiting("m") == 4
    for _ in range(4):
        free[0] += 1
        queue.notify("m")
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_admission_refuses_past_the_queue_limit() -> None:
    queue = AdmissionQueue(max_waiting=1, max_wait_s=5)
    waiter = asyncio.create_task(queue.acquire("m", lambda: None))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await queue.acquire("m", lambda: None)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.waiting("m") == 0


async def test_admission_wait_expires() -> None:
    queue = AdmissionQueue(max_waiting=5, max_wait_s=0.05)
    with pytest.raises(WaitExpired):
        await queue.acquire("m", lambda: None)
    assert queue.waiting("m") == 0


def beat(registry: WorkerRegistry, worker_id: str, status: WorkerStatus, slots: int = 1) -> None:
    info = WorkerInfo(
        id=worker_id, model_id="m", port=8080, status=status, version="1", slots=slots
    )
    registry.update_worker(WorkerHeartbeat(worker=info))


def make_router(clock: FakeClock) -> tuple[Router, WorkerRegistry]:
    registry = WorkerRegistry(timeout_s=90, clock=clock)
    router = Router(registry, LoadTracker(10, clock), least_loaded, AdmissionQueue(8, 1))
    return router, registry


def test_router_counts_its_own_requests_against_slots() -> None:
    router, registry = make_router(FakeClock())
    beat(registry, "a", WorkerStatus.READY, slots=2)
    first, second = router.try_take("m"), router.try_take("m")
    assert first is not None
    assert second is not None
    assert router.try_take("m") is None
    router.release(first)
    again = router.try_take("m")
    assert again is not None
    assert again.worker_id == "a"


def test_router_spreads_concurrent_requests_over_equal_workers() -> None:
    router, registry = make_router(FakeClock())
    beat(registry, "a", WorkerStatus.READY)
    beat(registry, "b", WorkerStatus.READY)
    leases = [router.try_take("m"), router.try_take("m")]
    assert sorted(lease.worker_id for lease in leases if lease) == ["a", "b"]


def test_router_skips_starting_stopping_and_stale_workers() -> None:
    clock = FakeClock()
    router, registry = make_router(clock)
    beat(registry, "starting", WorkerStatus.STARTING)
    beat(registry, "stopping", WorkerStatus.STOPPING)
    assert router.try_take("m") is None
    assert router.has_live_worker("m")
    beat(registry, "ready", WorkerStatus.READY)
    clock.advance(91)
    assert router.try_take("m") is None
    assert not router.has_live_worker("m")


def test_failed_worker_sits_out_until_cooldown_or_a_new_heartbeat() -> None:
    clock = FakeClock()
    router, registry = make_router(clock)
    beat(registry, "a", WorkerStatus.READY)
    lease = router.try_take("m")
    assert lease is not None
    router.fail(lease)
    assert router.try_take("m") is None
    clock.advance(1)
    beat(registry, "a", WorkerStatus.READY)  # alive again
    back = router.try_take("m")
    assert back is not None
    router.fail(back)
    clock.advance(10)
    assert router.try_take("m") is not None


def test_excluded_workers_are_not_offered() -> None:
    router, registry = make_router(FakeClock())
    beat(registry, "a", WorkerStatus.READY)
    beat(registry, "b", WorkerStatus.READY)
    for _ in range(3):
        lease = router.try_take("m", exclude={"a"})
        assert lease is not None
        assert lease.worker_id == "b"
        router.release(lease)
    assert not router.has_live_worker("m", exclude={"a", "b"})


async def test_a_wait_for_a_worker_to_go_idle_ends_with_its_last_request() -> None:
    tracker = LoadTracker(10)
    first, second = tracker.begin("w1"), tracker.begin("w1")
    idle = asyncio.create_task(tracker.idle("w1"))
    tracker.end("w1", first)
    await asyncio.sleep(0)
    assert not idle.done(), "one request still runs"
    tracker.end("w1", second)
    await asyncio.wait_for(idle, 1)
    await asyncio.wait_for(tracker.idle("w1"), 1)  # already idle: at once
    tracker.begin("w2")
    gone = asyncio.create_task(tracker.idle("w2"))
    await asyncio.sleep(0)
    tracker.forget("w2")  # removed with a request in flight: nothing to wait for any more
    await asyncio.wait_for(gone, 1)
