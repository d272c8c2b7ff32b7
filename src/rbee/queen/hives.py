"""The queen's inventory of hives, fed by hive heartbeats, judged by the same staleness rule.

A hive not heard from within the timeout is offline (never chosen to start a worker); one
silent for the longer `forget_after_s` is dropped, so machines that left for good do not
linger in the inventory. A hive that comes back is simply registered again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from rbee.common.clock import Clock, monotonic
from rbee.contracts.hives import HiveHeartbeat, HiveView


@dataclass(frozen=True, slots=True)
class HiveRecord:
    heartbeat: HiveHeartbeat
    seen_at: float


class HiveRegistry:
    def __init__(
        self, timeout_s: float, clock: Clock = monotonic, forget_after_s: float | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self.forget_after_s = max(timeout_s, forget_after_s or 0.0)
        self._clock = clock
        self._lock = threading.Lock()
        self._hives: dict[str, HiveRecord] = {}

    def update(self, heartbeat: HiveHeartbeat) -> bool:
        """Record a heartbeat; True when this hive is new."""
        with self._lock:
            is_new = heartbeat.hive.id not in self._hives
            self._hives[heartbeat.hive.id] = HiveRecord(heartbeat, self._clock())
        return is_new

    def remove(self, hive_id: str) -> bool:
        with self._lock:
            return self._hives.pop(hive_id, None) is not None

    def remove_forgotten(self) -> list[str]:
        """Drop hives silent for longer than `forget_after_s`; returns their ids."""
        cutoff = self._clock() - self.forget_after_s
        with self._lock:
            gone = [i for i, r in self._hives.items() if r.seen_at < cutoff]
            for hive_id in gone:
                del self._hives[hive_id]
        return gone

    def view(self, record: HiveRecord, now: float) -> HiveView:
        hb = record.heartbeat
        age = now - record.seen_at
        return HiveView(
            id=hb.hive.id,
            url=hb.hive.url,
            version=hb.hive.version,
            devices=hb.devices,
            models=hb.models,
            footprints=hb.footprints,
            workers=hb.workers,
            online=age <= self.timeout_s,
            last_seen_s=round(age, 3),
            timestamp=hb.model_dump(mode="json")["timestamp"],
        )

    def all(self) -> list[HiveView]:
        now = self._clock()
        with self._lock:
            records = list(self._hives.values())
        return [self.view(r, now) for r in records]

    def online(self) -> list[HiveView]:
        return [h for h in self.all() if h.online]

    def get(self, hive_id: str) -> HiveView | None:
        with self._lock:
            record = self._hives.get(hive_id)
        return self.view(record, self._clock()) if record else None
