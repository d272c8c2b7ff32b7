"""A real queen in process, with its one hive (`h1`) played by an injected transport: for the
queen's tests of starting, unloading, evicting and replicating workers on a fake clock.

The hive spawns, lists and stops workers as a real one does: a spawned worker heartbeats the
queen `ready` before the spawn answers, a stopped one heartbeats `stopped` before the stop
does. Workers are loopback servers (`worker_servers`) that answer with `answer` unless a test
puts another handler in `workers`. Worker `n` of model `m` is `wn-m`.

With `fits`, the hive keeps the books of one CPU with a memory limit that holds `fits` workers
of the models' one footprint (`NEED` each) and not one more: what its workers hold is taken
from the limit and given back when they stop, it heartbeats as a real hive does after each
spawn and stop, and every spawn checks that the device was never booked twice. Without, its
device is small and no footprint is known: placement never counts memory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from rbee.common.model_memory import estimate_memory
from rbee.contracts.hives import ModelFootprint
from rbee.contracts.workers import DEFAULT_CTX_SIZE
from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee_testing.clock import FakeClock
from rbee_testing.worker_servers import Handler, WorkerServers, hive_beat, worker_beat

GIB = 1 << 30
FOOTPRINT = ModelFootprint(
    weights_bytes=GIB, layers=16, kv_bytes_per_token=16 << 10, vocab_size=32000, head_count=16
)
NEED = estimate_memory(FOOTPRINT, ctx_size=DEFAULT_CTX_SIZE, slots=1).total
DEFAULTS = {"heartbeat_timeout": 10**6, "spawn_timeout": 30}


async def _chunks(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield f'data: {{"n": {i}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


async def answer(request: httpx.Request) -> httpx.Response:
    """A worker's answer: a chat completion naming the model, or a stream of three chunks."""
    body = json.loads(request.content)
    if body.get("stream"):
        return httpx.Response(
            200, content=_chunks(3), headers={"content-type": "text/event-stream"}
        )
    return httpx.Response(200, json={"object": "chat.completion", "model": body["model"]})


class Gate:
    """A worker answer held until released, to keep a request in flight; `count` counts the
    requests that reached it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.count = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        self.started.set()
        await self.release.wait()
        return await answer(request)


class FakeHiveCluster:
    def __init__(
        self, fits: int | None = None, models: Sequence[str] = ("cold", "other"), **settings: Any
    ) -> None:
        self.clock = FakeClock()
        self.models = list(models)
        self.limit = None if fits is None else fits * NEED + NEED // 2
        self.workers: dict[str, Handler] = {}
        self.servers = WorkerServers(self.route)
        self.running: dict[int, tuple[str, str]] = {}  # pid: (worker id, model)
        self.spawns: list[dict[str, Any]] = []  # the spawn requests, in order
        self.stops: list[str] = []  # worker ids, in order
        # What happened, in order: "stop <id>", and "answer <model>" as a worker answers (the
        # client may resume only after the queen has already stopped that worker).
        self.log: list[str] = []
        self.one_port = False  # True: every worker gets the id of the hive's one port
        self.loading: asyncio.Event | None = None  # set: spawns wait for it (a slow load)
        self.spawn_error: str | None = None  # set: spawns fail with this message
        self.beat_after_spawn = fits is not None  # False: a hive whose heartbeat after a
        self.beat_after_stop = fits is not None  # spawn (a stop) is slow
        self.stop_takes_s = 0.0  # how long a worker takes to exit once asked to stop
        # How long a worker's model takes to load on the queen's clock: it heartbeats `starting`
        # first, then `ready` once that much time has passed.
        self.load_takes_s = 0.0
        self.app = create_app(
            QueenSettings.model_validate({**DEFAULTS, **settings}),
            clock=self.clock,
            transport=httpx.MockTransport(self.hive),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://127.0.0.1:9",
            timeout=60,
        )

    @property
    def state(self) -> QueenState:
        state: QueenState = self.app.state.queen
        return state

    @property
    def spawned(self) -> list[str]:
        """The models of the spawns, in order."""
        return [spec["model"] for spec in self.spawns]

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

    async def hive_heartbeat(self) -> None:
        beat = hive_beat(self.models)
        beat["workers"] = [w for w, _ in self.running.values()]
        if self.limit is not None:
            held = NEED * len(self.running)
            beat["devices"][0].update(
                memory_total_bytes=64 * GIB,
                memory_free_bytes=max(0, self.limit - held),
                memory_limit_bytes=self.limit,
                rbee_used_bytes=held,
            )
            beat["footprints"] = {m: FOOTPRINT.model_dump() for m in self.models}
        (await self.client.post("/v1/hive-heartbeat", json=beat)).raise_for_status()

    async def hive(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/workers/spawn":
            return await self._spawn(json.loads(request.content))
        if path == "/v1/workers" and request.method == "GET":
            processes = [
                {"pid": p, "worker_id": w, "model": m, "port": 1, "uptime_s": 1, "memory_bytes": 1}
                for p, (w, m) in self.running.items()
            ]
            return httpx.Response(200, json={"workers": processes})
        if path.endswith("/stop"):
            return await self._stop(int(path.split("/")[-2]))
        raise AssertionError(f"unexpected hive call {request.method} {path}")

    async def _spawn(self, spec: dict[str, Any]) -> httpx.Response:
        model = spec["model"]
        if self.limit is not None:
            assert self.limit - NEED * len(self.running) >= NEED, "the hive was double-booked"
        self.spawns.append(spec)
        if self.loading is not None:
            await self.loading.wait()
        if self.spawn_error is not None:
            body = {"error": {"message": self.spawn_error, "type": "server_error"}}
            return httpx.Response(500, json=body)
        worker_id = "h1-8080" if self.one_port else f"w{len(self.spawns)}-{model}"
        pid = 100 + len(self.spawns)
        self.running[pid] = (worker_id, model)
        self.workers.setdefault(worker_id, answer)
        # As a real worker does: it reports the keep-alive the hive gave it.
        keep_alive_s = spec.get("keep_alive_s")
        if self.load_takes_s:
            await self.heartbeat(worker_id, model, "starting", keep_alive_s=keep_alive_s)
            self.clock.advance(self.load_takes_s)
        await self.heartbeat(worker_id, model, keep_alive_s=keep_alive_s)
        if self.beat_after_spawn:
            await self.hive_heartbeat()
        url = f"http://{worker_id}:8080"
        return httpx.Response(
            201, json={"worker_id": worker_id, "pid": pid, "port": 8080, "url": url}
        )

    async def _stop(self, pid: int) -> httpx.Response:
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
        held = {} if self.limit is None else {"memory_bytes": NEED}
        return httpx.Response(200, json={**stopped, **held})

    async def heartbeat(
        self, worker_id: str, model: str, status: str = "ready", **extra: Any
    ) -> None:
        port = await self.servers.port(worker_id)
        body = worker_beat(worker_id, port, model, status, hive_id="h1", **extra)
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()

    def worker_of(self, model: str) -> str:
        return next(w for w, m in self.running.values() if m == model)

    # -- asking the queen ------------------------------------------------------------------

    async def chat(self, model: str = "cold", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post("/v1/chat/completions", json=body)

    async def job(self, **fields: Any) -> list[dict[str, Any]]:
        """Run a job to its end; its events."""
        created = await self.client.post("/v1/jobs", json=fields)
        assert created.status_code == 201, created.text
        return await self.events(created.json()["sse_url"])

    async def events(self, sse_url: str) -> list[dict[str, Any]]:
        text = (await self.client.get(sse_url)).text
        return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]

    async def spawn_job(self, **fields: Any) -> dict[str, Any]:
        """A `worker_spawn` job of `cold` (or as `fields` say), run to its end."""
        job = {"operation": "worker_spawn", "model": "cold", **fields}
        events = await self.job(**job)
        assert events[-1]["type"] == "done", events
        return job

    async def idle_for(self, seconds: float) -> list[str]:
        """Let `seconds` pass on the queen's clock, then run one keep-alive check."""
        self.clock.advance(seconds)
        return await self.state.idle.unload_expired()

    async def model(self, model: str = "cold") -> dict[str, Any]:
        """The `rbee` object of the model in `/v1/models`."""
        data = (await self.client.get("/v1/models")).json()["data"]
        entry: dict[str, Any] = next(m["rbee"] for m in data if m["id"] == model)
        return entry

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.state.aclose()
        await self.servers.aclose()


async def open_cluster(fits: int | None = None, **settings: Any) -> FakeHiveCluster:
    """A cluster whose hive has sent its first heartbeat."""
    cluster = FakeHiveCluster(fits, **settings)
    await cluster.hive_heartbeat()
    return cluster


def drain(events: asyncio.Queue[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The events queued so far."""
    found = []
    while not events.empty():
        found.append(events.get_nowait())
    return found
