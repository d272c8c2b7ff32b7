"""The hive's app factory: builds its state, routes and background tasks from settings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import httpx
import pynvml
from fastapi import FastAPI

from rbee import __version__
from rbee.clients.base import dead_peer_transport
from rbee.common.clock import Clock, monotonic
from rbee.common.gate import install_gate
from rbee.common.jobs import Jobs
from rbee.common.loops import LoopErrors, supervise
from rbee.common.metrics import metrics_router
from rbee.common.serve import daemon_app
from rbee.common.tokens import auth_headers
from rbee.hive.access import HIVE_ACCESS
from rbee.hive.api import jobs as jobs_api
from rbee.hive.api import models as models_api
from rbee.hive.api import rpc as rpc_api
from rbee.hive.api import system as system_api
from rbee.hive.api import workers as workers_api
from rbee.hive.catalog import Catalog
from rbee.hive.devices import DeviceProbe
from rbee.hive.downloads import Downloader
from rbee.hive.heartbeat import heartbeat_loop
from rbee.hive.metrics import HiveMetrics
from rbee.hive.settings import HiveSettings
from rbee.hive.state import HiveState, get_state
from rbee.hive.supervisor import Supervisor

__all__ = ["create_app", "get_state"]


def create_app(
    settings: HiveSettings,
    *,
    queen_transport: httpx.AsyncBaseTransport | None = None,
    hub_transport: httpx.AsyncBaseTransport | None = None,
    hf_endpoint: str | None = None,
    nvml: ModuleType | Any = pynvml,
    llama_server: str | None = None,
    clock: Clock = monotonic,
) -> FastAPI:
    """`hf_endpoint` None means huggingface_hub's own choice: `HF_ENDPOINT`, else the Hub.
    `nvml` and `llama_server` (the engine binary asked for its GPU backend) find the devices;
    tests pass fakes."""
    queen = httpx.AsyncClient(
        base_url=settings.queen_url,
        headers=auth_headers(settings.token),
        transport=queen_transport or dead_peer_transport(),
        timeout=10.0,
    )
    local = httpx.AsyncClient(timeout=5.0)  # the hive's own look at the workers it starts
    hub = httpx.AsyncClient(
        transport=hub_transport, timeout=httpx.Timeout(30.0, connect=10.0), trust_env=True
    )
    catalog = Catalog(settings.models_dir)
    state = HiveState(
        settings=settings,
        catalog=catalog,
        devices=DeviceProbe(nvml, llama_server),
        supervisor=Supervisor(settings, catalog, local, clock=clock),
        downloader=Downloader(catalog, hub, endpoint=hf_endpoint, clock=clock),
        jobs=Jobs(clock=clock),
    )

    metrics = HiveMetrics(state)
    loop_errors = LoopErrors(metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(state.devices.open)
        await asyncio.to_thread(catalog.prepare)  # joins bundled models: seconds, once
        await rpc_api.servers(app).sweep()  # RPC servers an earlier run left that nobody uses
        await asyncio.to_thread(state.supervisor.standby.sweep)  # flags of workers now gone
        state.supervisor.standby.start()
        beat = asyncio.create_task(
            supervise("hive-heartbeat", lambda: heartbeat_loop(state, queen), loop_errors),
            name="hive-heartbeat",
        )
        try:
            yield
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            await state.jobs.close()
            await asyncio.to_thread(state.supervisor.standby.close)  # none outlives the hive
            state.supervisor.reap()
            state.devices.close()
            for client in (queen, local, hub):
                await client.aclose()

    app = daemon_app("rbee-hive", settings, lifespan)
    app.state.hive = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__, "hive_id": settings.hive_id}

    for module in (system_api, workers_api, models_api, jobs_api, rpc_api):
        app.include_router(module.router)
    # Listing processes takes a while: collected in a thread, off the event loop.
    app.include_router(metrics_router(metrics.registry, in_thread=True))
    install_gate(app, HIVE_ACCESS, token=settings.token, allowed_hosts=settings.allowed_host)
    return app
