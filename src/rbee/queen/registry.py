"""The worker registry: soft state fed only by the workers' own heartbeats (TEAM-270's design).

Liveness is judged by the queen's monotonic clock at receipt, never by the worker's timestamp,
so a worker with a skewed clock is still online. An index by model keeps scheduling look-ups
proportional to the workers of that model, not the whole cluster.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from rbee.common.clock import Clock, monotonic
from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus, WorkerView

DEFAULT_TIMEOUT_S = 90.0


class ChangeKind(StrEnum):
    REGISTERED = "registered"
    STATUS_CHANGED = "status_changed"
    REMOVED = "removed"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class RegistryChange:
    kind: ChangeKind
    worker: WorkerInfo


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker's last heartbeat and when the queen received it (queen's clock)."""

    info: WorkerInfo
    timestamp: datetime
    seen_at: float
    # Derived once at receipt: the scheduler's hot loop reads plain attributes.
    ready: bool
    load: float

    @classmethod
    def of(cls, heartbeat: WorkerHeartbeat, seen_at: float) -> WorkerRecord:
        info = heartbeat.worker
        ready = info.status is WorkerStatus.READY
        return cls(info, heartbeat.timestamp, seen_at, ready, info.in_flight / info.slots)


class WorkerRegistry:
    """Thread-safe; every operation takes one short lock, so it is safe from the event loop too."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, clock: Clock = monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, WorkerRecord] = {}
        self._by_model: dict[str, dict[str, WorkerRecord]] = {}

    # -- writes ------------------------------------------------------------------------------

    def update_worker(self, heartbeat: WorkerHeartbeat) -> RegistryChange | None:
        """Record a heartbeat. Returns what changed, if anything a watcher would care about."""
        info = heartbeat.worker
        if info.status is WorkerStatus.STOPPED:
            return RegistryChange(ChangeKind.REMOVED, info) if self.remove_worker(info.id) else None
        record = WorkerRecord.of(heartbeat, self._clock())
        with self._lock:
            previous = self._records.get(info.id)
            if previous is not None and previous.info.model_id != info.model_id:
                self._unindex(previous.info)
            self._records[info.id] = record
            self._by_model.setdefault(info.model_id, {})[info.id] = record
        if previous is None:
            return RegistryChange(ChangeKind.REGISTERED, info)
        if previous.info.status != info.status or not self._fresh(previous, record.seen_at):
            return RegistryChange(ChangeKind.STATUS_CHANGED, info)
        return None

    def remove_worker(self, worker_id: str) -> bool:
        with self._lock:
            record = self._records.pop(worker_id, None)
            if record is None:
                return False
            self._unindex(record.info)
            return True

    def remove_stale_workers(self) -> list[WorkerInfo]:
        """Remove every worker not heard from within the timeout; returns them."""
        now = self._clock()
        with self._lock:
            stale = [r for r in self._records.values() if not self._fresh(r, now)]
            for record in stale:
                del self._records[record.info.id]
                self._unindex(record.info)
        return [r.info for r in stale]

    def _unindex(self, info: WorkerInfo) -> None:
        peers = self._by_model.get(info.model_id)
        if peers is not None:
            peers.pop(info.id, None)
            if not peers:
                del self._by_model[info.model_id]

    # -- reads -------------------------------------------------------------------------------

    def _fresh(self, record: WorkerRecord, now: float) -> bool:
        return now - record.seen_at <= self.timeout_s

    @staticmethod
    def _ready(record: WorkerRecord) -> bool:
        return record.ready

    def get_record(self, worker_id: str) -> WorkerRecord | None:
        with self._lock:
            return self._records.get(worker_id)

    def get_worker(self, worker_id: str) -> WorkerInfo | None:
        record = self.get_record(worker_id)
        return record.info if record else None

    def records(self) -> list[WorkerRecord]:
        with self._lock:
            return list(self._records.values())

    def list_all_workers(self) -> list[WorkerInfo]:
        return [r.info for r in self.records()]

    def list_online_workers(self) -> list[WorkerInfo]:
        now = self._clock()
        return [r.info for r in self.records() if self._fresh(r, now)]

    def list_available_workers(self) -> list[WorkerInfo]:
        now = self._clock()
        return [r.info for r in self.records() if self._fresh(r, now) and self._ready(r)]

    def records_for_model(self, model_id: str) -> list[WorkerRecord]:
        with self._lock:
            return list(self._by_model.get(model_id, {}).values())

    def find_workers_by_model(self, model_id: str) -> list[WorkerInfo]:
        with self._lock:
            return [r.info for r in self._by_model.get(model_id, {}).values()]

    def total_worker_count(self) -> int:
        with self._lock:
            return len(self._records)

    def online_worker_count(self) -> int:
        return len(self.list_online_workers())

    def available_worker_count(self) -> int:
        return len(self.list_available_workers())

    def now(self) -> float:
        return self._clock()

    def is_worker_online(self, worker_id: str) -> bool:
        record = self.get_record(worker_id)
        return record is not None and self._fresh(record, self._clock())

    def is_available(self, record: WorkerRecord, now: float | None = None) -> bool:
        return self._ready(record) and self.is_fresh(record, now)

    def is_fresh(self, record: WorkerRecord, now: float | None = None) -> bool:
        return self._fresh(record, self._clock() if now is None else now)

    def age_s(self, record: WorkerRecord, now: float | None = None) -> float:
        return (self._clock() if now is None else now) - record.seen_at

    def models(self) -> list[str]:
        with self._lock:
            return list(self._by_model)


def worker_view(registry: WorkerRegistry, record: WorkerRecord, now: float) -> WorkerView:
    """A worker as the queen reports it over HTTP: its own fields plus online/available/age."""
    return WorkerView(
        **record.info.model_dump(),
        online=registry.is_fresh(record, now),
        available=registry.is_available(record, now),
        last_seen_s=round(registry.age_s(record, now), 3),
        timestamp=record.timestamp.isoformat().replace("+00:00", "Z"),
    )
