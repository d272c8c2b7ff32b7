"""The worker registry: liveness by the queen's clock, availability, best-worker choice."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.queen.registry import ChangeKind, WorkerRegistry
from rbee_testing.clock import FakeClock


def worker(
    id_: str,
    model: str = "m",
    status: WorkerStatus = WorkerStatus.READY,
    *,
    in_flight: int = 0,
    slots: int = 1,
) -> WorkerInfo:
    return WorkerInfo(
        id=id_,
        model_id=model,
        port=8080,
        status=status,
        version="1",
        in_flight=in_flight,
        slots=slots,
    )


def beat(info: WorkerInfo, timestamp: datetime | None = None) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker=info, timestamp=timestamp or datetime.now(UTC))


def test_worker_is_online_until_the_timeout_passes_on_the_queens_clock() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(timeout_s=90, clock=clock)
    registry.update_worker(beat(worker("w1")))
    clock.advance(90)
    assert registry.is_worker_online("w1")
    clock.advance(0.5)
    assert not registry.is_worker_online("w1")
    assert registry.list_online_workers() == []
    assert registry.total_worker_count() == 1


def test_a_worker_whose_clock_is_hours_wrong_is_still_online() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(timeout_s=90, clock=clock)
    registry.update_worker(beat(worker("past"), datetime.now(UTC) - timedelta(hours=5)))
    registry.update_worker(beat(worker("future"), datetime.now(UTC) + timedelta(hours=5)))
    assert registry.is_worker_online("past")
    assert registry.is_worker_online("future")
    assert {w.id for w in registry.list_available_workers()} == {"past", "future"}


def test_only_ready_workers_are_available() -> None:
    registry = WorkerRegistry(clock=FakeClock())
    for status in (WorkerStatus.STARTING, WorkerStatus.READY, WorkerStatus.BUSY):
        registry.update_worker(beat(worker(status.value, status=status)))
    assert [w.id for w in registry.list_available_workers()] == ["ready"]
    assert registry.online_worker_count() == 3


def test_stopping_heartbeat_makes_a_worker_unavailable_at_once() -> None:
    registry = WorkerRegistry(clock=FakeClock())
    registry.update_worker(beat(worker("w1")))
    change = registry.update_worker(beat(worker("w1", status=WorkerStatus.STOPPING)))
    assert change is not None
    assert change.kind is ChangeKind.STATUS_CHANGED
    assert registry.list_available_workers() == []
    assert registry.is_worker_online("w1")


def test_stopped_heartbeat_removes_a_worker_at_once() -> None:
    registry = WorkerRegistry(clock=FakeClock())
    registry.update_worker(beat(worker("w1")))
    change = registry.update_worker(beat(worker("w1", status=WorkerStatus.STOPPED)))
    assert change is not None
    assert change.kind is ChangeKind.REMOVED
    assert registry.get_worker("w1") is None
    assert registry.find_workers_by_model("m") == []


def test_update_reports_registration_and_status_changes_only() -> None:
    registry = WorkerRegistry(clock=FakeClock())
    first = registry.update_worker(beat(worker("w1", status=WorkerStatus.STARTING)))
    assert first is not None
    assert first.kind is ChangeKind.REGISTERED
    assert registry.update_worker(beat(worker("w1", status=WorkerStatus.STARTING))) is None
    ready = registry.update_worker(beat(worker("w1")))
    assert ready is not None
    assert ready.kind is ChangeKind.STATUS_CHANGED


def test_worker_that_changes_model_moves_in_the_index() -> None:
    registry = WorkerRegistry(clock=FakeClock())
    registry.update_worker(beat(worker("w1", model="a")))
    registry.update_worker(beat(worker("w1", model="b")))
    assert registry.find_workers_by_model("a") == []
    assert [w.id for w in registry.find_workers_by_model("b")] == ["w1"]


def test_cleanup_removes_exactly_the_stale_workers() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(timeout_s=10, clock=clock)
    registry.update_worker(beat(worker("old")))
    clock.advance(8)
    registry.update_worker(beat(worker("new")))
    clock.advance(5)
    assert [w.id for w in registry.remove_stale_workers()] == ["old"]
    assert [w.id for w in registry.list_all_workers()] == ["new"]
    assert registry.remove_stale_workers() == []


def test_remove_unknown_worker_is_false() -> None:
    registry = WorkerRegistry(clock=FakeClock())
    assert registry.remove_worker("nope") is False


def test_concurrent_heartbeats_from_threads_lose_nothing() -> None:
    registry = WorkerRegistry()

    def send(prefix: str) -> None:
        for i in range(200):
            registry.update_worker(beat(worker(f"{prefix}-{i}", model=f"m{i % 7}")))
            registry.records_for_model(f"m{i % 7}")

    threads = [threading.Thread(target=send, args=(f"t{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.total_worker_count() == 1600
    assert sum(len(registry.find_workers_by_model(f"m{i}")) for i in range(7)) == 1600
