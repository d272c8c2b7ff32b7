"""Fan-out of registry changes to every `/v1/heartbeats/stream` listener, and the memory of
the last model loads and unloads (`rbee status` shows them: an eviction seen after the fact)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

MODEL_EVENTS_KEPT = 100


class EventBus:
    """Each subscriber gets its own bounded queue; a slow one loses events, never blocks others."""

    def __init__(self, maxsize: int = 256) -> None:
        self._maxsize = maxsize
        self._subscribers: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()
        self._model_events: deque[dict[str, Any]] = deque(maxlen=MODEL_EVENTS_KEPT)

    def model_events(self) -> list[dict[str, Any]]:
        """The last model loads and unloads, oldest first, each with when (`at`, UTC)."""
        return list(self._model_events)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        if event == "model":
            at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            self._model_events.append({"at": at, **data})
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((event, data))

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[tuple[str, dict[str, Any]]]]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(self._maxsize)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
