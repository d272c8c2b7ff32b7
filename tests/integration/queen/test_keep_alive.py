"""Keep-alive on an in-process queen with a fake clock: workers started on demand unload once
idle past their keep-alive (through the hive's stop), explicit ones stay. The hive is played
by an injected transport that records spawns and stops; workers are small loopback servers."""

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


async def answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json={"object": "chat.completion", "model": body["model"]})


class KeepAliveCluster:
    def __init__(self, **settings: Any) -> None:
        self.clock = FakeClock()
        self.workers: dict[str, Handler] = {}
        self.servers = WorkerServers(self.workers.get)
        self.spawns: list[dict[str, Any]] = []
        self.stops: list[str] = []
        self.pids: dict[int, tuple[str, str]] = {}  # pid: (worker id, model)
        self.app = create_app(
            QueenSettings.model_validate(
                {"heartbeat_timeout": 10**6, "spawn_timeout": 5, **settings}
            ),
            clock=self.clock,
            transport=httpx.MockTransport(self.hive),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://127.0.0.1:9",
            timeout=10,
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
            worker_id = f"spawned-{len(self.spawns)}"
            pid = 100 + len(self.spawns)
            self.pids[pid] = (worker_id, spec["model"])
            self.workers.setdefault(worker_id, answer)
            # As a real worker does: it reports the keep-alive the hive gave it.
            await self.heartbeat(worker_id, spec["model"], keep_alive_s=spec.get("keep_alive_s"))
            url = f"http://{worker_id}:8080"
            return httpx.Response(
                201, json={"worker_id": worker_id, "pid": pid, "port": 8080, "url": url}
            )
        if path == "/v1/workers" and request.method == "GET":
            processes = [
                {
                    "pid": pid,
                    "worker_id": w,
                    "model": m,
                    "port": 1,
                    "uptime_s": 1,
                    "memory_bytes": 1,
                }
                for pid, (w, m) in self.pids.items()
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

    async def spawn_job(self, **fields: Any) -> dict[str, Any]:
        job = {"operation": "worker_spawn", "model": "cold", **fields}
        created = await self.client.post("/v1/jobs", json=job)
        assert created.status_code == 201, created.text
        events = (await self.client.get(created.json()["sse_url"])).text
        assert '"type":"done"' in events.replace(" ", ""), events
        return job

    async def idle_for(self, seconds: float) -> list[str]:
        """Let `seconds` pass on the queen's clock, then run one keep-alive check."""
        self.clock.advance(seconds)
        return await self.state.idle.unload_expired()

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text

    async def model(self, model: str = "cold") -> dict[str, Any]:
        data = (await self.client.get("/v1/models")).json()["data"]
        entry: dict[str, Any] = next(m["rbee"] for m in data if m["id"] == model)
        return entry

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.state.aclose()
        await self.servers.aclose()


async def open_cluster(**settings: Any) -> KeepAliveCluster:
    cluster = KeepAliveCluster(**settings)
    beat = hive_beat(["cold", "other"])
    (await cluster.client.post("/v1/hive-heartbeat", json=beat)).raise_for_status()
    return cluster


@pytest.fixture
async def cluster() -> AsyncIterator[KeepAliveCluster]:
    c = await open_cluster()
    yield c
    await c.aclose()


async def test_a_worker_started_on_demand_unloads_after_its_keep_alive(
    cluster: KeepAliveCluster,
) -> None:
    assert (await cluster.chat()).status_code == 200
    assert cluster.spawns[0]["keep_alive_s"] == 300.0  # the queen's default, 5m
    assert await cluster.idle_for(299) == []
    assert (await cluster.model())["keep_alive_left_s"] == 1.0
    async with cluster.state.bus.subscribe() as events:
        assert await cluster.idle_for(2) == ["spawned-1"]
        unloads = [d for e, d in drain(events) if e == "model" and d["change"] == "unloaded"]
    assert cluster.stops == ["spawned-1"]
    assert unloads == [
        {
            "change": "unloaded",
            "model": "cold",
            "worker_id": "spawned-1",
            "hive_id": "h1",
            "reason": "idle",
        }
    ]
    metrics = await cluster.metrics()
    assert 'rbee_model_loads_total{model="cold",reason="demand"} 1.0' in metrics
    assert 'rbee_model_unloads_total{model="cold",reason="idle"} 1.0' in metrics
    assert 'rbee_model_load_seconds_count{model="cold"} 1.0' in metrics
    assert (await cluster.model())["state"] == "available"
    # The next request loads it again.
    assert (await cluster.chat()).status_code == 200
    assert len(cluster.spawns) == 2


def drain(events: asyncio.Queue[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    while not events.empty():
        found.append(events.get_nowait())
    return found


async def test_the_keep_alive_clock_restarts_when_a_request_ends(
    cluster: KeepAliveCluster,
) -> None:
    assert (await cluster.chat()).status_code == 200
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["spawned-1"] = slow
    in_flight = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(started.wait(), 10)
    assert await cluster.idle_for(3600) == [], "a worker with a request in flight stays"
    assert (await cluster.model())["last_used_s_ago"] == 0.0
    release.set()
    assert (await in_flight).status_code == 200
    assert await cluster.idle_for(299) == []
    assert await cluster.idle_for(1) == ["spawned-1"]


async def test_an_explicitly_started_worker_is_pinned_unless_given_a_keep_alive(
    cluster: KeepAliveCluster,
) -> None:
    await cluster.spawn_job()
    assert cluster.spawns[0].get("keep_alive_s") is None
    assert await cluster.idle_for(10 * 24 * 3600) == []
    assert (await cluster.model())["pinned"] is True
    # A client cannot unload a worker its operator pinned.
    assert (await cluster.chat(keep_alive=0)).status_code == 200
    assert await cluster.idle_for(1) == []
    await cluster.spawn_job(model="other", keep_alive="10m")
    assert cluster.spawns[1]["keep_alive_s"] == 600.0
    assert await cluster.idle_for(601) == ["spawned-2"]
    assert cluster.stops == ["spawned-2"]
    assert 'rbee_model_loads_total{model="cold",reason="manual"} 1.0' in await cluster.metrics()


async def test_a_request_keep_alive_sets_its_worker_keep_alive(cluster: KeepAliveCluster) -> None:
    assert (await cluster.chat(keep_alive=0)).status_code == 200
    assert await cluster.idle_for(0) == ["spawned-1"], "0 unloads as soon as it is idle"
    assert (await cluster.chat(model="other", keep_alive="-1")).status_code == 200
    assert await cluster.idle_for(10 * 24 * 3600) == [], "-1 keeps it"
    assert (await cluster.chat(model="other", keep_alive="90s")).status_code == 200
    assert await cluster.idle_for(91) == ["spawned-2"]


async def test_a_bad_keep_alive_is_a_400_naming_the_field_and_changes_nothing(
    cluster: KeepAliveCluster,
) -> None:
    response = await cluster.chat(keep_alive="banana")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "keep_alive"
    assert "banana" in error["message"]
    assert cluster.spawns == []
    bad_job = {"operation": "worker_spawn", "model": "cold", "keep_alive": "banana"}
    assert (await cluster.client.post("/v1/jobs", json=bad_job)).status_code == 400


async def test_a_model_keep_alive_from_the_cluster_file_applies_to_its_workers() -> None:
    cluster = await open_cluster(keep_alive="1m", model_keep_alive={"other": "30m"})
    try:
        assert (await cluster.chat()).status_code == 200
        assert (await cluster.chat(model="other")).status_code == 200
        assert [s["keep_alive_s"] for s in cluster.spawns] == [60.0, 1800.0]
        assert await cluster.idle_for(61) == ["spawned-1"]
        assert await cluster.idle_for(1800) == ["spawned-2"]
    finally:
        await cluster.aclose()
