"""Loading and unloading models by hand (the `model_load` and `model_unload` jobs behind `rbee
load` and `rbee unload`), and loads made visible: `/v1/models` says `loading`, and a streaming
request waiting for a cold start hears `: loading MODEL` comments before the worker's stream.

The queen is real and in process; the hive is an injected transport that records spawns and
stops (a spawn may be held back to play a slow load); workers are small loopback servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee_testing.clock import FakeClock
from rbee_testing.worker_servers import Handler, WorkerServers, hive_beat, worker_beat


async def sse_chunks(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield f'data: {{"n": {i}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


async def answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        return httpx.Response(
            200, content=sse_chunks(3), headers={"content-type": "text/event-stream"}
        )
    return httpx.Response(200, json={"object": "chat.completion", "model": body["model"]})


class LoadCluster:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.workers: dict[str, Handler] = {}
        self.servers = WorkerServers(self.workers.get)
        self.spawns: list[dict[str, Any]] = []
        self.stops: list[str] = []
        self.pids: dict[int, tuple[str, str]] = {}  # pid: (worker id, model)
        # Set: spawns wait for it (a slow load). `spawn_error`: the next spawn fails.
        self.spawn_gate: asyncio.Event | None = None
        self.spawn_error: str | None = None
        self.app = create_app(
            QueenSettings.model_validate({"heartbeat_timeout": 10**6, "spawn_timeout": 30}),
            clock=self.clock,
            transport=httpx.MockTransport(self.hive),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://127.0.0.1:9",
            timeout=30,
        )

    @property
    def state(self) -> QueenState:
        state: QueenState = self.app.state.queen
        return state

    async def hive(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/workers/spawn":
            spec = json.loads(request.content)
            self.spawns.append(spec)
            if self.spawn_gate is not None:
                await self.spawn_gate.wait()
            if self.spawn_error is not None:
                body = {"error": {"message": self.spawn_error, "type": "server_error"}}
                return httpx.Response(500, json=body)
            worker_id = f"spawned-{len(self.spawns)}"
            pid = 100 + len(self.spawns)
            self.pids[pid] = (worker_id, spec["model"])
            self.workers.setdefault(worker_id, answer)
            await self.heartbeat(worker_id, spec["model"], keep_alive_s=spec.get("keep_alive_s"))
            url = f"http://{worker_id}:8080"
            return httpx.Response(
                201, json={"worker_id": worker_id, "pid": pid, "port": 8080, "url": url}
            )
        if path == "/v1/workers" and request.method == "GET":
            processes = [
                {"pid": p, "worker_id": w, "model": m, "port": 1, "uptime_s": 1, "memory_bytes": 1}
                for p, (w, m) in self.pids.items()
            ]
            return httpx.Response(200, json={"workers": processes})
        if path.endswith("/stop"):
            pid = int(path.split("/")[-2])
            worker_id, model = self.pids.pop(pid)
            self.stops.append(worker_id)
            await self.heartbeat(worker_id, model, "stopped")
            return httpx.Response(
                200, json={"pid": pid, "worker_id": worker_id, "signal": "SIGTERM"}
            )
        raise AssertionError(f"unexpected hive call {request.method} {path}")

    async def heartbeat(
        self, worker_id: str, model: str, status: str = "ready", **extra: Any
    ) -> None:
        port = await self.servers.port(worker_id)
        body = worker_beat(worker_id, port, model, status, hive_id="h1", **extra)
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()

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

    async def model(self, model: str = "cold") -> dict[str, Any]:
        data = (await self.client.get("/v1/models")).json()["data"]
        entry: dict[str, Any] = next(m["rbee"] for m in data if m["id"] == model)
        return entry

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.state.aclose()
        await self.servers.aclose()


@pytest.fixture
async def cluster() -> AsyncIterator[LoadCluster]:
    c = LoadCluster()
    beat = hive_beat(["cold", "other"])
    (await c.client.post("/v1/hive-heartbeat", json=beat)).raise_for_status()
    yield c
    await c.aclose()


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    """Poll an async condition until it holds (generous: the machine may be busy)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_load_job_starts_a_pinned_worker_and_counts_a_manual_load(
    cluster: LoadCluster,
) -> None:
    events = await cluster.job(operation="model_load", model="cold")
    assert events[-1]["type"] == "done", events
    assert events[-1]["result"]["worker_id"] == "spawned-1"
    assert any("starting a cold worker on h1" in e["message"] for e in events)
    assert "keep_alive_s" not in cluster.spawns[0]  # pinned, as every start by hand
    assert (await cluster.model())["state"] == "loaded"
    assert (await cluster.model())["pinned"] is True
    assert 'rbee_model_loads_total{model="cold",reason="manual"} 1.0' in await cluster.metrics()
    # With a keep-alive, it unloads once idle that long.
    events = await cluster.job(operation="model_load", model="other", keep_alive="10m")
    assert events[-1]["type"] == "done", events
    assert cluster.spawns[1]["keep_alive_s"] == 600.0


async def test_an_unknown_model_is_404_and_nothing_starts(cluster: LoadCluster) -> None:
    refused = await cluster.client.post(
        "/v1/jobs", json={"operation": "model_load", "model": "banana"}
    )
    assert refused.status_code == 404
    error = refused.json()["error"]
    assert error["code"] == "model_not_found"
    assert "banana" in error["message"]
    assert "cold" in error["message"]
    assert cluster.spawns == []
    not_loaded = await cluster.client.post(
        "/v1/jobs", json={"operation": "model_unload", "model": "cold"}
    )
    assert not_loaded.status_code == 404
    assert not_loaded.json()["error"]["code"] == "model_not_loaded"
    bad = await cluster.client.post(
        "/v1/jobs", json={"operation": "model_load", "model": "cold", "keep_alive": "banana"}
    )
    assert bad.status_code == 400
    assert "keep_alive" in bad.text
    assert cluster.spawns == []
    assert cluster.stops == []


async def test_unload_lets_the_request_in_flight_finish_then_stops_the_worker(
    cluster: LoadCluster,
) -> None:
    assert (await cluster.job(operation="model_load", model="cold"))[-1]["type"] == "done"
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["spawned-1"] = slow
    in_flight = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(started.wait(), 20)
    created = await cluster.client.post(
        "/v1/jobs", json={"operation": "model_unload", "model": "cold"}
    )
    assert created.status_code == 201, created.text
    job = asyncio.create_task(cluster.events(created.json()["sse_url"]))
    await until(lambda: _retiring(cluster, "spawned-1"))
    await asyncio.sleep(0.3)  # the job waits for the request: nothing is stopped meanwhile
    assert cluster.stops == []
    assert not job.done()
    # `rbee status` and the dashboard show it unloading.
    view = (await cluster.client.get("/v1/workers/spawned-1")).json()
    assert view["status"] == "stopping"
    assert view["available"] is False
    # A new request for the model no longer goes to the worker being unloaded: another starts.
    cluster.workers["spawned-2"] = answer
    fresh = await cluster.chat()
    assert fresh.status_code == 200
    assert fresh.headers["x-rbee-worker-id"] == "spawned-2"
    release.set()
    finished = await in_flight
    assert finished.status_code == 200
    assert finished.headers["x-rbee-worker-id"] == "spawned-1"
    events = await asyncio.wait_for(job, 20)
    assert events[-1]["type"] == "done", events
    assert any("waiting for 1 request(s) in flight" in e["message"] for e in events)
    assert cluster.stops == ["spawned-1"]
    assert 'rbee_model_unloads_total{model="cold",reason="manual"} 1.0' in (await cluster.metrics())


async def _retiring(cluster: LoadCluster, worker_id: str) -> bool:
    return cluster.state.router.retiring(worker_id)


async def test_unload_now_cuts_the_request_in_flight_with_a_clear_error(
    cluster: LoadCluster,
) -> None:
    assert (await cluster.job(operation="model_load", model="cold"))[-1]["type"] == "done"
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["spawned-1"] = slow
    in_flight = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(started.wait(), 20)
    events = await cluster.job(operation="model_unload", model="cold", now=True)
    assert events[-1]["type"] == "done", events
    assert cluster.stops == ["spawned-1"]
    cut = await asyncio.wait_for(in_flight, 20)
    release.set()
    assert cut.status_code == 503
    assert cut.json()["error"]["code"] == "worker_stopping"
    assert "unloaded" in cut.json()["error"]["message"]
    assert len(cluster.spawns) == 1  # the cut request did not start the model again
    assert (await cluster.model())["state"] == "available"


async def test_models_say_loading_while_a_request_waits_for_its_model(
    cluster: LoadCluster,
) -> None:
    cluster.spawn_gate = asyncio.Event()
    waiting = asyncio.create_task(cluster.chat())

    async def loading() -> bool:
        return (await cluster.model())["state"] == "loading"

    await until(loading)
    assert (await cluster.model("other"))["state"] == "available"
    cluster.spawn_gate.set()
    assert (await waiting).status_code == 200
    assert (await cluster.model())["state"] == "loaded"


async def test_a_streaming_request_hears_loading_comments_then_the_workers_stream(
    cluster: LoadCluster,
) -> None:
    cluster.state.proxy.loading_comment_s = 0.02
    cluster.spawn_gate = asyncio.Event()

    async def open_later() -> None:
        await until(lambda: _loading_for(cluster, 0.3))
        assert cluster.spawn_gate is not None
        cluster.spawn_gate.set()

    opener = asyncio.create_task(open_later())
    response = await cluster.chat(stream=True)
    await opener
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments
    assert set(comments) == {": loading cold"}
    assert lines[len(comments) :] == [
        'data: {"n": 0}',
        'data: {"n": 1}',
        'data: {"n": 2}',
        "data: [DONE]",
    ]


async def _loading_for(cluster: LoadCluster, seconds: float) -> bool:
    """The model has been loading for at least `seconds` (comments have gone out)."""
    if not cluster.state.spawner.loading:
        return False
    await asyncio.sleep(seconds)
    return True


async def test_a_failed_cold_start_ends_the_stream_with_an_error_event(
    cluster: LoadCluster,
) -> None:
    cluster.state.proxy.loading_comment_s = 0.02
    cluster.spawn_gate = asyncio.Event()
    cluster.spawn_error = "the model file is corrupt"

    async def open_later() -> None:
        await until(lambda: _loading_for(cluster, 0.3))
        assert cluster.spawn_gate is not None
        cluster.spawn_gate.set()

    opener = asyncio.create_task(open_later())
    response = await cluster.chat(stream=True)
    await opener
    assert response.status_code == 200  # the comments went out first
    events = [line for line in response.text.split("\n\n") if line.startswith("data:")]
    assert len(events) == 1
    error = json.loads(events[0][5:])["error"]
    assert "the model file is corrupt" in error["message"]


async def test_a_streaming_request_for_an_unknown_model_keeps_its_404(
    cluster: LoadCluster,
) -> None:
    response = await cluster.chat(model="banana", stream=True)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_the_hive_is_given_a_load_deadline_that_grows_with_the_model(
    cluster: LoadCluster,
) -> None:
    beat = hive_beat(["big"])
    beat["devices"][0].update(memory_total_bytes=64 << 30, memory_free_bytes=64 << 30)
    footprint = {
        "weights_bytes": 4 << 30,
        "layers": 32,
        "kv_bytes_per_token": 0,
        "vocab_size": 0,
        "head_count": 0,
    }
    beat["footprints"] = {"big": footprint}
    (await cluster.client.post("/v1/hive-heartbeat", json=beat)).raise_for_status()
    assert (await cluster.job(operation="model_load", model="big"))[-1]["type"] == "done"
    # --spawn-timeout 30 (the base) + 60 s for each of the 4 GiB the model needs.
    assert cluster.spawns[0]["load_timeout_s"] == pytest.approx(30 + 60 * 4, abs=1)


async def test_a_request_waiting_in_line_when_its_model_is_unloaded_gets_a_new_worker(
    cluster: LoadCluster,
) -> None:
    """Its only worker is busy, then unloaded: the request waiting for it would wait for
    nothing (and end in a 429 at the queue timeout); it starts a worker instead."""
    assert (await cluster.job(operation="model_load", model="cold"))[-1]["type"] == "done"
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["spawned-1"] = slow  # one slot
    in_flight = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(started.wait(), 20)
    waiting = asyncio.create_task(cluster.chat())
    admission = cluster.state.router.admission
    await until(lambda: _is(admission.waiting(("cold", False)) == 1))
    created = await cluster.client.post(
        "/v1/jobs", json={"operation": "model_unload", "model": "cold"}
    )
    assert created.status_code == 201, created.text
    served = await asyncio.wait_for(waiting, 20)
    assert served.status_code == 200, served.text
    assert served.headers["x-rbee-worker-id"] == "spawned-2"
    release.set()
    assert (await in_flight).status_code == 200
    events = await asyncio.wait_for(cluster.events(created.json()["sse_url"]), 20)
    assert events[-1]["type"] == "done", events


async def _is(value: bool) -> bool:
    return value
