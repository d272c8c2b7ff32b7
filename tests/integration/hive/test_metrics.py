"""The hive's /metrics: its workers, devices, CPU and a download under way."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rbee.contracts.hive_api import SpawnRequest
from rbee_testing.gguf import gguf_bytes
from rbee_testing.metrics import Samples, parse_samples, value

from .conftest import Hive, HiveFactory, publish


async def scrape(hive: Hive) -> Samples:
    response = await hive.http.get("/metrics")
    assert response.status_code == 200
    return parse_samples(response.text)


async def test_workers_devices_and_cpu(make_hive: HiveFactory) -> None:
    # A hive id of its own: the count must not see another test run's workers on this machine.
    async with make_hive(hive_id=f"hive-metrics-{os.getpid()}") as hive:
        await _workers_devices_and_cpu(hive)


async def _workers_devices_and_cpu(hive: Hive) -> None:
    before = await scrape(hive)
    assert value(before, "rbee_hive_workers") == 0
    assert value(before, "rbee_hive_device_memory_total_bytes", device="cpu:0") > 0
    free = value(before, "rbee_hive_device_memory_free_bytes", device="cpu:0")
    assert 0 < free <= value(before, "rbee_hive_device_memory_total_bytes", device="cpu:0")
    assert 0 <= value(before, "rbee_hive_cpu_utilization") <= 1
    assert value(before, "rbee_hive_info", hive=hive.settings.hive_id) == 1
    spawned = await hive.client.spawn(SpawnRequest(model="acme/tiny-GGUF:tiny.Q4_0.gguf"))
    assert value(await scrape(hive), "rbee_hive_workers") == 1
    await hive.client.stop_worker(spawned.pid)
    assert value(await scrape(hive), "rbee_hive_workers") == 0


async def test_a_download_under_way_shows_its_progress(hive: Hive, hub_root: Path) -> None:
    ref = "acme/Metrics-GGUF:small.stall.gguf"
    size = 1024 * 1024
    publish(hub_root, "acme/Metrics-GGUF", "small.stall.gguf", gguf_bytes(size))
    created = await hive.client.start_download(ref)
    async with asyncio.timeout(20):
        while True:  # the stand-in Hub sends 64 KiB, then holds the rest back
            samples = await scrape(hive)
            if value(samples, "rbee_hive_download_done_bytes", model=ref) > 0:
                break
            await asyncio.sleep(0.05)
    assert value(samples, "rbee_hive_downloads_active") == 1
    assert value(samples, "rbee_hive_download_done_bytes", model=ref) == 64 * 1024
    assert value(samples, "rbee_hive_download_size_bytes", model=ref) == size
    await hive.client.cancel_job(created.job_id)
    async with asyncio.timeout(10):
        while True:
            if value(await scrape(hive), "rbee_hive_downloads_active") == 0:
                break
            await asyncio.sleep(0.05)


async def test_metrics_need_the_token_when_one_is_set(make_hive: HiveFactory) -> None:
    async with make_hive(token="s3cret") as hive:
        assert (await hive.http.get("/metrics", headers={"authorization": ""})).status_code == 401
        assert (await hive.http.get("/metrics")).status_code == 200
