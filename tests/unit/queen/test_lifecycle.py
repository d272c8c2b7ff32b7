"""The keep-alive decision: which loaded workers unload, over snapshots and a fake clock."""

from __future__ import annotations

import math

from rbee.queen.scheduler.lifecycle import IdleSnapshot, idle_expired, keep_alive_left
from rbee_testing.clock import FakeClock


def worker(
    worker_id: str = "w", keep_alive_s: float = 300.0, busy: bool = False, idle_since: float = 0.0
) -> IdleSnapshot:
    return IdleSnapshot(worker_id, "m", keep_alive_s, busy, idle_since)


def test_an_idle_worker_unloads_once_its_keep_alive_has_passed() -> None:
    clock = FakeClock(start=0.0)
    workers = [worker("a", 300.0), worker("b", 600.0)]
    clock.advance(299.9)
    assert idle_expired(workers, clock()) == []
    clock.advance(0.1)
    assert idle_expired(workers, clock()) == ["a"]
    clock.advance(300)
    assert idle_expired(workers, clock()) == ["a", "b"]


def test_a_busy_worker_never_unloads_however_long_ago_it_went_idle() -> None:
    assert idle_expired([worker(busy=True, keep_alive_s=0.0)], 10**9) == []


def test_a_pinned_worker_never_unloads() -> None:
    assert idle_expired([worker(keep_alive_s=math.inf)], 10**12) == []
    assert keep_alive_left(worker(keep_alive_s=math.inf), 10**12) == math.inf


def test_keep_alive_zero_unloads_as_soon_as_idle() -> None:
    assert idle_expired([worker(keep_alive_s=0.0, idle_since=50.0)], 50.0) == ["w"]


def test_keep_alive_left_counts_down_while_idle_and_is_whole_while_busy() -> None:
    assert keep_alive_left(worker(keep_alive_s=300.0, idle_since=100.0), 250.0) == 150.0
    assert keep_alive_left(worker(keep_alive_s=300.0, idle_since=100.0), 1000.0) == 0.0
    assert keep_alive_left(worker(keep_alive_s=300.0, busy=True), 1000.0) == 300.0
