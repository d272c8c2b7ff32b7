"""A hive started with `--memory-limit` reports each device's free memory as what is left of
the limit once its workers' memory is counted, to `/v1/capabilities` and in its heartbeats."""

from __future__ import annotations

import asyncio

from rbee.contracts.hive_api import SpawnRequest

from .conftest import HIVE_ID, HiveFactory

LIMIT = 512 << 20


async def test_the_devices_report_what_is_left_of_the_limit_after_the_workers(
    make_hive: HiveFactory,
) -> None:
    async with make_hive(memory_limit="512MiB") as hive:
        [idle] = (await hive.http.get("/v1/capabilities")).json()["devices"]
        assert (idle["id"], idle["memory_limit_bytes"]) == ("cpu:0", LIMIT)
        assert (idle["rbee_used_bytes"], idle["memory_free_bytes"]) == (0, LIMIT)

        spawned = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))
        [worker] = await hive.client.workers()
        [cpu] = (await hive.http.get("/v1/capabilities")).json()["devices"]
        used = cpu["rbee_used_bytes"]
        # The worker's resident memory (read a moment apart, so not to the byte) is taken
        # from the limit, not from the machine's many free gigabytes.
        assert worker.pid == spawned.pid
        assert 0.5 * worker.memory_bytes <= used <= 2 * worker.memory_bytes
        assert cpu["memory_free_bytes"] == LIMIT - used

        # The queen places by the same figures: its view of the hive has them too.
        for _ in range(100):
            hives = (await hive.queen.get("/v1/hives")).json()["hives"]
            devices = [d for h in hives if h["id"] == HIVE_ID for d in h["devices"]]
            if devices and devices[0]["rbee_used_bytes"]:
                break
            await asyncio.sleep(0.1)
        assert devices[0]["memory_limit_bytes"] == LIMIT
        assert 0 < devices[0]["memory_free_bytes"] <= LIMIT - devices[0]["rbee_used_bytes"]


async def test_without_a_limit_the_device_shows_the_machine_free_memory(
    make_hive: HiveFactory,
) -> None:
    async with make_hive() as hive:
        [cpu] = (await hive.http.get("/v1/capabilities")).json()["devices"]
    assert cpu["memory_limit_bytes"] is None
    assert cpu["memory_free_bytes"] > LIMIT
