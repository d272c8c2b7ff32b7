"""Replicas follow the load: another worker for a model whose requests wait for busy workers.

The decision is `scheduler.replicas.wants_replica`; this module feeds it a snapshot of each pool
with requests waiting and starts the workers, through the spawner's usual on-demand start (the
placement with room, the back-off after failed starts, the on-demand keep-alive: an idle
replica unloads as any worker started on demand does, down to the model's min_replicas). It
never makes room: a pool that fits nowhere as things stand gets no replica, and its requests
wait for the workers they have.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rbee.common.errors import RbeeError
from rbee.contracts.workers import WorkerStatus
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.router import SERVING, Pool, Router, pool_of
from rbee.queen.scheduler.replicas import PoolLoad, wants_replica
from rbee.queen.scheduler.spawner import Spawner
from rbee.queen.state import QueenState

log = logging.getLogger("rbee.queen.replicas")
REPLICA_CHECK_S = 0.5  # how often pools with waiting requests are looked at


class ReplicaWatch:
    """Snapshots of the pools with waiting requests, and the replica starts for them."""

    def __init__(
        self,
        registry: WorkerRegistry,
        router: Router,
        spawner: Spawner,
        *,
        after_s: float,
        max_replicas: Callable[[str], int | None],
    ) -> None:
        self.registry = registry
        self.router = router
        self.spawner = spawner
        self.after_s = after_s
        self.max_replicas = max_replicas
        self.starts: dict[Pool, asyncio.Task[None]] = {}

    def pools(self) -> list[PoolLoad]:
        """The pools that have requests waiting, as the policy sees them."""
        waits = self.router.admission.longest_waits()
        if not waits:
            return []
        now = self.registry.now()
        workers: dict[Pool, int] = {}
        starting: dict[Pool, int] = {}
        for record in self.registry.records():
            info = record.info
            if not self.registry.is_fresh(record, now) or self.router.retiring(info.id):
                continue
            if info.status in SERVING:
                workers[pool_of(info)] = workers.get(pool_of(info), 0) + 1
            elif info.status is WorkerStatus.STARTING:
                starting[pool_of(info)] = starting.get(pool_of(info), 0) + 1
        found = []
        for key, (waiting, oldest_s) in waits.items():
            if not isinstance(key, tuple):
                continue
            model, embedding = key
            pool: Pool = (str(model), bool(embedding))
            free = self.router.candidates(pool[0], embedding=pool[1])
            found.append(
                PoolLoad(
                    model=pool[0],
                    embedding=pool[1],
                    workers=workers.get(pool, 0),
                    free_slots=sum(c.slots - c.in_flight for c in free),
                    starting=starting.get(pool, 0)
                    + int(pool in self.starts or self.spawner.starting(*pool)),
                    waiting=waiting,
                    oldest_wait_s=oldest_s,
                    max_replicas=self.max_replicas(pool[0]),
                )
            )
        return found

    def check(self) -> list[Pool]:
        """Start a replica for every pool that wants one and has room; returns those pools."""
        started = []
        for load in self.pools():
            if wants_replica(load, self.after_s) and self._has_room(load):
                pool = (load.model, load.embedding)
                log.info(
                    "%d request(s) for %s waited %.1fs with its %d worker(s) busy: starting "
                    "another",
                    *(load.waiting, load.model, load.oldest_wait_s, load.workers),
                )
                task = asyncio.create_task(self._start(pool), name=f"replica-{load.model}")
                self.starts[pool] = task
                task.add_done_callback(self._started)
                started.append(pool)
        return started

    def _started(self, task: asyncio.Task[None]) -> None:
        for pool, running in list(self.starts.items()):
            if running is task:
                del self.starts[pool]

    def _has_room(self, load: PoolLoad) -> bool:
        """A device fits another worker as things stand (on a hive its starts are not held
        back on): a replica is never worth unloading anything for."""
        held = frozenset(self.spawner.backoff.held_hives(load.model))
        try:
            self.spawner.place(self.spawner.demand(load.model), held)
        except RbeeError as exc:
            log.debug("no replica for %s: %s", load.model, exc.message)
            return False
        return True

    async def _start(self, pool: Pool) -> None:
        model, embedding = pool
        try:
            info = await self.spawner.ensure_worker(model, embedding=embedding, reason="replica")
        except RbeeError as exc:  # the back-off holds the hive; its requests wait on
            log.warning("could not start another worker for %s: %s", model, exc.message)
            return
        # Requests waiting for the busy workers may take the new one now.
        self.router.admission.notify(pool)
        log.info("worker %s is another replica of %s", info.id, model)

    async def settle(self) -> None:
        """Wait for the replica starts under way (tests, and shutting down)."""
        await asyncio.gather(*list(self.starts.values()), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self.starts.values()):
            task.cancel()
        await self.settle()


def replica_watch(state: QueenState) -> ReplicaWatch:
    settings = state.settings
    return ReplicaWatch(
        state.registry,
        state.router,
        state.spawner,
        after_s=settings.replica_after,
        max_replicas=settings.max_replicas_of,
    )


async def replica_loop(watch: ReplicaWatch, interval_s: float = REPLICA_CHECK_S) -> None:
    try:
        while True:
            await asyncio.sleep(interval_s)
            watch.check()
    except asyncio.CancelledError:  # the queen stops: so do the starts it began
        await watch.aclose()
        raise
