"""Keep-alive on an in-process queen with a fake clock: workers started on demand unload once
idle past their keep-alive (through the hive's stop), explicit ones stay. The hive is played
by `rbee_testing.fake_hive`; workers are small loopback servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from rbee_testing.fake_hive import FakeHiveCluster, answer, drain, open_cluster


@pytest.fixture
async def cluster() -> AsyncIterator[FakeHiveCluster]:
    c = await open_cluster()
    yield c
    await c.aclose()


async def test_a_worker_started_on_demand_unloads_after_its_keep_alive(
    cluster: FakeHiveCluster,
) -> None:
    assert (await cluster.chat()).status_code == 200
    assert cluster.spawns[0]["keep_alive_s"] == 300.0  # the queen's default, 5m
    assert await cluster.idle_for(299) == []
    assert (await cluster.model())["keep_alive_left_s"] == 1.0
    async with cluster.state.bus.subscribe() as events:
        assert await cluster.idle_for(2) == ["w1-cold"]
        unloads = [d for e, d in drain(events) if e == "model" and d["change"] == "unloaded"]
    assert cluster.stops == ["w1-cold"]
    assert unloads == [
        {
            "change": "unloaded",
            "model": "cold",
            "worker_id": "w1-cold",
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


async def test_the_keep_alive_clock_starts_once_the_model_is_loaded_not_while_it_loads(
    cluster: FakeHiveCluster,
) -> None:
    """`rbee load` of a model that takes a minute to load, with a keep-alive of 30 s: it stays
    30 s once loaded, not none at all."""
    cluster.load_takes_s = 60
    await cluster.spawn_job(keep_alive="30s")
    assert (await cluster.model())["keep_alive_left_s"] == 30.0
    assert await cluster.idle_for(29) == []
    assert await cluster.idle_for(2) == ["w1-cold"]


async def test_the_keep_alive_clock_restarts_when_a_request_ends(
    cluster: FakeHiveCluster,
) -> None:
    assert (await cluster.chat()).status_code == 200
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["w1-cold"] = slow
    in_flight = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(started.wait(), 10)
    assert await cluster.idle_for(3600) == [], "a worker with a request in flight stays"
    assert (await cluster.model())["last_used_s_ago"] == 0.0
    release.set()
    assert (await in_flight).status_code == 200
    assert await cluster.idle_for(299) == []
    assert await cluster.idle_for(1) == ["w1-cold"]


async def test_an_explicitly_started_worker_is_pinned_unless_given_a_keep_alive(
    cluster: FakeHiveCluster,
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
    assert await cluster.idle_for(601) == ["w2-other"]
    assert cluster.stops == ["w2-other"]
    assert 'rbee_model_loads_total{model="cold",reason="manual"} 1.0' in await cluster.metrics()


async def test_a_request_keep_alive_sets_its_worker_keep_alive(cluster: FakeHiveCluster) -> None:
    assert (await cluster.chat(keep_alive=0)).status_code == 200
    assert await cluster.idle_for(0) == ["w1-cold"], "0 unloads as soon as it is idle"
    assert (await cluster.chat(model="other", keep_alive="-1")).status_code == 200
    assert await cluster.idle_for(10 * 24 * 3600) == [], "-1 keeps it"
    assert (await cluster.chat(model="other", keep_alive="90s")).status_code == 200
    assert await cluster.idle_for(91) == ["w2-other"]


async def test_a_bad_keep_alive_is_a_400_naming_the_field_and_changes_nothing(
    cluster: FakeHiveCluster,
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
        assert await cluster.idle_for(61) == ["w1-cold"]
        assert await cluster.idle_for(1800) == ["w2-other"]
    finally:
        await cluster.aclose()
