"""Everything one queen owns, built once by the app factory and reached through `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from fastapi import Request

from rbee.common.clock import Clock
from rbee.common.jobs import Jobs
from rbee.common.loops import LoopErrors
from rbee.common.net import dead_peer_options
from rbee.contracts.hive_api import WorkerStopped
from rbee.contracts.hives import HiveView
from rbee.contracts.workers import WorkerInfo
from rbee.queen.events import EventBus
from rbee.queen.hives import HiveRegistry
from rbee.queen.idle import IdleWatch
from rbee.queen.keys import KeyStore
from rbee.queen.metrics import QueenMetrics
from rbee.queen.operations import HiveClients, Operations
from rbee.queen.proxy import Proxy
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker
from rbee.queen.routing.policies import POLICIES
from rbee.queen.routing.prefixes import Affinity
from rbee.queen.routing.router import Router
from rbee.queen.scheduler.room import Room
from rbee.queen.scheduler.spawner import Spawner
from rbee.queen.scheduler.split_start import Splitter
from rbee.queen.settings import QueenSettings
from rbee.queen.upstream import UpstreamClient


@dataclass
class QueenState:
    settings: QueenSettings
    registry: WorkerRegistry
    hives: HiveRegistry
    bus: EventBus
    router: Router
    spawner: Spawner
    proxy: Proxy
    jobs: Jobs
    operations: Operations
    hive_clients: HiveClients
    upstream: UpstreamClient
    metrics: QueenMetrics
    keys: KeyStore
    loop_errors: LoopErrors
    idle: IdleWatch
    room: Room | None = None  # makes room for models that fit nowhere

    async def aclose(self) -> None:
        if self.room is not None:
            await self.room.aclose()
        await self.jobs.close()
        await self.hive_clients.aclose()
        await self.upstream.aclose()


def build_state(
    settings: QueenSettings,
    clock: Clock,
    transport: httpx.AsyncBaseTransport | None = None,
) -> QueenState:
    """Wire the queen's parts. `transport` replaces the network to hives in tests; proxied
    inference always goes over real sockets (`UpstreamClient`; tests run fake workers on
    loopback ports, see `rbee_testing.worker_servers`)."""
    registry = WorkerRegistry(settings.heartbeat_timeout, clock)
    hives = HiveRegistry(settings.heartbeat_timeout, clock, settings.hive_forget_after)
    bus = EventBus()
    tracker = LoadTracker(settings.cooldown, clock)
    admission = AdmissionQueue(settings.queue_size, settings.queue_timeout, clock)
    affinity = (
        Affinity(settings.prefix_load_margin) if settings.routing_policy == "prefix" else None
    )
    router = Router(
        registry,
        tracker,
        POLICIES[settings.routing_policy],
        admission,
        affinity=affinity,
        policy_name=settings.routing_policy,
    )
    metrics = QueenMetrics(registry, hives, tracker, admission, decisions=router.decisions)
    clients = HiveClients(settings.token, transport, settings.spawn_timeout)

    async def stop_worker(hive: HiveView, pid: int) -> WorkerStopped:
        return await clients.get(hive).stop_worker(pid)

    spawner = Spawner(
        registry,
        hives,
        bus,
        clients.spawn,
        settings.spawn_timeout,
        on_result=metrics.worker_started,
        timeout_per_gib_s=settings.load_timeout_per_gib,
        stop=stop_worker,
        clock=clock,
        on_loaded=metrics.model_loaded,
        keep_alive=lambda model: settings.model_keep_alive.get(model, settings.keep_alive),
        sizing=settings.sizing_of,
    )

    def unloaded(info: WorkerInfo, reason: str) -> None:
        metrics.model_unloaded(info.model_id, reason)
        bus.publish(
            "model",
            {
                "change": "unloaded",
                "model": info.model_id,
                "worker_id": info.id,
                "hive_id": info.hive_id,
                "reason": reason,
            },
        )

    upstream = UpstreamClient(dead_peer_options())
    keys = KeyStore(settings.data_dir)
    proxy = Proxy(
        registry,
        hives,
        router,
        spawner,
        upstream,
        token=settings.token,
        retries=settings.retries,
        metrics=metrics,
        usage=keys.count_tokens,
    )
    operations = Operations(
        registry, hives, spawner, clients, on_unloaded=unloaded, router=router, cut=proxy.cut
    )
    state = QueenState(
        settings=settings,
        registry=registry,
        hives=hives,
        bus=bus,
        router=router,
        spawner=spawner,
        proxy=proxy,
        jobs=Jobs(clock=clock),
        operations=operations,
        hive_clients=clients,
        upstream=upstream,
        metrics=metrics,
        keys=keys,
        loop_errors=LoopErrors(metrics.registry),
        idle=IdleWatch(registry, router, spawner, operations, settings.min_replicas_of),
    )
    room = Room(
        state.idle,
        wait_s=settings.queue_timeout,
        swap_max_wait_s=settings.swap_max_wait,
        on_swap=metrics.model_swapped,
        min_replicas=settings.min_replicas_of,
    )
    spawner.make_room = room.make_room
    splitter = Splitter(
        spawner,
        lend=lambda hive, request: clients.get(hive).start_rpc_server(request),
        give_back=lambda hive, key: clients.get(hive).stop_rpc_server(key),
        across=settings.split_across,
        wait_s=settings.queue_timeout,
    )
    spawner.split = splitter.start
    operations.splitter = splitter  # `rbee load` splits too
    state.room = room
    return state


def get_state(request: Request) -> QueenState:
    state: QueenState = request.app.state.queen
    return state
