"""A heartbeat from a machine whose clock is wrong must not break the queen (issue 22, item 4).

`9999-12-31T23:59:59-05:00` is a valid time that UTC cannot hold: it used to make listing the
hives raise, which ended the offline-watch and cleanup loops for good, made `/v1/hives`,
`/v1/models` and requests for unknown models answer 500, and left dead workers listed forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee_testing.clock import FakeClock

BAD_TIME = "9999-12-31T23:59:59-05:00"
MODEL = "acme/tiny-GGUF:tiny.Q4_0.gguf"


def hive_beat(timestamp: str) -> dict[str, Any]:
    hive = {"id": "h1", "url": "http://127.0.0.1:7835", "version": "1"}
    return {"hive": hive, "models": [MODEL], "timestamp": timestamp}


def worker_beat(timestamp: str) -> dict[str, Any]:
    worker = {"id": "w1", "model_id": MODEL, "port": 8080, "status": "ready", "version": "1"}
    return {"worker": worker, "timestamp": timestamp}


@pytest.fixture
async def running_queen() -> AsyncIterator[tuple[httpx.AsyncClient, FakeClock]]:
    """A queen with its background loops running (cleanup every 50 ms of real time; staleness
    judged by the fake clock)."""
    clock = FakeClock()
    settings = QueenSettings.model_validate({"heartbeat_timeout": 90, "cleanup_interval": 0.05})
    app = create_app(settings, clock=clock)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
        ) as client,
    ):
        yield client, clock


async def wait_until_gone(client: httpx.AsyncClient, worker_id: str) -> None:
    async with asyncio.timeout(30):
        while True:
            workers = (await client.get("/v1/workers")).json()["workers"]
            if worker_id not in {w["id"] for w in workers}:
                return
            await asyncio.sleep(0.05)


async def test_a_hive_heartbeat_from_year_9999_leaves_the_queen_working(
    running_queen: tuple[httpx.AsyncClient, FakeClock],
) -> None:
    client, clock = running_queen
    assert (await client.post("/v1/hive-heartbeat", json=hive_beat(BAD_TIME))).status_code == 200
    assert (
        await client.post("/v1/worker-heartbeat", json=worker_beat(BAD_TIME))
    ).status_code == 200
    # Let the loops run over the bad record a few times.
    await asyncio.sleep(0.3)

    hives = await client.get("/v1/hives")
    assert hives.status_code == 200
    [hive] = hives.json()["hives"]
    assert hive["online"] is True
    # The impossible time was replaced by the queen's own.
    shown = datetime.fromisoformat(hive["timestamp"])
    assert abs(shown - datetime.now(UTC)) < timedelta(minutes=1)
    models = await client.get("/v1/models")
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [MODEL]
    unknown = await client.post(
        "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert unknown.status_code == 404

    # The cleanup loop still runs: a worker silent past the timeout is removed.
    clock.advance(91)
    await wait_until_gone(client, "w1")
    metrics = (await client.get("/metrics")).text
    assert 'rbee_background_errors_total{loop="cleanup"} 0.0' in metrics
    assert 'rbee_background_errors_total{loop="offline"} 0.0' in metrics


async def test_a_heartbeat_far_in_the_future_shows_the_queens_time_a_skewed_one_its_own(
    running_queen: tuple[httpx.AsyncClient, FakeClock],
) -> None:
    client, _ = running_queen
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await client.post("/v1/worker-heartbeat", json=worker_beat(ahead))).status_code == 200
    [worker] = (await client.get("/v1/workers")).json()["workers"]
    assert worker["online"] is True
    shown = datetime.fromisoformat(worker["timestamp"])
    assert abs(shown - datetime.now(UTC)) < timedelta(minutes=1)
    # A clock that is merely wrong (behind) is shown as sent, in UTC; the hive stays online.
    behind = "2020-01-01T00:00:00-05:00"
    assert (await client.post("/v1/hive-heartbeat", json=hive_beat(behind))).status_code == 200
    [hive] = (await client.get("/v1/hives")).json()["hives"]
    assert hive["online"] is True
    assert hive["timestamp"] == "2020-01-01T05:00:00Z"
