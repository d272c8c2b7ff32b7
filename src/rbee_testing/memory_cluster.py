"""A queen in process with a hive played by an injected transport, for eviction tests.

The hive keeps the books of one device with a memory limit (what its workers hold is taken
from the limit, given back when they stop) and heartbeats as a real hive does after each
spawn and stop; the workers are loopback servers (`worker_servers`). Every spawn checks that
the device's memory was never booked twice."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from rbee.common.model_memory import estimate_memory
from rbee.contracts.hives import ModelFootprint
from rbee.contracts.workers import DEFAULT_CTX_SIZE
from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee_testing.clock import FakeClock
from rbee_testing.worker_servers import Handler, WorkerServers, worker_beat

GIB = 1 << 30
FOOTPRINT = ModelFootprint(
    weights_bytes=GIB, layers=16, kv_bytes_per_token=16 << 10, vocab_size=32000, head_count=16
)
NEED = estimate_memory(FOOTPRINT, ctx_size=DEFAULT_CTX_SIZE, slots=1).total
MODELS = ("a", "b", "c")


async def answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json={"object": "chat.completion", "model": body["model"]})


class Gate:
    """A worker answer held until released, to keep a request in flight."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.count = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        self.started.set()
        await self.release.wait()
        return await answer(request)


class MemoryCluster:
    def __init__(self, fits: int, **settings: Any) -> None:
        self.clock = FakeClock()
        self.limit = fits * NEED + NEED // 2  # room for `fits` workers, not one more
        self.workers: dict[str, Handler] = {}
        self.servers = WorkerServers(self.route)
        self.running: dict[int, tuple[str, str]] = {}  # pid: (worker id, model)
        self.spawns: list[str] = []  # models, in order
        self.stops: list[str] = []  # worker ids, in order
        # What happened, in order: "stop <id>", and "answer <model>" as a worker answers (the
        # client may resume only after the queen has already stopped that worker).
        self.log: list[str] = []
        self.one_port = False  # True: every worker gets the id of the hive's one port
        self.loading: asyncio.Event | None = None  # set: the hive's starts go on
        self.beat_after_stop = True  # False: a hive whose heartbeat after a stop is slow
        self.beat_after_spawn = True  # False: one whose heartbeat after a spawn is
        self.stop_takes_s = 0.0  # how long a worker takes to exit once asked to stop
        self.app = create_app(
            QueenSettings.model_validate(
                {"heartbeat_timeout": 10**6, "spawn_timeout": 10, "queue_timeout": 10, **settings}
            ),
            clock=self.clock,
            transport=httpx.MockTransport(self.hive),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://127.0.0.1:9",
            timeout=60,
        )

    def route(self, worker_id: str) -> Handler | None:
        handler = self.workers.get(worker_id)
        if handler is None:
            return None
        found = handler

        async def logged(request: httpx.Request) -> httpx.Response:
            response = await found(request)
            if response.status_code == 200:
                self.log.append(f"answer {json.loads(request.content)['model']}")
            return response

        return logged

    @property
    def state(self) -> QueenState:
        state: QueenState = self.app.state.queen
        return state

    async def hive_heartbeat(self) -> None:
        free = max(0, self.limit - NEED * len(self.running))
        cpu = {
            "id": "cpu:0",
            "kind": "cpu",
            "name": "cpu",
            "memory_total_bytes": 64 * GIB,
            "memory_free_bytes": free,
            "memory_limit_bytes": self.limit,
            "rbee_used_bytes": NEED * len(self.running),
        }
        beat = {
            "hive": {"id": "h1", "url": "http://hive.test:7835", "version": "1"},
            "devices": [cpu],
            "models": list(MODELS),
            "footprints": {m: FOOTPRINT.model_dump() for m in MODELS},
            "workers": [w for w, _ in self.running.values()],
        }
        (await self.client.post("/v1/hive-heartbeat", json=beat)).raise_for_status()

    async def hive(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/workers/spawn":
            spec = json.loads(request.content)
            model = spec["model"]
            assert self.limit - NEED * len(self.running) >= NEED, "the hive was double-booked"
            if self.loading is not None:
                await self.loading.wait()
            self.spawns.append(model)
            worker_id = "h1-8080" if self.one_port else f"w{len(self.spawns)}-{model}"
            pid = 100 + len(self.spawns)
            self.running[pid] = (worker_id, model)
            self.workers.setdefault(worker_id, answer)
            await self.heartbeat(worker_id, model, keep_alive_s=spec.get("keep_alive_s"))
            if self.beat_after_spawn:
                await self.hive_heartbeat()
            url = f"http://{worker_id}:8080"
            return httpx.Response(
                201, json={"worker_id": worker_id, "pid": pid, "port": 8080, "url": url}
            )
        if path == "/v1/workers" and request.method == "GET":
            processes = [
                {"pid": p, "worker_id": w, "model": m, "port": 1, "uptime_s": 1, "memory_bytes": 1}
                for p, (w, m) in self.running.items()
            ]
            return httpx.Response(200, json={"workers": processes})
        if path.endswith("/stop"):
            pid = int(path.split("/")[-2])
            worker_id, model = self.running[pid]
            # As a worker does: its last heartbeat says it stopped, then it exits.
            await self.heartbeat(worker_id, model, "stopped")
            await asyncio.sleep(self.stop_takes_s)
            del self.running[pid]
            self.stops.append(worker_id)
            self.log.append(f"stop {worker_id}")
            if self.beat_after_stop:
                await self.hive_heartbeat()
            stopped = {"pid": pid, "worker_id": worker_id, "signal": "SIGTERM"}
            return httpx.Response(200, json={**stopped, "memory_bytes": NEED})
        raise AssertionError(f"unexpected hive call {request.method} {path}")

    async def heartbeat(
        self, worker_id: str, model: str, status: str = "ready", **extra: Any
    ) -> None:
        port = await self.servers.port(worker_id)
        body = worker_beat(worker_id, port, model, status, hive_id="h1", **extra)
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()

    async def chat(self, model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return await self.client.post("/v1/chat/completions", json=body)

    def worker_of(self, model: str) -> str:
        return next(w for w, m in self.running.values() if m == model)

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.state.aclose()
        await self.servers.aclose()


async def open_cluster(fits: int, **settings: Any) -> MemoryCluster:
    cluster = MemoryCluster(fits, **settings)
    await cluster.hive_heartbeat()
    return cluster


def drain(events: asyncio.Queue[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    while not events.empty():
        found.append(events.get_nowait())
    return found
