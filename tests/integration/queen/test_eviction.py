"""Eviction on an in-process queen: a model that fits nowhere takes the room of the least
recently used idle worker; busy and pinned workers are never evicted; a loaded model serves
its queue before it is swapped out, and the swap wait keeps the other model from starving.

The hive is played by `rbee_testing.fake_hive`: a device with a memory limit, heartbeats
as a real hive sends them, loopback workers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rbee_testing.fake_hive import NEED, FakeHiveCluster, Gate, drain
from rbee_testing.fake_hive import open_cluster as open_any


async def open_cluster(fits: int, **settings: Any) -> FakeHiveCluster:
    """A hive with room for `fits` workers of any of the models a, b and c."""
    return await open_any(fits, models=("a", "b", "c"), **settings)


@pytest.fixture
async def one() -> AsyncIterator[FakeHiveCluster]:
    """Room for one worker; the swap wait is long, so busy workers are never drained."""
    c = await open_cluster(1, swap_max_wait=3600, queue_timeout=1)
    yield c
    await c.aclose()


async def test_the_least_recently_used_idle_worker_makes_room_for_a_new_model() -> None:
    cluster = await open_cluster(2)
    try:
        assert (await cluster.chat("a")).status_code == 200
        cluster.clock.advance(10)
        assert (await cluster.chat("b")).status_code == 200
        cluster.clock.advance(10)
        assert (await cluster.chat("a")).status_code == 200  # a is used last: b is the LRU
        cluster.clock.advance(10)
        async with cluster.state.bus.subscribe() as events:
            assert (await cluster.chat("c")).status_code == 200
            unloads = [d for e, d in drain(events) if e == "model" and d["change"] == "unloaded"]
        assert cluster.spawned == ["a", "b", "c"]
        assert cluster.stops == ["w2-b"], "only the least recently used worker goes"
        assert unloads == [
            {
                "change": "unloaded",
                "model": "b",
                "worker_id": "w2-b",
                "hive_id": "h1",
                "reason": "evicted",
            }
        ]
        metrics = await cluster.metrics()
        assert 'rbee_model_unloads_total{model="b",reason="evicted"} 1.0' in metrics
        assert "rbee_model_swaps_total 1.0" in metrics
        # a still serves without a new start.
        assert (await cluster.chat("a")).status_code == 200
        assert len(cluster.spawns) == 3
    finally:
        await cluster.aclose()


async def test_a_busy_worker_is_never_evicted_the_request_waits_then_gets_503(
    one: FakeHiveCluster,
) -> None:
    assert (await one.chat("a")).status_code == 200
    gate = Gate()
    one.workers[one.worker_of("a")] = gate
    generating = asyncio.create_task(one.chat("a"))
    await asyncio.wait_for(gate.started.wait(), 10)
    one.clock.advance(10)
    began = time.monotonic()
    refused = await one.chat("b")
    waited = time.monotonic() - began
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert error["needed_bytes"] == NEED
    assert error["largest_free_bytes"] < NEED
    assert int(refused.headers["Retry-After"]) >= 1
    assert waited >= 0.9, "it waited for a worker to go idle, within the queue timeout"
    assert one.stops == []
    gate.release.set()
    assert (await generating).status_code == 200
    # Nothing waits for room any more: a keeps serving, with no new start.
    assert (await one.chat("a")).status_code == 200
    assert one.stops == []
    assert one.spawned == ["a"]
    assert "rbee_model_swaps_total 0.0" in await one.metrics()


async def test_a_request_waiting_for_room_gets_it_when_the_busy_worker_goes_idle() -> None:
    cluster = await open_cluster(1, swap_max_wait=3600, queue_timeout=30)
    try:
        assert (await cluster.chat("a")).status_code == 200
        gate = Gate()
        cluster.workers[cluster.worker_of("a")] = gate
        generating = asyncio.create_task(cluster.chat("a"))
        await asyncio.wait_for(gate.started.wait(), 10)
        cluster.clock.advance(10)
        waiting = asyncio.create_task(cluster.chat("b"))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        assert cluster.stops == [], "a request in flight is never cut off"
        gate.release.set()
        assert (await generating).status_code == 200
        assert (await waiting).status_code == 200
        assert cluster.log == ["answer a", "answer a", "stop w1-a", "answer b"]
    finally:
        await cluster.aclose()


async def test_a_pinned_worker_is_never_evicted(one: FakeHiveCluster) -> None:
    job = {"operation": "worker_spawn", "model": "a"}
    created = await one.client.post("/v1/jobs", json=job)
    assert created.status_code == 201, created.text
    events = (await one.client.get(created.json()["sse_url"])).text
    assert '"type":"done"' in events.replace(" ", ""), events
    one.clock.advance(3600)
    job = {"operation": "worker_spawn", "model": "b"}
    created = await one.client.post("/v1/jobs", json=job)
    events = (await one.client.get(created.json()["sse_url"])).text
    error = json.loads(next(line[5:] for line in events.splitlines() if '"error"' in line))
    assert error["code"] == "insufficient_memory"
    assert error["details"]["needed_bytes"] == NEED, "a program can read the numbers"
    assert error["details"]["largest_free_bytes"] < NEED
    refused = await one.chat("b")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "insufficient_memory"
    assert one.stops == []
    assert (await one.chat("a")).status_code == 200


async def test_a_model_bigger_than_the_device_is_refused_at_once() -> None:
    cluster = await open_cluster(0, queue_timeout=30)  # the limit is half a worker
    try:
        began = time.monotonic()
        refused = await cluster.chat("a")
        assert refused.status_code == 503
        assert refused.json()["error"]["needed_bytes"] == NEED
        assert "Retry-After" not in refused.headers
        assert time.monotonic() - began < 10, "no wait for room that can never come"
    finally:
        await cluster.aclose()


async def test_the_loaded_model_serves_its_queue_before_it_is_swapped_out() -> None:
    cluster = await open_cluster(1, swap_max_wait=3600, queue_timeout=30)
    try:
        assert (await cluster.chat("a")).status_code == 200
        gate = Gate()
        cluster.workers[cluster.worker_of("a")] = gate
        first = asyncio.create_task(cluster.chat("a"))
        await asyncio.wait_for(gate.started.wait(), 10)
        queued = asyncio.create_task(cluster.chat("a"))  # waits in a's queue (1 slot)
        await asyncio.sleep(0.3)
        cluster.clock.advance(10)
        for_b = asyncio.create_task(cluster.chat("b"))
        await asyncio.sleep(0.5)
        gate.release.set()
        for task in (first, queued, for_b):
            assert (await task).status_code == 200
        # Both of a's requests before a is swapped out, then b: one swap, not a thrash.
        assert cluster.log == ["answer a", "answer a", "answer a", "stop w1-a", "answer b"]
        assert gate.count == 2
        assert "rbee_model_swaps_total 1.0" in await cluster.metrics()
    finally:
        await cluster.aclose()


async def test_requests_that_come_after_the_other_model_asked_wait_for_their_turn() -> None:
    cluster = await open_cluster(1, swap_max_wait=3600, queue_timeout=30)
    try:
        assert (await cluster.chat("a")).status_code == 200
        gate = Gate()
        cluster.workers[cluster.worker_of("a")] = gate
        generating = asyncio.create_task(cluster.chat("a"))
        await asyncio.wait_for(gate.started.wait(), 10)
        cluster.clock.advance(10)
        async with cluster.state.bus.subscribe() as events:
            for_b = asyncio.create_task(cluster.chat("b"))
            await asyncio.sleep(0.5)
            cluster.clock.advance(1)
            late_a = asyncio.create_task(cluster.chat("a"))  # after b asked
            await asyncio.sleep(0.5)
            assert cluster.stops == [], "a request in flight is never cut off"
            gate.release.set()
            assert (await generating).status_code == 200, "it completes in full"
            assert (await for_b).status_code == 200
            unloads = [d for e, d in drain(events) if e == "model" and d["change"] == "unloaded"]
        # The late request for a did not keep a loaded: b got its turn as a's answer ended.
        assert cluster.log[:4] == ["answer a", "answer a", "stop w1-a", "answer b"]
        assert gate.count == 1, "a draining worker takes no new request"
        assert [u["reason"] for u in unloads] == ["evicted"]
        # a's late request waits for its turn: b goes idle, a comes back in b's place.
        cluster.clock.advance(10)
        assert (await late_a).status_code == 200
        assert cluster.spawned == ["a", "b", "a"]
        assert "rbee_model_swaps_total 2.0" in await cluster.metrics()
    finally:
        await cluster.aclose()


async def test_the_swap_wait_keeps_the_other_model_from_starving() -> None:
    cluster = await open_cluster(1, swap_max_wait=1, queue_timeout=30)
    try:
        assert (await cluster.chat("a")).status_code == 200
        gate = Gate()
        cluster.workers[cluster.worker_of("a")] = gate
        generating = asyncio.create_task(cluster.chat("a"))
        await asyncio.wait_for(gate.started.wait(), 10)
        queued_a = asyncio.create_task(cluster.chat("a"))  # waits in a's queue (1 slot)
        await asyncio.sleep(0.3)
        cluster.clock.advance(10)
        for_b = asyncio.create_task(cluster.chat("b"))
        await asyncio.sleep(2.0)  # past the swap wait: a drains despite its queue
        assert cluster.stops == [], "its request in flight is never cut off"
        gate.release.set()
        assert (await generating).status_code == 200, "it completes in full"
        assert (await for_b).status_code == 200
        assert cluster.log[:4] == ["answer a", "answer a", "stop w1-a", "answer b"]
        assert gate.count == 1, "the queued request did not go to the draining worker"
        cluster.clock.advance(10)
        assert (await queued_a).status_code == 200
        assert cluster.spawned == ["a", "b", "a"]
    finally:
        await cluster.aclose()


async def test_a_worker_that_served_the_request_it_was_loaded_for_may_go_at_once() -> None:
    cluster = await open_cluster(1, queue_timeout=3)
    try:
        assert (await cluster.chat("a")).status_code == 200
        # No time passes on the queen's clock: a has served its request, so it is no longer
        # handed over to the requests it was loaded for, and b need not wait.
        assert (await cluster.chat("b")).status_code == 200
        assert cluster.stops == ["w1-a"]
    finally:
        await cluster.aclose()


async def test_a_model_is_never_evicted_below_its_min_replicas() -> None:
    cluster = await open_cluster(1, queue_timeout=1, model_min_replicas={"a": 1})
    try:
        assert (await cluster.chat("a")).status_code == 200
        cluster.clock.advance(3600)
        refused = await cluster.chat("b")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "insufficient_memory"
        assert cluster.stops == []
    finally:
        await cluster.aclose()


async def test_room_a_stopped_worker_held_is_free_for_the_next_load_at_once() -> None:
    """A worker listed by one hive heartbeat and stopped before the queen next placed anything
    kept its room promised until the promise lapsed (a swap bench stalled 90 s per try)."""
    cluster = await open_cluster(1, queue_timeout=5)
    try:
        for _ in range(2):
            assert (await cluster.chat("a")).status_code == 200
            cluster.clock.advance(10)
            assert (await cluster.chat("b")).status_code == 200
            for worker in (await cluster.client.get("/v1/workers")).json()["workers"]:
                job = {"operation": "worker_stop", "worker_id": worker["id"]}
                created = await cluster.client.post("/v1/jobs", json=job)
                await cluster.client.get(created.json()["sse_url"])
            cluster.clock.advance(10)
        assert cluster.spawned == ["a", "b", "a", "b"]
    finally:
        await cluster.aclose()


async def test_the_memory_a_stopped_worker_held_is_free_before_the_hive_heartbeats() -> None:
    """The hive's stop says what the worker held: the model waiting for that room loads at
    once, not a hive heartbeat later (a swap would wait for one), and nothing is double-booked
    (the fake hive asserts it at each spawn)."""
    cluster = await open_cluster(1, queue_timeout=5)
    cluster.beat_after_stop = False
    try:
        assert (await cluster.chat("a")).status_code == 200
        cluster.clock.advance(10)
        answer = await asyncio.wait_for(cluster.chat("b"), 3)
        assert answer.status_code == 200, answer.text
        assert cluster.spawned == ["a", "b"]
        assert cluster.stops == ["w1-a"]
        # Counted once: with the hive's figures now showing the room, nothing more is free.
        cluster.clock.advance(10)
        assert (await cluster.chat("c")).status_code == 200
        assert cluster.spawned == ["a", "b", "c"]
    finally:
        await cluster.aclose()


async def test_a_worker_the_hive_has_not_reported_yet_keeps_its_room_until_it_stops() -> None:
    """Evicted before its hive's heartbeat listed it, a worker's room stays promised until its
    stop is done: the hive's figures, read before it started, show the room free already, and
    the next model must not start beside it (the fake hive asserts that at each spawn)."""
    cluster = await open_cluster(1, queue_timeout=5)
    cluster.beat_after_spawn = False
    cluster.stop_takes_s = 0.3  # the queen looks for room several times meanwhile
    try:
        assert (await cluster.chat("a")).status_code == 200
        cluster.clock.advance(10)
        answer = await cluster.chat("b")
        assert answer.status_code == 200, answer.text
        assert cluster.spawned == ["a", "b"]
        assert cluster.stops == ["w1-a"]
    finally:
        await cluster.aclose()


async def test_a_new_worker_with_an_evicted_ones_id_can_be_evicted_in_turn() -> None:
    """A hive gives a new worker the id of one it stopped (the port is free again): the room
    the old one gave back was counted as still coming, so nothing was evicted for the next
    model until that count lapsed (90 s per swap)."""
    cluster = await open_cluster(1, queue_timeout=5)
    cluster.one_port = True
    try:
        for _ in range(2):
            r = await cluster.chat("a")
            assert r.status_code == 200, (r.text, cluster.spawned, cluster.stops)
            cluster.clock.advance(10)
            r = await cluster.chat("b")
            assert r.status_code == 200, (r.text, cluster.spawned, cluster.stops)
            cluster.clock.advance(10)
        assert cluster.spawned == ["a", "b", "a", "b"]
        assert cluster.stops == ["h1-8080"] * 3
    finally:
        await cluster.aclose()


async def test_requests_that_waited_out_a_cold_start_keep_their_place() -> None:
    """Requests keep their place by when they came to the queen, not by when their model's
    worker was ready: those that waited out a cold start are served before the other model,
    which asked while it loaded, gets the memory (they counted as newer than its wait, and
    the two models swapped once per request)."""
    cluster = await open_cluster(1, queue_timeout=30)
    cluster.loading = asyncio.Event()
    try:
        for_a = [asyncio.create_task(cluster.chat("a")) for _ in range(3)]
        await asyncio.sleep(0.3)  # a's start is under way, held by its hive
        for_b = [asyncio.create_task(cluster.chat("b")) for _ in range(3)]
        await asyncio.sleep(0.3)  # b waits for the memory a's start took
        cluster.clock.advance(5)
        cluster.loading.set()  # a loads after 5 s
        answers = await asyncio.gather(*for_a, *for_b)
        assert [r.status_code for r in answers] == [200] * 6
        assert cluster.log == ["answer a"] * 3 + ["stop w1-a"] + ["answer b"] * 3
    finally:
        await cluster.aclose()


async def test_requests_a_model_was_loaded_for_are_served_before_it_is_swapped_out() -> None:
    """Requests for two models that come in turns while the first one loads: the model loaded
    serves all of its requests that came before it was ready, even those that came after the
    other model began to wait, then the other model gets the memory: one swap, where taking
    them strictly in order of arrival swapped once per request."""
    cluster = await open_cluster(1, swap_max_wait=3600, queue_timeout=30)
    cluster.loading = asyncio.Event()
    try:
        asked = []
        for _ in range(3):
            for model in ("a", "b"):
                asked.append(asyncio.create_task(cluster.chat(model)))
                await asyncio.sleep(0.1)
                cluster.clock.advance(0.1)
        await asyncio.sleep(0.3)  # a's start is under way, held by its hive; b waits for room
        cluster.clock.advance(5)
        cluster.loading.set()  # a loads after 5 s
        answers = await asyncio.gather(*asked)
        assert [r.status_code for r in answers] == [200] * 6
        assert cluster.log == ["answer a"] * 3 + ["stop w1-a"] + ["answer b"] * 3
        assert "rbee_model_swaps_total 1.0" in await cluster.metrics()
    finally:
        await cluster.aclose()
