"""The queen's /metrics and discovery in-process: figures move by exactly what was done."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.metrics import UNKNOWN_MODEL
from rbee.queen.settings import QueenSettings
from rbee_testing.metrics import Samples, has, parse_samples, value
from rbee_testing.worker_servers import Handler, WorkerServers, worker_beat


async def stream_body() -> AsyncIterator[bytes]:
    for i in range(3):
        yield f'data: {{"n": {i}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


async def worker(request: httpx.Request) -> httpx.Response:
    if request.url.host == "dead":
        raise httpx.ConnectError("connection refused", request=request)
    body = json.loads(request.content)
    if request.url.host == "strict":
        return httpx.Response(400, json={"error": {"message": "no"}})
    if body.get("stream"):
        return httpx.Response(
            200, content=stream_body(), headers={"content-type": "text/event-stream"}
        )
    return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]})


class Queen:
    def __init__(self, handler: Handler = worker, **settings: Any) -> None:
        self.app = create_app(
            QueenSettings.model_validate({"cooldown": 30, **settings}),
            transport=httpx.MockTransport(handler),
        )
        self.servers = WorkerServers(lambda name: handler)  # workers on loopback ports
        self.token = settings.get("token")
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://127.0.0.1:7999",
            headers=headers,
        )

    async def heartbeat(self, worker_id: str, model: str = "m", **extra: Any) -> None:
        body = worker_beat(worker_id, await self.servers.port(worker_id), model, **extra)
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()

    async def hive_heartbeat(self, hive_id: str = "h1", url: str = "http://10.0.0.5:7835") -> None:
        body = {"hive": {"id": hive_id, "url": url, "version": "1"}}
        (await self.client.post("/v1/hive-heartbeat", json=body)).raise_for_status()

    async def chat(self, model: str = "m", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post("/v1/chat/completions", json=body)

    async def scrape(self) -> Samples:
        response = await self.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return parse_samples(response.text)


@pytest.fixture
async def queen() -> AsyncIterator[Queen]:
    q = Queen()
    yield q
    await q.client.aclose()
    await q.app.state.queen.aclose()
    await q.servers.aclose()


async def test_requests_count_by_model_worker_and_code(queen: Queen) -> None:
    await queen.heartbeat("w1")
    await queen.heartbeat("strict", model="picky")
    before = await queen.scrape()
    assert value(before, "rbee_requests_total") == 0
    for _ in range(3):
        assert (await queen.chat()).status_code == 200
    assert (await queen.chat(stream=True)).status_code == 200
    assert (await queen.chat(model="picky")).status_code == 400
    assert (await queen.chat(model="nobody-serves-this")).status_code == 404
    after = await queen.scrape()
    assert value(after, "rbee_requests_total", model="m", worker="w1", code="200") == 4
    assert value(after, "rbee_requests_total", model="picky", worker="strict", code="400") == 1
    assert value(after, "rbee_requests_total", model=UNKNOWN_MODEL, code="404") == 1
    assert value(after, "rbee_request_duration_seconds_count", model="m") == 4
    # Only streamed answers have a first token apart from the whole answer.
    assert value(after, "rbee_time_to_first_token_seconds_count", model="m") == 1
    assert value(after, "rbee_queue_wait_seconds_count", model="m") == 4
    assert value(after, "rbee_request_duration_seconds_sum", model="m") > 0


async def test_made_up_model_names_do_not_grow_the_metrics(queen: Queen) -> None:
    """Anyone allowed to infer can send any `model`; the figures must not grow with the names."""
    await queen.heartbeat("w1")
    assert (await queen.chat()).status_code == 200
    assert (await queen.chat(model="warm-up-name")).status_code == 404
    before = (await queen.client.get("/metrics")).content
    for _ in range(2000):
        assert (await queen.chat(model=secrets.token_hex(16))).status_code == 404
    after = (await queen.client.get("/metrics")).content
    # The counts grow by digits, not by series.
    assert len(after) - len(before) < 200, (len(before), len(after))
    samples = parse_samples(after.decode())
    assert value(samples, "rbee_requests_total", model=UNKNOWN_MODEL, code="404") == 2001
    assert value(samples, "rbee_requests_total", model="m", code="200") == 1


async def test_a_huge_model_name_is_quoted_short(queen: Queen) -> None:
    name = "x" * (1 << 20)
    response = await queen.chat(model=name)
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert len(response.content) < 2000, "the error quotes a bit of the name, not all of it"
    assert f"'{'x' * 200}'… (1,048,576 characters)" in message
    assert len((await queen.client.get("/metrics")).content) < 100_000


async def test_failover_counts_once_per_failed_worker(queen: Queen) -> None:
    await queen.heartbeat("dead")
    await queen.heartbeat("alive")
    for i in range(2):  # two conversations: not kept on one worker by the prefix policy
        response = await queen.chat(messages=[{"role": "user", "content": f"question {i}"}])
        assert response.headers["x-rbee-worker-id"] == "alive"
    samples = await queen.scrape()
    assert value(samples, "rbee_failovers_total", model="m") == 1  # dead is benched after one
    assert value(samples, "rbee_requests_total", worker="alive", code="200") == 2


async def test_gauges_follow_the_registry(queen: Queen) -> None:
    await queen.heartbeat("w1", slots=2)
    await queen.heartbeat("w2", status="starting")
    await queen.hive_heartbeat()
    for _ in range(5):
        await queen.heartbeat("w1", slots=2)
    samples = await queen.scrape()
    assert value(samples, "rbee_workers", status="ready") == 1
    assert value(samples, "rbee_workers", status="starting") == 1
    assert value(samples, "rbee_workers", status="busy") == 0
    assert value(samples, "rbee_hives_online") == 1
    assert value(samples, "rbee_heartbeats_total", kind="worker") == 7
    assert value(samples, "rbee_heartbeats_total", kind="hive") == 1
    assert value(samples, "rbee_slots", worker="w1", model="m") == 2
    assert value(samples, "rbee_in_flight", worker="w1", model="m") == 0
    assert value(samples, "rbee_queue_waiting", model="m") == 0
    assert has(samples, "process_cpu_seconds_total"), "the usual process figures are there too"


async def test_in_flight_and_waiting_while_a_request_runs() -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json={"choices": []})

    queen = Queen(slow, queue_size=4, queue_timeout=10)
    try:
        await queen.heartbeat("w1")
        running = [asyncio.create_task(queen.chat()) for _ in range(3)]
        await asyncio.sleep(0.1)
        samples = await queen.scrape()
        assert value(samples, "rbee_in_flight", worker="w1") == 1
        assert value(samples, "rbee_queue_waiting", model="m") == 2
        release.set()
        assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200, 200]
        samples = await queen.scrape()
        assert value(samples, "rbee_in_flight", worker="w1") == 0
        assert value(samples, "rbee_queue_waiting", model="m") == 0
        assert value(samples, "rbee_queue_wait_seconds_count", model="m") == 3
    finally:
        await queen.client.aclose()
        await queen.app.state.queen.aclose()
        await queen.servers.aclose()


async def test_discovery_lists_queen_hives_and_workers(queen: Queen) -> None:
    await queen.hive_heartbeat("h1", "http://10.0.0.5:7835")
    await queen.heartbeat("w1", model="m", hive_id="h1", device="cpu:0")
    response = await queen.client.get("/v1/metrics/targets")
    assert response.status_code == 200
    groups = response.json()
    assert groups[0] == {"targets": ["127.0.0.1:7999"], "labels": {"job": "rbee-queen"}}
    assert groups[1] == {"targets": ["10.0.0.5:7835"], "labels": {"job": "rbee-hive", "hive": "h1"}}
    assert groups[2]["targets"] == [f"127.0.0.1:{await queen.servers.port('w1')}"]
    assert groups[2]["labels"]["job"] == "rbee-worker"
    assert groups[2]["labels"]["hive"] == "h1"
    assert groups[2]["labels"]["model"] == "m"


async def test_metrics_and_discovery_need_the_token_when_one_is_set() -> None:
    queen = Queen(token="s3cret")
    try:
        anonymous = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=queen.app), base_url="http://127.0.0.1:7999"
        )
        async with anonymous:
            for path in ("/metrics", "/v1/metrics/targets"):
                assert (await anonymous.get(path)).status_code == 401
        samples = await queen.scrape()
        assert has(samples, "rbee_requests_total") or has(samples, "rbee_workers")
        assert (await queen.client.get("/v1/metrics/targets")).status_code == 200
    finally:
        await queen.client.aclose()
        await queen.app.state.queen.aclose()
        await queen.servers.aclose()
