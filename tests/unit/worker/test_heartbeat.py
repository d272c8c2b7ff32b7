"""Heartbeats: at once on a change, every interval otherwise, and back soon after the queen is."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.worker.heartbeat import Heartbeater


class FakeQueen:
    """Records heartbeats; `up = False` makes it refuse connections like a stopped process."""

    def __init__(self) -> None:
        self.up = True
        self.received: list[tuple[WorkerHeartbeat, str | None]] = []
        self.attempts = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        assert request.url.path == "/v1/worker-heartbeat"
        beat = WorkerHeartbeat.model_validate(json.loads(request.content))
        self.received.append((beat, request.headers.get("authorization")))
        return httpx.Response(200, json={"status": "ok", "message": ""})

    @property
    def statuses(self) -> list[WorkerStatus]:
        return [beat.worker.status for beat, _ in self.received]


class Status:
    def __init__(self) -> None:
        self.value = WorkerStatus.STARTING

    def info(self) -> WorkerInfo:
        return WorkerInfo(id="w1", model_id="m", port=8080, status=self.value, version="1")


@pytest.fixture
def queen() -> FakeQueen:
    return FakeQueen()


@pytest.fixture
async def client(queen: FakeQueen) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(queen.handle)) as client:
        yield client


async def wait_for(condition: object, within_s: float = 2.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(within_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def test_status_change_is_sent_at_once_not_at_the_next_interval(
    queen: FakeQueen, client: httpx.AsyncClient
) -> None:
    status = Status()
    beater = Heartbeater(client, "http://queen", status.info, interval_s=60, token="s3cret")
    task = asyncio.create_task(beater.run())
    await wait_for(lambda: queen.statuses == [WorkerStatus.STARTING])
    status.value = WorkerStatus.READY
    beater.notify()
    await wait_for(lambda: queen.statuses[-1] is WorkerStatus.READY, within_s=1.0)
    assert all(auth == "Bearer s3cret" for _, auth in queen.received)
    beater.close()
    await task


async def test_one_heartbeat_per_interval_between_changes(
    queen: FakeQueen, client: httpx.AsyncClient
) -> None:
    status = Status()
    beater = Heartbeater(client, "http://queen", status.info, interval_s=0.1)
    task = asyncio.create_task(beater.run())
    await asyncio.sleep(0.55)
    beater.close()
    await task
    assert 4 <= len(queen.received) <= 8


async def test_queen_down_at_start_then_up_registers_within_one_interval(
    queen: FakeQueen, client: httpx.AsyncClient
) -> None:
    queen.up = False
    status = Status()
    beater = Heartbeater(client, "http://queen", status.info, interval_s=0.4, first_retry_s=0.01)
    task = asyncio.create_task(beater.run())
    # Long enough for the backoff to reach its cap: the interval.
    await asyncio.sleep(1.5)
    assert queen.attempts >= 4
    assert not beater.connected
    loop = asyncio.get_running_loop()
    queen.up = True
    back_at = loop.time()
    await wait_for(lambda: bool(queen.received), within_s=0.4 + 0.2)
    assert loop.time() - back_at <= 0.4 + 0.1
    assert beater.connected
    beater.close()
    await task


async def test_backoff_grows_but_never_past_the_interval(
    queen: FakeQueen, client: httpx.AsyncClient
) -> None:
    queen.up = False
    beater = Heartbeater(client, "http://queen", Status().info, interval_s=0.2, first_retry_s=0.01)
    task = asyncio.create_task(beater.run())
    await asyncio.sleep(1.0)
    beater.close()
    await task
    # Doubling from 10 ms: 10+20+40+80+160 ms, then every 200 ms — about 8 tries, not 100.
    assert 5 <= queen.attempts <= 12


async def test_a_refusing_queen_is_retried_not_fatal() -> None:
    calls: list[int] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(500)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as refusing:
        beater = Heartbeater(
            refusing, "http://queen", Status().info, interval_s=0.05, first_retry_s=0.01
        )
        assert not await beater.send(Status().info())
        task = asyncio.create_task(beater.run())
        await asyncio.sleep(0.2)
        beater.close()
        await task
    assert len(calls) >= 3
