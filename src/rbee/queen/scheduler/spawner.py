"""Starting workers through hives, on demand or by job, and waiting until they are ready.

On-demand starts (for a model that has no live worker) go through the back-off: a hive where
starts of a model failed, or whose worker for it died soon after becoming ready, sits out for a
while, so a model that crashes on load cannot make the queen start workers in a loop. A start
asked for explicitly (a `worker_spawn` job) is the operator's call and is never held back.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from rbee.common.clock import Clock, monotonic
from rbee.common.errors import InsufficientMemory, NotFound, RbeeError, Unavailable, quote
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse
from rbee.contracts.hives import HiveView
from rbee.contracts.workers import WorkerInfo, keep_alive_wire
from rbee.queen.events import EventBus
from rbee.queen.hives import HiveRegistry
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.router import SERVING
from rbee.queen.scheduler.backoff import Hold, StartBackoff
from rbee.queen.scheduler.placement import Demand, Placement, place
from rbee.queen.scheduler.reservations import DeviceKey, Reservations

log = logging.getLogger("rbee.queen.spawner")

# Asks one hive to start a worker; the queen's wiring passes a call through the hive client.
SpawnFn = Callable[[HiveView, SpawnRequest], Awaitable[SpawnResponse]]
# Asks one hive to stop one of its worker processes, by pid.
StopFn = Callable[[HiveView, int], Awaitable[object]]
# Told how each start ended: (model, "ready" | "timeout" | "failed").
ResultFn = Callable[[str, str], None]
# Told of each worker loaded: (model, reason: "demand" | "manual", seconds it took).
LoadedFn = Callable[[str, str, float], None]
# The keep-alive (seconds; math.inf: pinned) of a worker started on demand for a model.
KeepAliveFn = Callable[[str], float]
# The context and slots of a model's workers started on demand, as the queen was told
# (--ctx-size/--slots, per model --model-ctx-size/--model-slots); None: the model's default.
SizingFn = Callable[[str], tuple[int | None, int | None]]
# Makes room for a demand that fits nowhere (evicting idle workers, or waiting for some to go
# idle): its placement then, or the refusal again (`rbee.queen.scheduler.room`).
MakeRoomFn = Callable[[Demand, frozenset[str], InsufficientMemory], Awaitable[Placement]]
# Starts a worker split over several devices for a demand no single device fits (issue 24):
# (demand, hives excluded, the refusal, reason) -> the ready worker, or None when no split fits
# now but room can be made on one device (`rbee.queen.scheduler.split_start.Splitter`).
SplitFn = Callable[[Demand, frozenset[str], InsufficientMemory, str], Awaitable[WorkerInfo | None]]


def load_deadline_s(base_s: float, per_gib_s: float, needed_bytes: int) -> float:
    """How long a worker may take to load: a base plus seconds per GiB its model needs, so a
    big or slow load is never cut off by a fixed short timeout."""
    return base_s + per_gib_s * max(0, needed_bytes) / (1 << 30)


@dataclass(frozen=True, slots=True)
class Started:
    """A worker the queen started on demand, watched for an early death."""

    model: str
    hive_id: str
    ready_at: float


def hold_message(model: str, holds: list[Hold], remaining_s: float) -> str:
    where = ", ".join(f"{h.hive_id} ({h.failures} failed: {h.reason})" for h in holds)
    return (
        f"no worker for model {quote(model)} can serve now, and starting one is on hold for "
        f"{remaining_s:.0f}s after failures on {where}"
    )


class Spawner:
    def __init__(
        self,
        registry: WorkerRegistry,
        hives: HiveRegistry,
        bus: EventBus,
        spawn: SpawnFn,
        timeout_s: float,
        on_result: ResultFn = lambda model, result: None,
        *,
        stop: StopFn,
        backoff: StartBackoff | None = None,
        clock: Clock = monotonic,
        on_loaded: LoadedFn = lambda model, reason, seconds: None,
        keep_alive: KeepAliveFn = lambda model: math.inf,
        timeout_per_gib_s: float = 0.0,
        sizing: SizingFn = lambda model: (None, None),
    ) -> None:
        self.registry = registry
        self.hives = hives
        self.bus = bus
        self.spawn = spawn
        self.stop = stop
        self.timeout_s = timeout_s  # the base of the load deadline
        self.timeout_per_gib_s = timeout_per_gib_s
        # Models with a worker being started (on demand or by job): `/v1/models` says loading.
        self.loading: Counter[str] = Counter()
        self.on_result = on_result
        self.on_loaded = on_loaded
        self.keep_alive = keep_alive
        self.sizing = sizing
        self._clock = clock
        self.backoff = backoff or StartBackoff(clock=clock)
        self._starting: dict[tuple[str, bool], asyncio.Task[WorkerInfo]] = {}
        self._started: dict[str, Started] = {}
        self._stopping: set[str] = set()  # workers the queen is stopping, their stop not done
        self.make_room: MakeRoomFn | None = None  # None: a start that does not fit is refused
        self.split: SplitFn | None = None  # None: a model no single device fits is refused
        # A hive heartbeats right after a spawn; one heartbeat timeout is ample for it.
        self.reservations = Reservations(registry.timeout_s, clock)

    def demand(self, model: str, embedding: bool = False) -> Demand:
        """What a worker of the model started on demand (or as a replica) asks for."""
        ctx_size, slots = self.sizing(model)
        return Demand(model=model, ctx_size=ctx_size, slots=slots, embedding=embedding)

    def place(
        self,
        demand: Demand,
        exclude: frozenset[str] = frozenset(),
        returned: Mapping[DeviceKey, int] | None = None,
    ) -> Placement:
        """Where a new worker goes: the hive asked for must be online; the rest is placement's
        (over the hives not in `exclude`, counting the memory of spawns still in flight as
        taken, and `returned`, given back by workers that exited, as free)."""
        if demand.hive_id is not None:
            hive = self.hives.get(demand.hive_id)
            if hive is None or not hive.online:
                raise Unavailable(
                    f"hive {quote(demand.hive_id)} is not online", code="hive_unavailable"
                )
        hives = self.hives.all()
        taken = dict(self.reservations.taken(hives))
        for key, freed in (returned or {}).items():
            taken[key] = taken.get(key, 0) - freed
        return place([h for h in hives if h.id not in exclude], demand, taken)

    async def start(
        self,
        placement: Placement,
        demand: Demand,
        *,
        embedding: bool = False,
        rerank: bool = False,
        cores: int | None = None,
        reason: str = "manual",
        keep_alive_s: float | None = None,
    ) -> tuple[SpawnResponse, WorkerInfo]:
        """Ask the hive to start a worker, then wait until it heartbeats `ready`. `reason`:
        why it loads (`demand`: a request needs it; `manual`: someone asked); `keep_alive_s`:
        how long it may stay idle (None: pinned).

        The worker's estimated memory counts as taken on its device until a hive heartbeat
        lists the worker (its figures then show the memory the worker really took), so
        placements made meanwhile do not pick the same room twice. A worker that does not
        report ready in time is stopped, so a later start cannot leave the model running twice.
        """
        model = demand.model
        need = placement.estimate.total if placement.estimate else 0
        deadline_s = load_deadline_s(self.timeout_s, self.timeout_per_gib_s, need)
        request = SpawnRequest(
            model=model,
            device=placement.device_id,
            slots=placement.slots,
            ctx_size=placement.ctx_size,
            gpu_layers=demand.gpu_layers,
            embedding=embedding or rerank,
            rerank=rerank,
            cores=cores,
            kv_cache_type=demand.kv_cache_type,
            prompt_cache_bytes=placement.estimate.prompt_cache if placement.estimate else None,
            keep_alive_s=keep_alive_s,
            load_timeout_s=deadline_s,
        )
        began = self._clock()
        reservation = self.reservations.hold(placement.hive.id, placement.device_id, need)
        self.loading[model] += 1
        try:
            try:
                spawned = await self.spawn(placement.hive, request)
            except BaseException:
                self.reservations.release(reservation)
                raise
            self.reservations.started(reservation, spawned.worker_id)
            try:
                ready = await self.wait_ready(spawned.worker_id, deadline_s)
            except Exception:
                await self._stop_unready(placement.hive, spawned)
                self.reservations.release(reservation)
                raise
        except Unavailable as exc:
            self.on_result(model, "timeout" if exc.code == "worker_start_timeout" else "failed")
            raise
        except Exception:
            self.on_result(model, "failed")
            raise
        finally:
            self.loading[model] -= 1
            if self.loading[model] <= 0:
                del self.loading[model]
        self.on_result(model, "ready")
        seconds = self._clock() - began
        self.on_loaded(model, reason, seconds)
        self.bus.publish(
            "model",
            {
                "change": "loaded",
                "model": model,
                "worker_id": spawned.worker_id,
                "hive_id": placement.hive.id,
                "reason": reason,
                "load_s": round(seconds, 3),
                "keep_alive_s": keep_alive_s,
            },
        )
        return spawned, ready

    async def _stop_unready(self, hive: HiveView, spawned: SpawnResponse) -> None:
        try:
            await self.stop(hive, spawned.pid)
        except Exception as exc:  # gone already, or the hive is: nothing more to do here
            log.warning(
                "could not stop worker %s (pid %d) on %s after its failed start: %s",
                *(spawned.worker_id, spawned.pid, hive.id, exc),
            )
        else:
            log.info("stopped worker %s on %s: it did not start", spawned.worker_id, hive.id)

    async def ensure_worker(
        self, model: str, *, embedding: bool = False, reason: str = "demand"
    ) -> WorkerInfo:
        """Start one worker for a model without a live one (for embeddings, or for chat and
        completions), or one more (`reason` "replica"); concurrent callers share the start.

        Raises `Unavailable` (with the reason) while every hive that has the model is on hold."""
        key = (model, embedding)
        task = self._starting.get(key)
        if task is None:
            self._forget_stable()
            self._raise_if_all_held(model)
            task = asyncio.create_task(
                self._start_somewhere(model, embedding, reason), name=f"spawn-{model}"
            )
            self._starting[key] = task
            task.add_done_callback(lambda _: self._starting.pop(key, None))
        return await asyncio.shield(task)

    def starting(self, model: str, embedding: bool = False) -> bool:
        """A start for the model's workers (of this kind) is under way."""
        return (model, embedding) in self._starting

    def _raise_if_all_held(self, model: str) -> None:
        held = self.backoff.held_hives(model)
        if not held:
            return
        free = [h for h in self.hives.all() if h.online and model in h.models and h.id not in held]
        if free:
            return
        holds = self.backoff.holds(model)
        remaining = self.backoff.remaining_s(holds[0])
        raise Unavailable(
            hold_message(model, holds, remaining),
            code="no_worker",
            headers={"Retry-After": str(max(1, round(remaining)))},
        )

    async def _start_somewhere(self, model: str, embedding: bool, reason: str) -> WorkerInfo:
        """Try the best hive not on hold; if the start fails there, the next one. When every
        hive has been tried, those the back-off does not hold yet get another go (a first
        failure, such as a new worker killed while loading, is retried at once), once."""
        tried: set[str] = set()
        last: RbeeError | None = None
        second_round = False
        while True:
            exclude = frozenset(tried | self.backoff.held_hives(model))
            demand = self.demand(model, embedding)
            try:
                placement = self.place(demand, exclude)
            except InsufficientMemory as refused:
                # Split over several devices (a replica or an embedding worker never is).
                if self.split is not None and reason == "demand" and not embedding:
                    split = await self.split(demand, exclude, refused, reason)
                    if split is not None:
                        if split.hive_id is not None:  # its early death counts, as any start's
                            self._started[split.id] = Started(model, split.hive_id, self._clock())
                        return split
                if self.make_room is None or reason != "demand":  # a replica evicts nothing
                    raise
                placement = await self.make_room(demand, exclude, refused)
            except NotFound:
                again = tried - self.backoff.held_hives(model)
                if last is not None and again and not second_round:
                    second_round, tried = True, tried - again
                    continue
                if last is not None:
                    raise last from None
                self._raise_if_all_held(model)
                raise
            hive = placement.hive
            tried.add(hive.id)
            log.info("no live worker for %s: starting one on %s", model, hive.id)
            try:
                _, info = await self.start(
                    placement,
                    demand,
                    embedding=embedding,
                    reason=reason,
                    keep_alive_s=keep_alive_wire(self.keep_alive(model)),
                )
            except RbeeError as exc:
                last = exc
                hold = self.backoff.failed(model, hive.id, f"start failed: {exc.message}")
                log.warning(
                    "starting %s on %s failed (%d in a row): %s",
                    *(model, hive.id, hold.failures, exc.message),
                )
                continue
            self._started[info.id] = Started(model, hive.id, self._clock())
            return info

    def worker_lost(self, worker_id: str, reason: str) -> None:
        """A worker went offline or refused connections. If the queen started it on demand and
        it dies soon after becoming ready, that start counts as failed."""
        self.reservations.forget(worker_id)
        started = self._started.pop(worker_id, None)
        if started is None:
            return
        hold = self.backoff.worker_ended(
            started.model,
            started.hive_id,
            started.ready_at,
            f"worker {worker_id} died {self._clock() - started.ready_at:.0f}s after ready "
            f"({reason})",
        )
        if hold is not None:
            log.warning("%s", hold.reason)

    def ready_at(self, worker_id: str) -> float | None:
        """When a worker the queen started on demand became ready (None: not one of those, or
        long since)."""
        started = self._started.get(worker_id)
        return None if started is None else started.ready_at

    def stopping(self, worker_id: str) -> None:
        """The queen is stopping the worker on purpose: its end is no early death. What was
        promised to it stays taken until its hive says it has exited (`stop_done`): the hive's
        figures may not show the worker yet, and its last heartbeat comes before its exit."""
        self._started.pop(worker_id, None)
        self._stopping.add(worker_id)

    def stop_done(self, worker_id: str, exited: bool) -> None:
        """The stop the queen asked for ended: the worker exited (its room is free again), or
        the stop failed (it may still run: its room stays taken until it goes)."""
        self._stopping.discard(worker_id)
        if exited:
            self.reservations.forget(worker_id)

    def worker_stopped(self, worker_id: str) -> None:
        """A worker said it stopped (asked to, or shut down): not a failure, and its room is
        free again, unless the queen is stopping it (then once its hive says it exited)."""
        if worker_id not in self._stopping:
            self.reservations.forget(worker_id)
        self._started.pop(worker_id, None)

    def _forget_stable(self) -> None:
        now = self._clock()
        for worker_id, started in list(self._started.items()):
            if now - started.ready_at >= self.backoff.stable_after_s:
                self.backoff.stable(started.model, started.hive_id)
                del self._started[worker_id]

    async def wait_ready(self, worker_id: str, timeout_s: float | None = None) -> WorkerInfo:
        """Wait until the worker reports that it serves (`ready`, or `busy`: requests that
        arrived while it started may take it before this wait sees it ready, and a loaded
        worker kept busy might never say `ready` again). The hive answers only once the worker
        is up, so a worker that goes offline or stays silent for a heartbeat timeout after that
        has died: waiting out the whole spawn timeout for it would hold every request up."""
        loop = asyncio.get_running_loop()
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = loop.time() + timeout_s
        silent_until = loop.time() + self.registry.timeout_s
        async with self.bus.subscribe() as changes:
            while True:
                record = self.registry.get_record(worker_id)
                if record is not None and record.info.status in SERVING:
                    return record.info
                heard = record is not None and self.registry.is_fresh(record)
                if not heard and loop.time() >= silent_until:
                    raise Unavailable(
                        f"worker {worker_id} went away before it reported ready",
                        code="worker_start_failed",
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Unavailable(
                        f"worker {worker_id} did not report ready within {timeout_s:.0f}s",
                        code="worker_start_timeout",
                    )
                try:
                    event, data = await asyncio.wait_for(changes.get(), min(remaining, 1.0))
                except TimeoutError:
                    continue
                if (
                    event == "worker"
                    and data.get("worker_id") == worker_id
                    and data.get("state") in ("offline", "removed")
                ):
                    raise Unavailable(
                        f"worker {worker_id} went {data['state']} before it reported ready",
                        code="worker_start_failed",
                    )
