"""Memory promised to workers the queen is starting, until the hive's own figures show it.

A hive reports its devices' free memory in its heartbeats. Between the moment the queen asks
for a worker and the first heartbeat whose figures were read after that worker started, the
reported free memory still includes the room the worker takes: placement counts it as taken
here instead, so two starts in a row never pick the same room twice. A hive lists in each
heartbeat the workers that had started when it read its devices; a reservation ends once its
worker is listed, or when the hive never says so within `keep_s` (a hive of an older version).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rbee.common.clock import Clock, monotonic
from rbee.contracts.hives import HiveView

DeviceKey = tuple[str, str]  # (hive id, device id)


@dataclass(slots=True, eq=False)  # each one is itself, however alike two are
class Reservation:
    hive_id: str
    device_id: str
    bytes: int
    worker_id: str | None = None  # known once the hive answered the spawn request
    lapses_at: float | None = None  # set then too


class Reservations:
    def __init__(self, keep_s: float, clock: Clock = monotonic) -> None:
        self.keep_s = keep_s
        self._clock = clock
        self._held: list[Reservation] = []

    def hold(self, hive_id: str, device_id: str, size: int) -> Reservation:
        """Count `size` bytes as taken on the device from now on."""
        reservation = Reservation(hive_id, device_id, size)
        self._held.append(reservation)
        return reservation

    def started(self, reservation: Reservation, worker_id: str) -> None:
        """The hive started the worker: keep the room until its heartbeat lists the worker."""
        reservation.worker_id = worker_id
        reservation.lapses_at = self._clock() + self.keep_s

    def release(self, reservation: Reservation) -> None:
        """The worker never started (or was stopped): its room is free again."""
        if reservation in self._held:
            self._held.remove(reservation)

    def seen(self, hives: Iterable[HiveView]) -> None:
        """Forgets reservations whose worker a hive lists (its figures include it now), and
        those that lapsed. Called on each hive heartbeat: a worker listed by one heartbeat and
        stopped before the next would otherwise keep its room promised until it lapsed."""
        listed = {(h.id, w) for h in hives for w in h.workers}
        now = self._clock()
        self._held = [
            r
            for r in self._held
            if (r.hive_id, r.worker_id) not in listed and (r.lapses_at is None or now < r.lapses_at)
        ]

    def forget(self, worker_id: str) -> None:
        """The worker is gone (stopped or dead): what was promised to it is free again, even
        if no heartbeat listed it while it lived."""
        self._held = [r for r in self._held if r.worker_id != worker_id]

    def taken(self, hives: Iterable[HiveView]) -> dict[DeviceKey, int]:
        """Bytes still promised on each device, given what the hives last reported."""
        hives = list(hives)
        self.seen(hives)
        taken: dict[DeviceKey, int] = {}
        for r in self._held:
            key = (r.hive_id, r.device_id)
            taken[key] = taken.get(key, 0) + r.bytes
        return taken
