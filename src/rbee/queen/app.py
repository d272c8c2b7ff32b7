"""The queen's app factory: builds its state, routes and background tasks from settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from fastapi import FastAPI

from rbee import __version__
from rbee.common.clock import Clock, monotonic
from rbee.common.gate import install_gate
from rbee.common.loops import supervise
from rbee.common.metrics import metrics_router
from rbee.common.serve import daemon_app
from rbee.queen.access import QUEEN_ACCESS
from rbee.queen.api import dashboard as dashboard_api
from rbee.queen.api import hives as hives_api
from rbee.queen.api import jobs as jobs_api
from rbee.queen.api import keys as keys_api
from rbee.queen.api import observe as observe_api
from rbee.queen.api import ollama as ollama_api
from rbee.queen.api import openai as openai_api
from rbee.queen.api import workers as workers_api
from rbee.queen.history import history_loop
from rbee.queen.idle import idle_loop
from rbee.queen.live import stats_loop
from rbee.queen.registry import ChangeKind, RegistryChange
from rbee.queen.replicas_loop import replica_loop, replica_watch
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState, build_state

log = logging.getLogger("rbee.queen")
USAGE_FLUSH_S = 5.0  # API key usage counts reach the database this often (and at shutdown)


class OfflineWatch:
    """Announces workers and hives that went quiet, as soon as they pass the timeout. The
    cleanup sweeps it too just before removing stale workers, so a worker is always announced
    offline before it is announced removed."""

    def __init__(self, state: QueenState) -> None:
        self.state = state
        self.online: set[str] = set()
        self.hives_online: set[str] = set()

    def sweep(self) -> None:
        self.sweep_workers()
        self.sweep_hives()

    def sweep_hives(self) -> None:
        state = self.state
        hives_now = {h.id for h in state.hives.online()}
        for hive_id in self.hives_online - hives_now:
            log.warning("hive %s went offline", hive_id)
            hive = state.hives.get(hive_id)
            view = hive.model_dump(mode="json") if hive else None
            state.bus.publish("hive", {"change": "offline", "hive_id": hive_id, "hive": view})
        self.hives_online = hives_now

    def sweep_workers(self) -> None:
        state = self.state
        now = state.registry.now()
        records = state.registry.records()
        current = {r.info.id for r in records if state.registry.is_fresh(r, now)}
        for record in records:
            if record.info.id in self.online and record.info.id not in current:
                workers_api.registry_changed(state, RegistryChange(ChangeKind.OFFLINE, record.info))
        self.online = current


async def cleanup_loop(state: QueenState, watch: OfflineWatch) -> None:
    """Every cleanup interval: remove workers not heard from within the timeout, and forget
    hives silent for longer than their grace period."""
    while True:
        await asyncio.sleep(state.settings.cleanup_interval)
        # Workers first, apart from the hives: whatever goes wrong with a hive's record,
        # dead workers are still removed.
        watch.sweep_workers()
        for info in state.registry.remove_stale_workers():
            log.info("removed stale worker %s", info.id)
            workers_api.registry_changed(state, RegistryChange(ChangeKind.REMOVED, info))
        watch.sweep_hives()
        for hive_id in state.hives.remove_forgotten():
            log.info("forgot hive %s (silent for %.0fs)", hive_id, state.hives.forget_after_s)
            state.bus.publish("hive", {"change": "removed", "hive_id": hive_id, "hive": None})


async def offline_watch(watch: OfflineWatch, interval_s: float) -> None:
    while True:
        watch.sweep()
        await asyncio.sleep(interval_s)


async def flush_usage_loop(state: QueenState) -> None:
    """API key counts are gathered in memory per request and written here, in batches."""
    while True:
        await asyncio.sleep(USAGE_FLUSH_S)
        try:
            await state.keys.flush()  # counts taken on the loop, written in a thread
        except Exception:  # a full disk must not stop the queen or this loop
            log.exception("could not write API key usage counts (retrying)")


def create_app(
    settings: QueenSettings,
    *,
    clock: Clock = monotonic,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    state = build_state(settings, clock, transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watch = OfflineWatch(state)
        replicas = replica_watch(state)
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "cleanup": lambda: cleanup_loop(state, watch),
            "offline": lambda: offline_watch(watch, min(1.0, settings.heartbeat_timeout / 4)),
            "stats": lambda: stats_loop(state, settings.stats_interval),
            "key-usage": lambda: flush_usage_loop(state),
            "keep-alive": lambda: idle_loop(state.idle),
            "replicas": lambda: replica_loop(replicas),
            "history": lambda: history_loop(state, app.state.history),
        }
        tasks = [
            asyncio.create_task(supervise(name, run, state.loop_errors), name=name)
            for name, run in loops.items()
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.aclose()
            await state.keys.aclose()

    app = daemon_app("queen-rbee", settings, lifespan)
    app.state.queen = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    for module in (workers_api, hives_api, openai_api, jobs_api, keys_api):
        app.include_router(module.router)
    # First in line: the router tries routes in order, and these carry nearly all the traffic.
    app.router.routes[:0] = openai_api.proxy_routes()
    app.router.routes.extend(ollama_api.routes())  # Ollama's API, routed like chat
    # Prometheus sends the cluster token as its bearer token when one is set.
    app.include_router(observe_api.router)
    app.include_router(metrics_router(state.metrics.registry))
    # The page is public and holds no data; it asks for the token its data calls need.
    dashboard_api.install(app)
    install_gate(
        app,
        QUEEN_ACCESS,
        token=settings.token,
        allowed_hosts=settings.allowed_host,
        keys=state.keys,
    )
    return app
