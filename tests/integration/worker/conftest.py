"""A worker app in-process with a fake engine; its heartbeats go over real HTTP to a stand-in
queen on a loopback port that records them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from rbee.contracts.workers import WorkerHeartbeat, WorkerStatus
from rbee.worker.app import create_app
from rbee.worker.engines.base import Engine
from rbee.worker.runtime import WorkerRuntime
from rbee.worker.settings import WorkerSettings
from rbee_testing.fake_engine import FakeEngine
from rbee_testing.processes import free_port
from rbee_testing.queen_catcher import QueenCatcher

MODEL = "fake-model"


@dataclass
class Harness:
    app: FastAPI
    client: httpx.AsyncClient
    engines: list[FakeEngine]
    queen: QueenCatcher
    stops: list[int] = field(default_factory=list)
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    async def stop(self) -> None:
        """Run the app's shutdown, as uvicorn does after SIGTERM."""
        await self.stack.aclose()

    @property
    def runtime(self) -> WorkerRuntime:
        runtime: WorkerRuntime = self.app.state.worker
        return runtime

    @property
    def beats(self) -> list[WorkerHeartbeat]:
        return self.queen.beats

    async def first_beat(self, within_s: float = 10.0) -> WorkerHeartbeat:
        """The worker's first heartbeat, once the stand-in queen has it (it is sent in the
        background as the worker starts: on a busy machine, after its first request)."""
        async with asyncio.timeout(within_s):
            while True:
                if self.queen.beats:
                    return self.queen.beats[0]
                await asyncio.sleep(0.01)

    @property
    def auth(self) -> list[str | None]:
        return self.queen.auth

    @property
    def statuses(self) -> list[WorkerStatus]:
        return self.queen.statuses

    async def wait_ready(self, within_s: float = 5.0) -> None:
        async with asyncio.timeout(within_s):
            while True:
                if (await self.client.get("/health")).status_code == 200:
                    return
                await asyncio.sleep(0.01)


def chat_body(content: str = "What is the capital of France?", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def settings_for(**overrides: Any) -> WorkerSettings:
    base = {
        "model": "unused.gguf",
        "model_id": MODEL,
        "port": 18080,
        "queen_url": "http://queen.test",
        "worker_id": "w-test",
        "heartbeat_interval": 30,
        "shutdown_grace": 1.0,
    }
    return WorkerSettings.model_validate({**base, **overrides})


@pytest.fixture
async def make_worker() -> AsyncIterator[Callable[..., Any]]:
    """Build, start (lifespan) and finally stop worker apps: `await make_worker(engine=..., **settings)`."""
    harnesses: list[Harness] = []
    try:

        async def make(
            engine: Callable[[], FakeEngine] | None = None,
            *,
            wait_ready: bool = True,
            engine_host: Any = None,
            **overrides: Any,
        ) -> Harness:
            engines: list[FakeEngine] = []
            stops: list[int] = []
            queen = QueenCatcher()

            def factory() -> Engine:
                built = engine() if engine else FakeEngine()
                engines.append(built)
                return built

            app = create_app(
                settings_for(queen_url=queen.url, **overrides),
                engine_factory=factory,
                engine_host=engine_host,
                stop_process=lambda: stops.append(1),
            )
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9", timeout=10
            )
            harness = Harness(app, client, engines, queen, stops)
            harnesses.append(harness)
            # Entered first, closed last: the queen hears the worker's final `stopped` beat.
            await harness.stack.enter_async_context(queen)
            await harness.stack.enter_async_context(client)
            await harness.stack.enter_async_context(app.router.lifespan_context(app))
            if wait_ready:
                await harness.wait_ready()
            return harness

        yield make
    finally:
        for harness in harnesses:
            await harness.stop()


@pytest.fixture
async def serve_live() -> AsyncIterator[Callable[[FastAPI], Any]]:
    """Serve an app on a real loopback socket in this process (for disconnects and the SDK)."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(app: FastAPI) -> str:
        port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(5):
            while True:  # uvicorn offers no event for "listening"
                if server.started:
                    break
                await asyncio.sleep(0.01)
        servers.append((server, task))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, task in servers:
        server.should_exit = True
        await task
