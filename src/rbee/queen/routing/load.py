"""What the queen knows better than any heartbeat: its own in-flight requests and failed workers."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from rbee.common.clock import Clock, monotonic


@dataclass(frozen=True, slots=True)
class _Penalty:
    until: float
    failed_at: float


class LoadTracker:
    """Counts requests in flight per worker, remembers when each was last used and the
    keep-alive its last request asked for, and benches workers that just failed.

    A benched worker returns after `cooldown_s`, or sooner if it heartbeats after the failure:
    a fresh heartbeat proves it is alive again.

    A worker's id (its hive and port) is given again to a later worker, so a removed worker's
    counts are forgotten, and requests begun under the old one end without touching the new
    one's: `begin` hands out the id's generation and `end` only counts with the current one.
    """

    def __init__(self, cooldown_s: float, clock: Clock = monotonic) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._in_flight: Counter[str] = Counter()
        self._benched: dict[str, _Penalty] = {}
        self._generations: Counter[str] = Counter()
        self._used: dict[str, float] = {}
        self._begun: Counter[str] = Counter()  # requests begun on each worker
        self._keep_alive: dict[str, float] = {}
        self._idle: dict[str, asyncio.Event] = {}  # set when the worker's last request ends

    def in_flight(self, worker_id: str) -> int:
        return self._in_flight[worker_id]

    def begin(self, worker_id: str) -> int:
        self._in_flight[worker_id] += 1
        self._begun[worker_id] += 1
        self._used[worker_id] = self._clock()
        return self._generations[worker_id]

    def begun(self, worker_id: str) -> int:
        """Requests begun on the worker since it registered."""
        return self._begun[worker_id]

    def end(self, worker_id: str, generation: int) -> None:
        if generation != self._generations[worker_id]:
            return  # begun on a worker since removed
        self._used[worker_id] = self._clock()  # the keep-alive's clock restarts here
        self._in_flight[worker_id] -= 1
        if self._in_flight[worker_id] <= 0:
            del self._in_flight[worker_id]
            self._wake(worker_id)

    async def idle(self, worker_id: str) -> None:
        """Return once no request is in flight on the worker (or it is forgotten)."""
        while self._in_flight[worker_id] > 0:
            await self._idle.setdefault(worker_id, asyncio.Event()).wait()

    def _wake(self, worker_id: str) -> None:
        if (went_idle := self._idle.pop(worker_id, None)) is not None:
            went_idle.set()

    def forget(self, worker_id: str) -> None:
        """The worker left the registry: nothing of it carries over to the next with its id."""
        self._in_flight.pop(worker_id, None)
        self._benched.pop(worker_id, None)
        self._used.pop(worker_id, None)
        self._begun.pop(worker_id, None)
        self._keep_alive.pop(worker_id, None)
        self._generations[worker_id] += 1
        self._wake(worker_id)

    def joined(self, worker_id: str) -> None:
        """The worker serves (its model is loaded): a worker never used is idle from now."""
        self._used.setdefault(worker_id, self._clock())

    def restart_idle(self, worker_id: str) -> None:
        """Count the worker as used now (its unloading failed: it is tried again later)."""
        self._used[worker_id] = self._clock()

    def last_used(self, worker_id: str) -> float | None:
        """When a request on the worker last began or ended, or else when it began to serve."""
        return self._used.get(worker_id)

    def ask_keep_alive(self, worker_id: str, seconds: float) -> None:
        """A request's `keep_alive`: the worker's keep-alive from now on (math.inf: pinned)."""
        self._keep_alive[worker_id] = seconds

    def asked_keep_alive(self, worker_id: str) -> float | None:
        return self._keep_alive.get(worker_id)

    def bench(self, worker_id: str) -> None:
        now = self._clock()
        self._benched[worker_id] = _Penalty(until=now + self.cooldown_s, failed_at=now)

    def is_benched(self, worker_id: str, last_heartbeat_at: float) -> bool:
        penalty = self._benched.get(worker_id)
        if penalty is None:
            return False
        if self._clock() >= penalty.until or last_heartbeat_at > penalty.failed_at:
            del self._benched[worker_id]
            return False
        return True
