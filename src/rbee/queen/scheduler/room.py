"""Making room for a model that fits nowhere: evict idle workers, or wait for one to go idle.

The choice is `scheduler.eviction.choose_eviction`; this module feeds it snapshots of the
loaded workers, carries it out and waits. A start for a model that does not fit (placement
raises `InsufficientMemory` with a `Retry-After`: it would fit on an emptier device) waits
here, within the queen's queue timeout, while:
- workers chosen for eviction are retired at once (no request takes them any more), stopped
  through their hive once the requests in flight on them have ended (never cut off), and their
  memory counts as coming back until the hive's heartbeat no longer lists them: the hive's
  figures then show the room, and nothing is evicted twice for it;
- with nothing to evict (every worker there busy or pinned), it waits for a change: a worker
  going idle, a heartbeat, a keep-alive unload.
No thrash: a worker whose model had requests waiting when the model asking began to wait is
not evicted, so a loaded model serves that queue before it is swapped out; so are the
requests it was loaded for (all that came before it was ready: two models asked in turns
while the first loads are one swap, not one per request). Requests for it that come later
wait for its next turn. A worker with only requests in flight is drained:
retired, stopped once they end. Once a model has waited for room for the swap wait
(`--swap-max-wait`), any unpinned worker may be drained, so the other model cannot starve.
A drain that nobody waits for any more (the asking requests got room elsewhere, gave up or
left) is called off before its stop: the worker serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rbee.common.errors import InsufficientMemory, RbeeError
from rbee.contracts.workers import DEFAULT_CTX_SIZE, WorkerInfo
from rbee.queen.idle import IdleWatch
from rbee.queen.routing.router import SERVING, pool_of
from rbee.queen.scheduler.eviction import Resident, choose_eviction
from rbee.queen.scheduler.placement import RETRY_AFTER_S, Demand, Placement, estimate_for
from rbee.queen.scheduler.reservations import DeviceKey

log = logging.getLogger("rbee.queen.room")
# How often a wait for room looks again between the events that wake it (heartbeats, workers
# coming and going): a queue emptying or a request ending publishes none, and a swap waits for it.
POLL_S = 0.05
# A drained worker stops the moment its last request in flight ends; meanwhile, how often it
# is checked that the worker is still in the registry.
DRAIN_CHECK_S = 1.0
# A model that asks again within this long after its wait for room ran out keeps its place
# in time (a client retrying as Retry-After says): its swap wait is not restarted.
HUNGER_GAP_S = 2.0 * RETRY_AFTER_S
# A worker just loaded is left alone until a request has taken it, at most this long (queen's
# clock): the requests it was loaded for take it in the moments after, and another model's
# wait must not evict it first.
HANDOVER_S = 2.0


@dataclass(slots=True)
class _Freeing:
    hive_id: str
    device_id: str
    bytes: int
    for_model: str  # the room is kept for it while it waits
    stopping: bool = False  # its stop has begun: it can no longer be called off
    stopped_at: float | None = None  # registry clock; None: still draining or stopping
    # What the hive said it held when it stopped it: free now, though the hive's figures say
    # so only from its next heartbeat.
    freed_bytes: int = 0


class Room:
    def __init__(
        self,
        watch: IdleWatch,
        *,
        wait_s: float,
        swap_max_wait_s: float,
        on_swap: Callable[[], None] = lambda: None,
        min_replicas: Callable[[str], int] = lambda model: 0,
    ) -> None:
        self.watch = watch
        self.registry = watch.registry
        self.router = watch.router
        self.spawner = watch.spawner
        self.wait_s = wait_s
        self.swap_max_wait_s = swap_max_wait_s
        self.on_swap = on_swap
        self.min_replicas = min_replicas  # workers of a model that are never evicted
        self._evicting: dict[str, _Freeing] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # worker id: its eviction
        # model: (waiting since, last seen) by the event loop's clock, and since by the queen's
        self._hunger: dict[str, tuple[float, float, float]] = {}
        self._asking: dict[str, int] = {}  # model: requests waiting for room for it now
        # Room made by evictions, kept for the model they were for while it waits for it.
        self._earmarks: dict[DeviceKey, str] = {}

    def residents(self, asked_at: float) -> list[Resident]:
        """The loaded workers that could make room (serving, heard from, not going away);
        their queues count the requests that came by `asked_at` (queen's clock), or by the
        moment the worker was ready if that is later."""
        registry, router = self.registry, self.router
        hives = {h.id: h for h in self.spawner.hives.all()}
        now = registry.now()
        found = []
        for record in registry.records():
            info = record.info
            hive = hives.get(info.hive_id or "")
            if (
                hive is None
                or info.status not in SERVING
                or not registry.is_fresh(record, now)
                or router.retiring(info.id)
                or self._handing_over(info, now)
            ):
                continue
            device = next((d for d in hive.devices if d.id == info.device), None)
            demand = Demand(
                info.model_id,
                info.ctx_size or DEFAULT_CTX_SIZE,
                info.slots,
                embedding=info.embedding,
            )
            estimate = estimate_for(hive, device, demand) if device else None
            used = router.tracker.last_used(info.id)
            # The requests it was loaded for (those that came before it was ready) are its
            # queue too, though some came after the model asking began to wait.
            ready_at = self.spawner.ready_at(info.id)
            queue_by = asked_at if ready_at is None else max(asked_at, ready_at)
            found.append(
                Resident(
                    worker_id=info.id,
                    model=info.model_id,
                    hive_id=hive.id,
                    device_id=info.device,
                    bytes=estimate.total if estimate else 0,
                    pinned=math.isinf(self.watch.keep_alive_s(info)),
                    in_flight=router.tracker.in_flight(info.id),
                    queued=router.admission.waiting_since(pool_of(info), queue_by),
                    last_used=now if used is None else used,
                )
            )
        return found

    def _handing_over(self, info: WorkerInfo, now: float) -> bool:
        """Just loaded (or its start still finishing): the requests it was loaded for have
        yet to take it."""
        if self.spawner.starting(info.model_id, info.embedding):  # its start is finishing
            return True
        if self.router.tracker.begun(info.id) > 0:
            return False
        return now - (self.spawner.ready_at(info.id) or -math.inf) < HANDOVER_S

    def freeing(self) -> dict[DeviceKey, int]:
        """Memory of evicted workers that their hive's figures do not show free yet."""
        hives = {h.id: h for h in self.spawner.hives.all()}
        now = self.registry.now()
        coming: dict[DeviceKey, int] = {}
        for worker_id, f in list(self._evicting.items()):
            hive = hives.get(f.hive_id)
            if f.stopped_at is not None and (
                hive is None
                or worker_id not in hive.workers
                # The hive reported after the stop: its figures have the room (a new worker
                # may hold the old one's id, as it took the port the stop freed).
                or now - hive.last_seen_s >= f.stopped_at
                or now - f.stopped_at > self.registry.timeout_s  # a hive that never says
            ):
                del self._evicting[worker_id]
                continue
            key = (f.hive_id, f.device_id)
            coming[key] = coming.get(key, 0) + f.bytes
        return coming

    def returned(self) -> dict[DeviceKey, int]:
        """Memory evicted workers gave back (they have exited) that their hive's figures do not
        show free yet: a placement counts it free at once, not a heartbeat later. Call after
        `freeing`, which forgets the workers whose room the figures show."""
        back: dict[DeviceKey, int] = {}
        for f in self._evicting.values():
            if f.stopped_at is not None and f.freed_bytes > 0:
                key = (f.hive_id, f.device_id)
                back[key] = back.get(key, 0) + f.freed_bytes
        return back

    def evict(self, chosen: Sequence[Resident], for_model: str) -> None:
        for resident in chosen:
            info = self.registry.get_worker(resident.worker_id)
            if info is None:
                continue
            # At once, before anything awaits: no request may take it from here on.
            self.router.retire(info.id)
            self._evicting[info.id] = _Freeing(
                resident.hive_id, resident.device_id, resident.bytes, for_model
            )
            self._earmarks[(resident.hive_id, resident.device_id)] = for_model
            log.info(
                "evicting worker %s (%s, last used %.0fs ago) to load %s",
                *(info.id, info.model_id, self.registry.now() - resident.last_used, for_model),
            )
            task = asyncio.create_task(self._evict(info), name=f"evict-{info.id}")
            self._tasks[info.id] = task
            task.add_done_callback(functools.partial(self._evicted, info.id))

    def _evicted(self, worker_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(worker_id) is task:
            del self._tasks[worker_id]

    def _call_off(self, model: str) -> None:
        """Nobody waits for room for `model` any more: drains for it that have not begun to
        stop their worker are called off, and those workers serve again."""
        for worker_id, freeing in list(self._evicting.items()):
            if freeing.for_model != model or freeing.stopping:
                continue
            task = self._tasks.pop(worker_id, None)
            if task is not None:
                task.cancel()
            del self._evicting[worker_id]
            self.router.tracker.restart_idle(worker_id)
            self.router.unretire(worker_id)
            log.info("kept worker %s: nothing waits for room for %s any more", worker_id, model)

    async def _evict(self, info: WorkerInfo) -> None:
        # Never cut a request off: a drained worker stops once its requests in flight end.
        while self.router.tracker.in_flight(info.id) > 0:
            if self.registry.get_worker(info.id) is None:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.router.tracker.idle(info.id), DRAIN_CHECK_S)
        freeing = self._evicting.get(info.id)
        if freeing is not None:
            freeing.stopping = True
        try:
            stopped = await self.watch.operations.stop_worker(info, "evicted")
        except RbeeError as exc:
            log.warning("could not evict worker %s: %s", info.id, exc.message)
            self._evicting.pop(info.id, None)
            self.router.tracker.restart_idle(info.id)
            self.router.unretire(info.id)
            return
        freeing = self._evicting.get(info.id)
        if freeing is not None:
            freeing.stopped_at = self.registry.now()
            freeing.freed_bytes = stopped.get("freed_bytes") or 0

    async def make_room(
        self, demand: Demand, exclude: frozenset[str], refused: InsufficientMemory
    ) -> Placement:
        """A placement for `demand` once room is made, or `refused` again (503
        insufficient_memory, Retry-After) when none came within the wait. A model bigger than
        any device, even an empty one, is refused at once."""
        if refused.retry_after_s is None:
            raise refused
        model = demand.model
        loop = asyncio.get_running_loop()
        now = loop.time()
        since, last, asked_at = self._hunger.get(model, (now, now, self.registry.now()))
        if now - last > HUNGER_GAP_S:
            since, asked_at = now, self.registry.now()
        deadline = now + self.wait_s
        self._asking[model] = self._asking.get(model, 0) + 1
        try:
            return await self._wait_for_room(demand, exclude, refused, (since, asked_at), deadline)
        finally:
            self._asking[model] -= 1
            if not self._asking[model]:
                del self._asking[model]
                self._earmarks = {k: m for k, m in self._earmarks.items() if m != model}
                self._call_off(model)

    async def _wait_for_room(
        self,
        demand: Demand,
        exclude: frozenset[str],
        refused: InsufficientMemory,
        hungry: tuple[float, float],  # since when the model waits: loop's clock, queen's clock
        deadline: float,
    ) -> Placement:
        model = demand.model
        since, asked_at = hungry
        loop = asyncio.get_running_loop()
        async with self.spawner.bus.subscribe() as changes:
            while True:
                now = loop.time()
                self._hunger[model] = (since, now, asked_at)
                self.freeing()  # forgets the evictions whose room the hives' figures show
                try:
                    placement = self.spawner.place(demand, exclude, self.returned())
                except InsufficientMemory as exc:
                    refused = exc
                else:
                    key = (placement.hive.id, placement.device_id)
                    if self._earmarks.get(key, model) == model:
                        self._hunger.pop(model, None)
                        if key in self._earmarks:
                            self.on_swap()  # it loads where another model was evicted for it
                        return placement
                    # Room another model's evictions made, for it: this one waits its turn.
                if refused.retry_after_s is None:
                    raise refused
                all_hives = self.spawner.hives.all()
                residents = self.residents(asked_at)
                choice = choose_eviction(
                    [h for h in all_hives if h.id not in exclude],
                    demand,
                    residents,
                    self.spawner.reservations.taken(all_hives),
                    self.freeing(),
                    drain=now - since >= self.swap_max_wait_s,
                    min_replicas=self.min_replicas,
                )
                if choice is not None and choice.worker_ids:
                    self.evict([r for r in residents if r.worker_id in choice.worker_ids], model)
                    continue
                remaining = deadline - now
                if remaining <= 0:
                    raise refused
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changes.get(), min(remaining, POLL_S))

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
