"""Starting workers through hives, on demand or by job, and waiting until they are ready."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from rbee.common.errors import NotFound, Unavailable
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse
from rbee.contracts.hives import HiveView
from rbee.contracts.workers import WorkerInfo, WorkerStatus
from rbee.queen.events import EventBus
from rbee.queen.hives import HiveRegistry
from rbee.queen.registry import WorkerRegistry
from rbee.queen.scheduler.placement import choose_hive

# Asks one hive to start a worker; the queen's wiring passes a call through the hive client.
SpawnFn = Callable[[HiveView, SpawnRequest], Awaitable[SpawnResponse]]
# Told how each start ended: (model, "ready" | "timeout" | "failed").
ResultFn = Callable[[str, str], None]


class Spawner:
    def __init__(
        self,
        registry: WorkerRegistry,
        hives: HiveRegistry,
        bus: EventBus,
        spawn: SpawnFn,
        timeout_s: float,
        on_result: ResultFn = lambda model, result: None,
    ) -> None:
        self.registry = registry
        self.hives = hives
        self.bus = bus
        self.spawn = spawn
        self.timeout_s = timeout_s
        self.on_result = on_result
        self._starting: dict[tuple[str, bool], asyncio.Task[WorkerInfo]] = {}

    def pick_hive(self, model: str, hive_id: str | None, device: str | None) -> HiveView:
        if hive_id is not None:
            hive = self.hives.get(hive_id)
            if hive is None or not hive.online:
                raise Unavailable(f"hive {hive_id!r} is not online", code="hive_unavailable")
            return hive
        hive = choose_hive(self.hives.all(), model, device)
        if hive is None:
            raise NotFound(
                f"no online hive has model {model!r} in its catalog", code="model_not_found"
            )
        return hive

    async def start(
        self,
        model: str,
        hive: HiveView,
        device: str | None = None,
        slots: int = 1,
        *,
        embedding: bool = False,
    ) -> tuple[SpawnResponse, WorkerInfo]:
        """Ask the hive to start a worker, then wait until it heartbeats `ready`."""
        request = SpawnRequest(
            model=model, device=device or "cpu:0", slots=slots, embedding=embedding
        )
        try:
            spawned = await self.spawn(hive, request)
            ready = await self.wait_ready(spawned.worker_id)
        except Unavailable as exc:
            self.on_result(model, "timeout" if exc.code == "worker_start_timeout" else "failed")
            raise
        except Exception:
            self.on_result(model, "failed")
            raise
        self.on_result(model, "ready")
        return spawned, ready

    async def ensure_worker(self, model: str, *, embedding: bool = False) -> WorkerInfo:
        """Start one worker for a cold model (for embeddings, or for chat and completions);
        concurrent callers share the same start."""
        key = (model, embedding)
        task = self._starting.get(key)
        if task is None:
            hive = self.pick_hive(model, None, None)
            task = asyncio.create_task(
                self._start_one(model, hive, embedding), name=f"spawn-{model}"
            )
            self._starting[key] = task
            task.add_done_callback(lambda _: self._starting.pop(key, None))
        return await asyncio.shield(task)

    async def _start_one(self, model: str, hive: HiveView, embedding: bool) -> WorkerInfo:
        _, info = await self.start(model, hive, embedding=embedding)
        return info

    async def wait_ready(self, worker_id: str) -> WorkerInfo:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        async with self.bus.subscribe() as changes:
            while True:
                info = self.registry.get_worker(worker_id)
                if info is not None and info.status is WorkerStatus.READY:
                    return info
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Unavailable(
                        f"worker {worker_id} did not report ready within {self.timeout_s:.0f}s",
                        code="worker_start_timeout",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changes.get(), min(remaining, 1.0))
