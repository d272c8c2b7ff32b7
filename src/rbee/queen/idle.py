"""Keep-alive on the queen: unload workers idle past their keep-alive, through their hives.

The decision is `scheduler.lifecycle.idle_expired`; this module feeds it snapshots of the loaded
workers and carries it out. A worker's keep-alive comes from its own heartbeat (so a restarted
queen still knows it; None there = pinned) unless a request's `keep_alive` changed it since;
a pinned worker ignores requests' keep-alives (the operator's start wins over a client's ask).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from rbee.common.errors import RbeeError
from rbee.contracts.workers import WorkerInfo
from rbee.queen.operations import Operations
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.router import SERVING, Router, pool_of
from rbee.queen.scheduler.lifecycle import IdleSnapshot, idle_expired
from rbee.queen.scheduler.spawner import Spawner

log = logging.getLogger("rbee.queen.idle")
IDLE_CHECK_S = 1.0  # how often idle workers are looked for


class IdleWatch:
    """Snapshots of the loaded workers for the keep-alive, and their unloading."""

    def __init__(
        self,
        registry: WorkerRegistry,
        router: Router,
        spawner: Spawner,
        operations: Operations,
        min_replicas: Callable[[str], int] = lambda model: 0,
    ) -> None:
        self.registry = registry
        self.router = router
        self.spawner = spawner
        self.operations = operations
        self.min_replicas = min_replicas  # workers of a model kept however long they idle

    def keep_alive_s(self, info: WorkerInfo) -> float:
        if info.keep_alive_s is None:
            return math.inf
        asked = self.router.tracker.asked_keep_alive(info.id)
        return info.keep_alive_s if asked is None else asked

    def snapshots(self) -> list[IdleSnapshot]:
        registry, router = self.registry, self.router
        now = registry.now()
        found = []
        for record in registry.records():
            info = record.info
            if (
                info.status not in SERVING
                or not registry.is_fresh(record, now)
                or router.retiring(info.id)
            ):
                continue
            used = router.tracker.last_used(info.id)
            busy = bool(
                router.tracker.in_flight(info.id) or router.admission.waiting(pool_of(info))
            )
            found.append(
                IdleSnapshot(
                    worker_id=info.id,
                    model=info.model_id,
                    keep_alive_s=self.keep_alive_s(info),
                    busy=busy,
                    idle_since=now if used is None else used,
                )
            )
        return found

    async def unload_expired(self) -> list[str]:
        """Unload every worker idle past its keep-alive; returns their ids."""
        expired = idle_expired(self.snapshots(), self.registry.now(), self.min_replicas)
        infos = [info for w in expired if (info := self.registry.get_worker(w)) is not None]
        for info in infos:
            # At once, before anything awaits: no request may take it from here on, and one
            # that comes for its model starts another worker instead of waiting for this one.
            self.router.retire(info.id)
            self.spawner.stopping(info.id)  # on purpose: not an early death
        await asyncio.gather(*(self._unload(info, "idle") for info in infos))
        return [info.id for info in infos]

    async def _unload(self, info: WorkerInfo, reason: str) -> None:
        log.info("unloading worker %s (%s): %s", info.id, info.model_id, reason)
        try:
            await self.operations.stop_worker(info, reason)
        except RbeeError as exc:
            # It serves on, and its keep-alive starts again: the next try comes no sooner.
            log.warning("could not unload worker %s: %s", info.id, exc.message)
            self.router.tracker.restart_idle(info.id)
            self.router.unretire(info.id)


async def idle_loop(watch: IdleWatch, interval_s: float = IDLE_CHECK_S) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await watch.unload_expired()
