"""The worker's own view of itself: status, slots and the WorkerInfo it announces."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from rbee import __version__
from rbee.contracts.workers import WorkerInfo, WorkerPart, WorkerStatus


@dataclass(frozen=True)
class Identity:
    worker_id: str
    model_id: str
    device: str
    host: str
    port: int
    hive_id: str | None
    slots: int
    # Serves embeddings, not chat and completions.
    embedding: bool = False
    # Serves /v1/rerank (its model pools by rank); an embedding worker too.
    rerank: bool = False
    scheme: str = "http"
    keep_alive_s: float | None = None  # None: pinned
    ctx_size: int | None = None  # tokens of context per slot
    parts: tuple[WorkerPart, ...] = ()  # a split worker's devices, on several hives


class WorkerStatusBoard:
    """Status as the queen should see it. `busy` and `ready` follow the slots; the lifecycle
    steps (`starting` → `ready` … `stopping` → `stopped`) are set explicitly."""

    def __init__(
        self, identity: Identity, on_change: Callable[[bool], None] = lambda settle: None
    ) -> None:
        self.identity = identity
        self._lifecycle = WorkerStatus.STARTING
        self.in_flight = 0
        self._on_change = on_change
        self._last = self.status

    def set_on_change(self, on_change: Callable[[bool], None]) -> None:
        """`on_change(settle)`: the status changed; `settle` False for a lifecycle step (the
        queen waits for `ready` to route, and a swap for `stopped`), True for `busy` and
        `ready` following the slots (sent a moment later, out of a starting request's way)."""
        self._on_change = on_change

    @property
    def status(self) -> WorkerStatus:
        if self._lifecycle is WorkerStatus.READY and self.in_flight >= self.identity.slots:
            return WorkerStatus.BUSY
        return self._lifecycle

    @property
    def lifecycle(self) -> WorkerStatus:
        return self._lifecycle

    def set_lifecycle(self, status: WorkerStatus) -> None:
        self._lifecycle = status
        self._changed(settle=False)

    def set_in_flight(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self._changed(settle=True)

    def _changed(self, *, settle: bool) -> None:
        status = self.status
        if status is not self._last:
            self._last = status
            self._on_change(settle)

    def info(self, status: WorkerStatus | None = None) -> WorkerInfo:
        i = self.identity
        return WorkerInfo(
            id=i.worker_id,
            model_id=i.model_id,
            device=i.device,
            port=i.port,
            status=status or self.status,
            implementation="llm-worker-rbee",
            version=__version__,
            host=i.host,
            scheme="https" if i.scheme == "https" else "http",
            hive_id=i.hive_id,
            slots=i.slots,
            ctx_size=i.ctx_size,
            in_flight=self.in_flight,
            embedding=i.embedding,
            rerank=i.rerank,
            keep_alive_s=i.keep_alive_s,
            parts=list(i.parts),
            pid=os.getpid(),
        )
