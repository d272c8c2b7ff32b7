"""Admission: requests for a model wait here, first in first out, when every worker is busy."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import TypeVar

from rbee.common.clock import Clock, monotonic

T = TypeVar("T")


class QueueFull(Exception):
    """Too many requests already wait for this model."""


class WaitExpired(Exception):
    """No worker freed up within the longest allowed wait."""


class NothingToWaitFor(Exception):
    """The pool has no worker left that could free up (all unloading, gone or failed): the
    request should start one rather than wait."""


class AdmissionQueue:
    """One FIFO per pool of workers (a model, for chat or for embeddings). Only the head of a queue may take a worker, so order is kept;
    `notify(model)` wakes the head whenever a slot may have freed (a request ended, a
    heartbeat arrived, a worker joined)."""

    def __init__(self, max_waiting: int, max_wait_s: float, clock: Clock = monotonic) -> None:
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._queues: dict[Hashable, deque[asyncio.Event]] = {}
        self._since: dict[asyncio.Event, float] = {}  # when each waiting request came in line
        # When each came to the queen: before a cold start, say, which it then waited out.
        self._arrived: dict[asyncio.Event, float] = {}

    def waiting(self, model: Hashable) -> int:
        return len(self._queues.get(model, ()))

    def waiting_since(self, model: Hashable, when: float) -> int:
        """Requests waiting for the pool that came to the queen at or before `when` (the
        queue's clock)."""
        return sum(1 for waiting in self._queues.get(model, ()) if self._arrived[waiting] <= when)

    def waiting_by_model(self) -> dict[str, int]:
        """Requests waiting per model name, whatever pool of its workers they wait for."""
        counts: dict[str, int] = {}
        for key, queue in list(self._queues.items()):
            model = str(key[0] if isinstance(key, tuple) else key)
            counts[model] = counts.get(model, 0) + len(queue)
        return counts

    def longest_waits(self) -> dict[Hashable, tuple[int, float]]:
        """For each pool with requests waiting: how many, and how long (seconds, by the queue's
        clock) the first of them has waited."""
        now = self._clock()
        return {
            pool: (len(queue), now - self._since[queue[0]])
            for pool, queue in list(self._queues.items())
            if queue
        }

    def notify(self, model: Hashable) -> None:
        queue = self._queues.get(model)
        if queue:
            queue[0].set()

    def notify_all(self, model: Hashable) -> None:
        """Wake every request waiting for the pool: it lost a worker, so each looks again
        whether there is still one to wait for."""
        for waiting in self._queues.get(model, ()):
            waiting.set()

    async def acquire(
        self,
        model: Hashable,
        try_take: Callable[[], T | None],
        hopeless: Callable[[], bool] = lambda: False,
        arrived: float | None = None,
    ) -> T:
        """A worker from `try_take`, now or in turn; `hopeless()` says the pool has no worker
        left to wait for (raises NothingToWaitFor). `arrived`: when the request came to the
        queen (default: now)."""
        queue = self._queues.setdefault(model, deque())
        if not queue and (taken := try_take()) is not None:
            return taken
        if len(queue) >= self.max_waiting:
            raise QueueFull(model)
        me = asyncio.Event()
        queue.append(me)
        self._since[me] = self._clock()
        self._arrived[me] = self._since[me] if arrived is None else arrived
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        try:
            while True:
                if queue[0] is me and (taken := try_take()) is not None:
                    return taken
                if hopeless():
                    raise NothingToWaitFor(model)
                me.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise WaitExpired(model)
                try:
                    await asyncio.wait_for(me.wait(), remaining)
                except TimeoutError:
                    raise WaitExpired(model) from None
        finally:
            queue.remove(me)
            del self._since[me]
            del self._arrived[me]
            if not queue:
                self._queues.pop(model, None)
            else:
                queue[0].set()
