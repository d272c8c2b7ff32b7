"""The queen's jobs: cluster operations carried out through the hives, with progress events.

Hive work is forwarded to the hive's registered URL with the typed hive client; the hive's own
download progress is relayed event by event, and cancelling the queen's job cancels the hive's.

Loading and unloading a model by hand (`rbee load`, `rbee unload`) are jobs too: a load starts
a worker where the queen would start one on demand (pinned unless given a keep-alive, as every
explicit start); an unload stops leasing the model's workers, lets the requests in flight on
them finish (or, `now`, cuts them: each client gets 503 `worker_stopping`), then stops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import httpx

from rbee.clients.hive import HiveClient, HiveError
from rbee.common.errors import (
    BadGateway,
    BadRequest,
    InsufficientMemory,
    NotFound,
    RbeeError,
    Unavailable,
    quote,
)
from rbee.common.jobs import Job
from rbee.common.model_memory import gib
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse, WorkerStopped
from rbee.contracts.hives import HiveView
from rbee.contracts.jobs import (
    JobEvent,
    JobRequest,
    ModelDeleteJob,
    ModelDownloadJob,
    ModelListJob,
    ModelLoadJob,
    ModelUnloadJob,
    WorkerSpawnJob,
    WorkerStopJob,
)
from rbee.contracts.workers import WorkerInfo
from rbee.queen.hives import HiveRegistry
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.router import Router
from rbee.queen.scheduler.placement import Demand, hives_with_model
from rbee.queen.scheduler.spawner import Spawner
from rbee.queen.scheduler.split_start import Splitter, give_back_helpers

# Told of each worker stopped through its hive: (the worker, why: "idle", "manual", ...).
UnloadedFn = Callable[[WorkerInfo, str], None]
# Told of each worker about to be stopped while requests may still run on it.
CutFn = Callable[[str], None]
DRAIN_TIMEOUT_S = 600.0  # longest an unload waits for the requests in flight to finish
DRAIN_POLL_S = 0.1
LOADING_NEWS_S = 5.0  # how often a load job says it is still loading


def hive_failure(exc: HiveError) -> RbeeError:
    return BadGateway(exc.message, code=exc.code or "hive_error")


class HiveClients:
    """One client per hive URL, kept for the queen's lifetime."""

    def __init__(
        self,
        token: str | None,
        transport: httpx.AsyncBaseTransport | None,
        spawn_timeout_s: float,
    ) -> None:
        self.token = token
        self.transport = transport
        self.spawn_timeout_s = spawn_timeout_s
        self._clients: dict[str, HiveClient] = {}

    def get(self, hive: HiveView) -> HiveClient:
        client = self._clients.get(hive.url)
        if client is None:
            client = HiveClient(
                hive.url,
                token=self.token,
                transport=self.transport,
                spawn_timeout=self.spawn_timeout_s,  # the queen's --spawn-timeout decides
            )
            self._clients[hive.url] = client
        return client

    async def spawn(self, hive: HiveView, request: SpawnRequest) -> SpawnResponse:
        try:
            return await self.get(hive).spawn(request)
        except HiveError as exc:
            raise hive_failure(exc) from None

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


class Operations:
    def __init__(
        self,
        registry: WorkerRegistry,
        hives: HiveRegistry,
        spawner: Spawner,
        clients: HiveClients,
        on_unloaded: UnloadedFn = lambda info, reason: None,
        *,
        router: Router,
        cut: CutFn = lambda worker_id: None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.hives = hives
        self.spawner = spawner
        self.clients = clients
        self.on_unloaded = on_unloaded
        self.router = router
        self.cut = cut
        self.drain_timeout_s = drain_timeout_s
        self._releasing: set[asyncio.Task[list[str]]] = set()  # helpers being given back
        # Splits a model no single device fits (None: such a load is refused).
        self.splitter: Splitter | None = None

    def check(self, request: JobRequest) -> None:
        """Refuse at once, before a job starts and with nothing changed, a load of a model no
        online hive has or an unload of a model no worker serves."""
        if isinstance(request, ModelLoadJob) and not hives_with_model(
            self.hives.all(), request.model
        ):
            served = {m for h in self.hives.all() if h.online for m in h.models}
            known = ", ".join(sorted(served)) or "none"
            raise NotFound(
                f"unknown model {quote(request.model)}: no online hive has it (models: {known})",
                code="model_not_found",
                param="model",
            )
        if isinstance(request, ModelUnloadJob) and not self._workers_of(request.model):
            loaded = ", ".join(sorted(self.registry.models())) or "none"
            raise NotFound(
                f"model {quote(request.model)} is not loaded: no worker serves it "
                f"(loaded: {loaded})",
                code="model_not_loaded",
                param="model",
            )

    def _workers_of(self, model: str) -> list[WorkerInfo]:
        """The model's workers that a hive started (and so can stop), not already going."""
        return [
            w
            for w in self.registry.find_workers_by_model(model)
            if w.hive_id is not None and not self.router.retiring(w.id)
        ]

    def _online_hive(self, hive_id: str) -> HiveView:
        hive = self.hives.get(hive_id)
        if hive is None:
            known = ", ".join(h.id for h in self.hives.all()) or "none"
            raise NotFound(f"no hive {quote(hive_id)} (hives: {known})", code="hive_not_found")
        if not hive.online:
            raise Unavailable(f"hive {quote(hive_id)} is offline", code="hive_unavailable")
        return hive

    def _one_hive(self, hive_id: str | None, model: str | None = None) -> HiveView:
        if hive_id is not None:
            return self._online_hive(hive_id)
        online = self.hives.online()
        if model is not None:
            online = [h for h in online if model in h.models] or online
        if len(online) == 1:
            return online[0]
        if not online:
            raise Unavailable("no hive is online", code="no_hive")
        names = ", ".join(h.id for h in online)
        raise BadRequest(f"several hives are online ({names}): say which", code="hive_required")

    async def worker_spawn(self, job: Job, request: WorkerSpawnJob) -> dict[str, Any]:
        asked_ctx, asked_slots = self.spawner.sizing(request.model)
        demand = Demand(
            model=request.model,
            ctx_size=request.ctx_size or asked_ctx,
            slots=request.slots or asked_slots,
            gpu_layers=request.gpu_layers,
            device=request.device,
            hive_id=request.hive_id,
            kv_cache_type=request.kv_cache_type,
            embedding=bool(request.embedding or request.rerank),
        )
        placement = self.spawner.place(demand)
        hive = placement.hive
        needs = (
            f", needs {placement.estimate.describe()}"
            if placement.estimate
            else f", {placement.ctx_size} tokens x {placement.slots} slot(s)"
        )
        job.emit(
            JobEvent(
                type="log",
                message=f"starting a {request.model} worker on {hive.id} {placement.device_id}{needs}",
            )
        )
        spawned, _ = await self.spawner.start(
            placement,
            demand,
            embedding=bool(request.embedding or request.rerank),
            rerank=bool(request.rerank),
            cores=request.cores,
            reason="manual",
            keep_alive_s=request.keep_alive,  # unset: pinned, as every explicit start
        )
        job.emit(JobEvent(type="log", message=f"worker {spawned.worker_id} is ready"))
        return {
            **spawned.model_dump(),
            "hive_id": hive.id,
            "device": placement.device_id,
            "ctx_size": placement.ctx_size,
            "slots": placement.slots,
        }

    async def model_load(self, job: Job, request: ModelLoadJob) -> dict[str, Any]:
        """One more worker for the model, placed as an on-demand start would be."""
        self.check(request)
        spawn = WorkerSpawnJob(
            operation="worker_spawn",
            model=request.model,
            hive_id=request.hive_id,
            keep_alive=request.keep_alive,
            ctx_size=request.ctx_size,
            slots=request.slots,
        )
        began = asyncio.get_running_loop().time()

        async def news() -> None:
            while True:
                await asyncio.sleep(LOADING_NEWS_S)
                waited = asyncio.get_running_loop().time() - began
                job.emit(JobEvent(type="log", message=f"loading {request.model}… {waited:.0f}s"))

        ticker = asyncio.create_task(news())
        try:
            try:
                return await self.worker_spawn(job, spawn)
            except InsufficientMemory as refused:
                if request.hive_id is not None or self.splitter is None:
                    raise
                return await self._load_split(self.splitter, job, request, refused)
        finally:
            ticker.cancel()

    async def _load_split(
        self, splitter: Splitter, job: Job, request: ModelLoadJob, refused: InsufficientMemory
    ) -> dict[str, Any]:
        """A load of a model no single device fits: split over several, as a request for it
        would be (the split's own refusal says how much is missing, or how to turn splitting
        across hives on)."""
        asked_ctx, asked_slots = self.spawner.sizing(request.model)
        demand = Demand(
            model=request.model,
            ctx_size=request.ctx_size or asked_ctx,
            slots=request.slots or asked_slots,
        )
        try:  # what it will be, to say so (start plans it again, and may wait for memory)
            plan = splitter.plan(demand)
        except InsufficientMemory:
            pass
        else:
            parts = ", ".join(f"{p.hive_id} {p.device.id} {gib(p.bytes)}" for p in plan.parts)
            job.emit(
                JobEvent(
                    type="log",
                    message=f"{request.model} fits on no single device: splitting it over {parts}",
                )
            )
        info = await splitter.start(
            demand, frozenset(), refused, "manual", keep_alive_s=request.keep_alive
        )
        if info is None:  # it would fit on one device once room is made: a load makes none
            raise refused
        job.emit(JobEvent(type="log", message=f"worker {info.id} is ready"))
        return {
            "worker_id": info.id,
            "hive_id": info.hive_id,
            "device": info.parts[0].device if info.parts else None,
            "ctx_size": info.ctx_size,
            "slots": info.slots,
            "parts": [p.model_dump() for p in info.parts],
        }

    async def model_unload(self, job: Job, request: ModelUnloadJob) -> dict[str, Any]:
        """Stop the model's workers: no new request goes to them from now on (a request for the
        model starts another worker), those in flight finish first unless `now`."""
        self.check(request)
        workers = self._workers_of(request.model)
        for info in workers:
            self.router.retire(info.id)
            self.spawner.stopping(info.id)  # on purpose: not an early death

        def say(message: str) -> None:
            job.emit(JobEvent(type="log", message=message))

        try:
            if not request.now:
                await self._drain(workers, say)
        except BaseException:
            for info in workers:  # cancelled while waiting: they serve on
                self.router.unretire(info.id)
            raise
        for info in workers:
            self.cut(info.id)
        results = await asyncio.gather(
            *(self.stop_worker(info, "manual", say) for info in workers), return_exceptions=True
        )
        failed = [
            (info, r)
            for info, r in zip(workers, results, strict=True)
            if isinstance(r, BaseException)
        ]
        for info, _ in failed:
            self.router.unretire(info.id)
        if failed:
            error = failed[0][1]
            if isinstance(error, RbeeError):
                raise error
            raise BadGateway(f"could not stop worker {failed[0][0].id}: {error}")
        stopped = [r for r in results if isinstance(r, dict)]
        return {"model": request.model, "now": request.now, "workers": stopped}

    async def _drain(self, workers: list[WorkerInfo], say: Callable[[str], None]) -> None:
        """Wait until no request runs on the workers (bounded: past the drain timeout, the
        workers' own shutdown ends what still runs)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        told = -1
        while True:
            in_flight = sum(self.router.tracker.in_flight(w.id) for w in workers)
            if not in_flight:
                return
            if in_flight != told:
                told = in_flight
                say(f"waiting for {in_flight} request(s) in flight to finish")
            if loop.time() >= deadline:
                say(
                    f"{in_flight} request(s) still running after {self.drain_timeout_s:.0f}s: stopping anyway"
                )
                return
            await asyncio.sleep(DRAIN_POLL_S)

    async def worker_stop(self, job: Job, request: WorkerStopJob) -> dict[str, Any]:
        info = self.registry.get_worker(request.worker_id)
        if info is None:
            raise NotFound(
                f"no worker {quote(request.worker_id)} in the registry", code="worker_not_found"
            )
        return await self.stop_worker(
            info, "manual", lambda message: job.emit(JobEvent(type="log", message=message))
        )

    async def stop_worker(
        self, info: WorkerInfo, reason: str, say: Callable[[str], None] = lambda message: None
    ) -> dict[str, Any]:
        """Stop a worker through its hive (its process and llama-server exit, its memory is
        free again), for `reason`: `manual` (someone asked), `idle` (past its keep-alive)."""
        if info.hive_id is None:
            raise BadRequest(
                f"worker {info.id} was not started by a hive; stop it where it runs",
                code="no_hive",
            )
        client = self.clients.get(self._online_hive(info.hive_id))
        self.spawner.stopping(info.id)  # on purpose: not an early death
        exited = False
        try:
            stopped = await self._stopped_by_pid(client, info, say)
            if stopped is None:  # the worker did not say its pid, or that one is not it
                processes = await client.workers()
                pid = next((p.pid for p in processes if p.worker_id == info.id), None)
                if pid is None:
                    exited = True  # no process of it runs: nothing holds its room
                    raise NotFound(
                        f"hive {info.hive_id} runs no process for worker {info.id}",
                        code="worker_not_found",
                    )
                say(f"stopping pid {pid} on {info.hive_id}")
                stopped = await client.stop_worker(pid)
            exited = True
        except HiveError as exc:
            raise hive_failure(exc) from None
        finally:
            self.spawner.stop_done(info.id, exited)
        await give_back_helpers(info, self.hives.get, self._give_back)  # a split worker's helpers
        self.on_unloaded(info, reason)
        return {
            "worker_id": info.id,
            "pid": stopped.pid,
            "hive_id": info.hive_id,
            "freed_bytes": stopped.memory_bytes,
        }

    @staticmethod
    async def _stopped_by_pid(
        client: HiveClient, info: WorkerInfo, say: Callable[[str], None]
    ) -> WorkerStopped | None:
        """Stop the worker by the pid its heartbeats carry, the hive checking that the process
        is still that worker; None if they carry none or it is not (then the hive's list says)."""
        if info.pid is None:
            return None
        say(f"stopping pid {info.pid} on {info.hive_id}")
        try:
            return await client.stop_worker(info.pid, info.id)
        except HiveError as exc:
            if exc.code != "not_a_worker":
                raise
            return None

    async def _give_back(self, hive: HiveView, key: str) -> object:
        return await self.clients.get(hive).stop_rpc_server(key)

    def helpers_released(self, info: WorkerInfo) -> asyncio.Task[list[str]] | None:
        """A split worker went offline or away: its helpers' RPC servers stop now (they would
        stop by themselves once its connections close, which a cut cable may not do soon)."""
        if not info.parts:
            return None
        task = asyncio.create_task(give_back_helpers(info, self.hives.get, self._give_back))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def model_download(self, job: Job, request: ModelDownloadJob) -> dict[str, Any]:
        hive = self._one_hive(request.hive_id)
        client = self.clients.get(hive)
        try:
            created = await client.start_download(request.model)
            try:
                async for event in client.job_events(created.job_id):
                    if event.type == "done":
                        return {**(event.result or {}), "hive_id": hive.id}
                    if event.type == "error":
                        raise BadGateway(event.message, code=event.code or "download_failed")
                    job.emit(event)
            except asyncio.CancelledError:
                with anyio.CancelScope(shield=True):
                    await client.cancel_job(created.job_id)
                raise
        except HiveError as exc:
            raise hive_failure(exc) from None
        raise BadGateway(f"download job on {hive.id} ended without a result")

    async def model_list(self, job: Job, request: ModelListJob) -> dict[str, Any]:
        hives = [self._online_hive(request.hive_id)] if request.hive_id else self.hives.online()
        models: list[dict[str, Any]] = []
        for hive in hives:
            try:
                found = await self.clients.get(hive).models()
            except HiveError as exc:
                raise hive_failure(exc) from None
            models += [{**m.model_dump(), "hive_id": hive.id} for m in found]
        return {"models": models}

    async def model_delete(self, job: Job, request: ModelDeleteJob) -> dict[str, Any]:
        hive = self._one_hive(request.hive_id, request.model)
        try:
            deleted = await self.clients.get(hive).delete_model(request.model)
        except HiveError as exc:
            raise hive_failure(exc) from None
        return {**deleted.model_dump(), "hive_id": hive.id}
