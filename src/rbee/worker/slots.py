"""Admission: N requests run at once, a bounded few wait in line, the rest hear 429.

Each slot owns one engine, so "a slot is free" and "an engine is idle" are the same fact and
no engine is ever used by two generations at once. Waiters are served first come, first served.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from rbee.common.errors import TooManyRequests, Unavailable

T = TypeVar("T")


class SlotPool(Generic[T]):
    def __init__(
        self,
        items: list[T],
        queue_size: int,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        if not items:
            raise ValueError("a slot pool needs at least one slot")
        self._free: deque[T] = deque(items)
        self.size = len(items)
        self.queue_size = queue_size
        self._waiters: deque[asyncio.Future[T]] = deque()
        self._on_change = on_change
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self.size - len(self._free)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def full(self) -> bool:
        return not self._free

    @property
    def idle(self) -> bool:
        return len(self._free) == self.size

    def close(self) -> None:
        """Refuse new requests (shutdown); the ones holding or waiting for a slot carry on."""
        self._closed = True

    async def acquire(self) -> T:
        if self._closed:
            raise Unavailable("this worker is shutting down", code="worker_stopping")
        if self._free and not self.waiting:
            item = self._free.popleft()
            self._idle.clear()
            self._on_change()
            return item
        if self.waiting >= self.queue_size:
            raise TooManyRequests(
                f"all {self.size} slot(s) are busy and {self.queue_size} request(s) are "
                "already waiting; try again shortly",
                retry_after_s=1,
                code="worker_busy",
            )
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Handed a slot in the same instant we were cancelled: pass it on, never lose it.
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, item: T) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)  # still in flight: the count does not change
                return
        self._free.append(item)
        if self.idle:
            self._idle.set()
        self._on_change()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no slot is taken, up to the timeout. True if it became idle."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
