"""A split worker that goes away takes its helpers' RPC servers with it: the queen stops them
on the helper hives as soon as the worker says it stopped (issue 24). Real queen in process;
the hives are an injected transport that records what it is asked."""

from __future__ import annotations

import asyncio

import httpx

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee_testing.clock import FakeClock
from rbee_testing.worker_servers import hive_beat, worker_beat

PARTS = [
    {"hive_id": "a", "device": "cpu:0", "bytes": 100},
    {"hive_id": "b", "device": "cpu:0", "bytes": 80},
    {"hive_id": "c", "device": "cpu:0", "bytes": 60},
]


async def test_a_split_worker_that_stops_has_its_helpers_rpc_servers_stopped() -> None:
    stops: list[str] = []

    async def hive(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/rpc-servers/") and request.method == "POST":
            key = request.url.path.split("/")[3]
            stops.append(f"{request.url.host} {key}")
            return httpx.Response(200, json={"pid": 7, "rpc_id": key, "signal": "SIGTERM"})
        return httpx.Response(404, json={"error": {"message": "no", "type": "not_found"}})

    app = create_app(
        QueenSettings.model_validate({"heartbeat_timeout": 10**6}),
        clock=FakeClock(),
        transport=httpx.MockTransport(hive),
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
        ) as client,
    ):
        for hive_id in ("a", "b", "c"):
            beat = hive_beat(["m"], hive_id)
            beat["hive"]["url"] = f"http://{hive_id}.test:7835"
            (await client.post("/v1/hive-heartbeat", json=beat)).raise_for_status()
        split = worker_beat("a-split-1", 9, hive_id="a", parts=PARTS)
        (await client.post("/v1/worker-heartbeat", json=split)).raise_for_status()
        assert stops == []
        stopped = worker_beat("a-split-1", 9, status="stopped", hive_id="a", parts=PARTS)
        (await client.post("/v1/worker-heartbeat", json=stopped)).raise_for_status()
        for _ in range(100):
            if len(stops) == 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(stops) == ["b.test a-split-1@b", "c.test a-split-1@c"]
