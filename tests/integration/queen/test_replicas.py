"""Replicas follow the load, on an in-process queen with a fake clock: a 1-slot model with 8
concurrent clients gets another worker once its requests have waited past the threshold, at
most max_replicas, and its idle replicas unload again down to min_replicas. The hive is played
by `rbee_testing.fake_hive`; workers are loopback servers that hold every request until the test
lets them answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from rbee.queen.replicas_loop import ReplicaWatch, replica_watch
from rbee_testing.fake_hive import FakeHiveCluster, answer, open_cluster


class Held:
    """Worker answers held until `release`; `started` counts the requests that reached one."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.started += 1
        await self.release.wait()
        return await answer(request)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
async def cluster() -> AsyncIterator[FakeHiveCluster]:
    c = await open_cluster(
        keep_alive="5m", model_max_replicas={"cold": 2}, model_min_replicas={"cold": 1}
    )
    yield c
    await c.aclose()


async def check(watch: ReplicaWatch) -> list[tuple[str, bool]]:
    started = watch.check()
    await watch.settle()
    return started


async def test_a_busy_one_slot_model_gets_replicas_up_to_max_then_unloads_to_min(
    cluster: FakeHiveCluster,
) -> None:
    held = Held()
    for worker_id in ("w1-cold", "w2-cold", "w3-cold"):
        cluster.workers[worker_id] = held
    watch = replica_watch(cluster.state)
    clients = [asyncio.create_task(cluster.chat()) for _ in range(8)]
    admission = cluster.state.router.admission
    await until(lambda: held.started == 1 and admission.waiting(("cold", False)) == 7)
    assert len(cluster.spawns) == 1

    assert await check(watch) == [], "no replica before the requests waited 2 s"
    cluster.clock.advance(1.9)
    assert await check(watch) == []
    cluster.clock.advance(0.2)
    assert await check(watch) == [("cold", False)]
    assert len(cluster.spawns) == 2
    assert cluster.spawns[1]["keep_alive_s"] == 300.0, "a replica carries the keep-alive"
    await until(lambda: held.started == 2)
    entry = await cluster.model()
    assert (entry["workers"], entry["queued"], entry["max_replicas"]) == (2, 6, 2)

    cluster.clock.advance(60)
    assert await check(watch) == [], "at most max_replicas"
    assert len(cluster.spawns) == 2

    held.release.set()
    answers = await asyncio.gather(*clients)
    assert [a.status_code for a in answers] == [200] * 8
    served = {a.headers["x-rbee-worker-id"] for a in answers}
    assert served == {"w1-cold", "w2-cold"}
    metrics = await cluster.metrics()
    assert 'rbee_model_loads_total{model="cold",reason="replica"} 1.0' in metrics
    assert 'rbee_model_loads_total{model="cold",reason="demand"} 1.0' in metrics

    unloaded = await cluster.idle_for(301)
    assert len(unloaded) == 1, "idle replicas unload down to min_replicas (1)"
    assert await cluster.idle_for(10 * 24 * 3600) == []
    assert cluster.stops == unloaded
    assert (await cluster.model())["workers"] == 1


async def test_without_a_max_a_model_gets_as_many_replicas_as_its_load_wants() -> None:
    cluster = await open_cluster(replica_after=1)
    try:
        held = Held()
        for n in range(1, 6):
            cluster.workers[f"w{n}-cold"] = held
        watch = replica_watch(cluster.state)
        clients = [asyncio.create_task(cluster.chat()) for _ in range(4)]
        admission = cluster.state.router.admission
        await until(lambda: admission.waiting(("cold", False)) == 3)
        for replicas in (2, 3, 4):
            cluster.clock.advance(1)
            assert await check(watch) == [("cold", False)]
            await until(lambda n=replicas: held.started == n)  # a request reaches it
        cluster.clock.advance(10)
        assert await check(watch) == [], "nothing waits any more"
        assert len(cluster.spawns) == 4
        held.release.set()
        assert [a.status_code for a in await asyncio.gather(*clients)] == [200] * 4
        # min_replicas 0 by default: all of them unload once idle.
        assert len(await cluster.idle_for(301)) == 4
    finally:
        await cluster.aclose()


async def test_no_replica_where_there_is_no_room_and_nothing_is_unloaded_for_one(
    cluster: FakeHiveCluster,
) -> None:
    footprint = {"weights_bytes": 1 << 30, "layers": 16, "kv_bytes_per_token": 16 << 10,
                 "vocab_size": 32000, "head_count": 16}  # fmt: skip

    async def hive_beat(free: int) -> None:
        cpu = {"id": "cpu:0", "kind": "cpu", "name": "cpu", "memory_total_bytes": 64 << 30,
               "memory_free_bytes": free}  # fmt: skip
        beat = {
            "hive": {"id": "h1", "url": "http://hive.test:7835", "version": "1"},
            "devices": [cpu],
            "models": ["cold", "other"],
            "footprints": {"cold": footprint, "other": footprint},
            "workers": [w for w, _ in cluster.running.values()],
        }
        (await cluster.client.post("/v1/hive-heartbeat", json=beat)).raise_for_status()

    await hive_beat(free=8 << 30)
    held = Held()
    cluster.workers["w1-cold"] = held
    watch = replica_watch(cluster.state)
    clients = [asyncio.create_task(cluster.chat()) for _ in range(3)]
    admission = cluster.state.router.admission
    await until(lambda: held.started == 1 and admission.waiting(("cold", False)) == 2)
    await hive_beat(free=100 << 20)  # the first worker took nearly all of it
    cluster.clock.advance(30)
    assert await check(watch) == []
    assert len(cluster.spawns) == 1
    assert cluster.stops == []
    held.release.set()
    assert [a.status_code for a in await asyncio.gather(*clients)] == [200] * 3
