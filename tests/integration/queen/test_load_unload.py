"""Loading and unloading models by hand (the `model_load` and `model_unload` jobs behind `rbee
load` and `rbee unload`), and loads made visible: `/v1/models` says `loading`, and a streaming
request waiting for a cold start hears `: loading MODEL` comments before the worker's stream.

The queen is real and in process; the hive is played by `rbee_testing.fake_hive` (a spawn may
be held back to play a slow load); workers are small loopback servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee_testing.fake_hive import FakeHiveCluster, answer, open_cluster
from rbee_testing.worker_servers import hive_beat


@pytest.fixture
async def cluster() -> AsyncIterator[FakeHiveCluster]:
    c = await open_cluster()
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
    cluster: FakeHiveCluster,
) -> None:
    events = await cluster.job(operation="model_load", model="cold")
    assert events[-1]["type"] == "done", events
    assert events[-1]["result"]["worker_id"] == "w1-cold"
    assert any("starting a cold worker on h1" in e["message"] for e in events)
    assert "keep_alive_s" not in cluster.spawns[0]  # pinned, as every start by hand
    assert (await cluster.model())["state"] == "loaded"
    assert (await cluster.model())["pinned"] is True
    assert 'rbee_model_loads_total{model="cold",reason="manual"} 1.0' in await cluster.metrics()
    # With a keep-alive, it unloads once idle that long.
    events = await cluster.job(operation="model_load", model="other", keep_alive="10m")
    assert events[-1]["type"] == "done", events
    assert cluster.spawns[1]["keep_alive_s"] == 600.0


async def test_an_unknown_model_is_404_and_nothing_starts(cluster: FakeHiveCluster) -> None:
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
    cluster: FakeHiveCluster,
) -> None:
    assert (await cluster.job(operation="model_load", model="cold"))[-1]["type"] == "done"
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["w1-cold"] = slow
    in_flight = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(started.wait(), 20)
    created = await cluster.client.post(
        "/v1/jobs", json={"operation": "model_unload", "model": "cold"}
    )
    assert created.status_code == 201, created.text
    job = asyncio.create_task(cluster.events(created.json()["sse_url"]))
    await until(lambda: _retiring(cluster, "w1-cold"))
    await asyncio.sleep(0.3)  # the job waits for the request: nothing is stopped meanwhile
    assert cluster.stops == []
    assert not job.done()
    # `rbee status` and the dashboard show it unloading.
    view = (await cluster.client.get("/v1/workers/w1-cold")).json()
    assert view["status"] == "stopping"
    assert view["available"] is False
    # A new request for the model no longer goes to the worker being unloaded: another starts.
    cluster.workers["w2-cold"] = answer
    fresh = await cluster.chat()
    assert fresh.status_code == 200
    assert fresh.headers["x-rbee-worker-id"] == "w2-cold"
    release.set()
    finished = await in_flight
    assert finished.status_code == 200
    assert finished.headers["x-rbee-worker-id"] == "w1-cold"
    events = await asyncio.wait_for(job, 20)
    assert events[-1]["type"] == "done", events
    assert any("waiting for 1 request(s) in flight" in e["message"] for e in events)
    assert cluster.stops == ["w1-cold"]
    assert 'rbee_model_unloads_total{model="cold",reason="manual"} 1.0' in (await cluster.metrics())


async def _retiring(cluster: FakeHiveCluster, worker_id: str) -> bool:
    return cluster.state.router.retiring(worker_id)


async def test_unload_now_cuts_the_request_in_flight_with_a_clear_error(
    cluster: FakeHiveCluster,
) -> None:
    assert (await cluster.job(operation="model_load", model="cold"))[-1]["type"] == "done"
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["w1-cold"] = slow
    in_flight = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(started.wait(), 20)
    events = await cluster.job(operation="model_unload", model="cold", now=True)
    assert events[-1]["type"] == "done", events
    assert cluster.stops == ["w1-cold"]
    cut = await asyncio.wait_for(in_flight, 20)
    release.set()
    assert cut.status_code == 503
    assert cut.json()["error"]["code"] == "worker_stopping"
    assert "unloaded" in cut.json()["error"]["message"]
    assert len(cluster.spawns) == 1  # the cut request did not start the model again
    assert (await cluster.model())["state"] == "available"


async def test_models_say_loading_while_a_request_waits_for_its_model(
    cluster: FakeHiveCluster,
) -> None:
    cluster.loading = asyncio.Event()
    waiting = asyncio.create_task(cluster.chat())

    async def loading() -> bool:
        return (await cluster.model())["state"] == "loading"

    await until(loading)
    assert (await cluster.model("other"))["state"] == "available"
    cluster.loading.set()
    assert (await waiting).status_code == 200
    assert (await cluster.model())["state"] == "loaded"


async def test_a_streaming_request_hears_loading_comments_then_the_workers_stream(
    cluster: FakeHiveCluster,
) -> None:
    cluster.state.proxy.loading_comment_s = 0.02
    cluster.loading = asyncio.Event()

    async def open_later() -> None:
        await until(lambda: _loading_for(cluster, 0.3))
        assert cluster.loading is not None
        cluster.loading.set()

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


async def _loading_for(cluster: FakeHiveCluster, seconds: float) -> bool:
    """The model has been loading for at least `seconds` (comments have gone out)."""
    if not cluster.state.spawner.loading:
        return False
    await asyncio.sleep(seconds)
    return True


async def test_a_failed_cold_start_ends_the_stream_with_an_error_event(
    cluster: FakeHiveCluster,
) -> None:
    cluster.state.proxy.loading_comment_s = 0.02
    cluster.loading = asyncio.Event()
    cluster.spawn_error = "the model file is corrupt"

    async def open_later() -> None:
        await until(lambda: _loading_for(cluster, 0.3))
        assert cluster.loading is not None
        cluster.loading.set()

    opener = asyncio.create_task(open_later())
    response = await cluster.chat(stream=True)
    await opener
    assert response.status_code == 200  # the comments went out first
    events = [line for line in response.text.split("\n\n") if line.startswith("data:")]
    assert len(events) == 1
    error = json.loads(events[0][5:])["error"]
    assert "the model file is corrupt" in error["message"]


async def test_a_streaming_request_for_an_unknown_model_keeps_its_404(
    cluster: FakeHiveCluster,
) -> None:
    response = await cluster.chat(model="banana", stream=True)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_the_hive_is_given_a_load_deadline_that_grows_with_the_model(
    cluster: FakeHiveCluster,
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
    cluster: FakeHiveCluster,
) -> None:
    """Its only worker is busy, then unloaded: the request waiting for it would wait for
    nothing (and end in a 429 at the queue timeout); it starts a worker instead."""
    assert (await cluster.job(operation="model_load", model="cold"))[-1]["type"] == "done"
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return await answer(request)

    cluster.workers["w1-cold"] = slow  # one slot
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
    assert served.headers["x-rbee-worker-id"] == "w2-cold"
    release.set()
    assert (await in_flight).status_code == 200
    events = await asyncio.wait_for(cluster.events(created.json()["sse_url"]), 20)
    assert events[-1]["type"] == "done", events


async def _is(value: bool) -> bool:
    return value
