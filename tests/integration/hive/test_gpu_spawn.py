"""Spawning on GPUs: the device check, pinning, offload flags, and memory the queen sees at once.

NVML and llama.cpp's GPU answer are faked; the worker is the conftest's stand-in process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from rbee.common.gpu import REBUILD
from rbee.contracts.hive_api import SpawnRequest
from rbee_testing.gguf import write_tiny_gguf
from rbee_testing.gpus import GIB, FakeGpu, FakeNvml, fake_llama_server

from .conftest import HiveFactory

MODEL = "acme/tiny-GGUF:tiny.Q4_0.gguf"


async def until(
    read: Callable[[], Awaitable[dict[str, Any]]], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            if done(value := await read()):
                return value
            await asyncio.sleep(0.05)


def flag(cmdline: list[str], name: str) -> str | None:
    return cmdline[cmdline.index(name) + 1] if name in cmdline else None


async def test_a_cuda_worker_is_pinned_to_its_gpu_and_told_to_offload(
    make_hive: HiveFactory, tmp_path: Path
) -> None:
    nvml = FakeNvml([FakeGpu(), FakeGpu()])
    async with make_hive(nvml=nvml, llama_server=fake_llama_server(tmp_path, "cuda")) as hive:
        spawned = await hive.client.spawn(SpawnRequest(model=MODEL, device="cuda:1", gpu_layers=20))
        proc = psutil.Process(spawned.pid)
        environ, cmdline = proc.environ(), proc.cmdline()
    assert environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert (flag(cmdline, "--device"), flag(cmdline, "--gpu-layers")) == ("cuda:1", "20")
    assert flag(cmdline, "--ctx-size") == "2048"


async def test_a_cpu_worker_sees_no_gpu(make_hive: HiveFactory, tmp_path: Path) -> None:
    async with make_hive(
        nvml=FakeNvml([FakeGpu()]), llama_server=fake_llama_server(tmp_path, "cuda")
    ) as hive:
        spawned = await hive.client.spawn(SpawnRequest(model=MODEL, device="cpu:0"))
        environ, cmdline = (
            psutil.Process(spawned.pid).environ(),
            psutil.Process(spawned.pid).cmdline(),
        )
    assert environ["CUDA_VISIBLE_DEVICES"] == ""
    assert flag(cmdline, "--gpu-layers") is None


async def test_cuda_on_a_machine_without_gpu_or_cuda_build_is_a_clear_400(
    make_hive: HiveFactory, tmp_path: Path
) -> None:
    async with make_hive(
        nvml=FakeNvml(None), llama_server=fake_llama_server(tmp_path, "cpu")
    ) as hive:
        response = await hive.http.post(
            "/v1/workers/spawn", json={"model": MODEL, "device": "cuda:0"}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "device_unavailable"
        assert error["message"] == (
            f"hive {hive.settings.hive_id} cannot start a worker on cuda:0 (it can on cpu:0): "
            "this machine has no "
            "NVIDIA GPU that NVML can see (Driver Not Loaded), and this llama.cpp build has no "
            "CUDA support: " + REBUILD["cuda"]
        )
        malformed = await hive.http.post(
            "/v1/workers/spawn", json={"model": MODEL, "device": "gpu"}
        )
        assert malformed.status_code == 400
        assert "expected cpu:0, cuda:N or metal:0" in malformed.json()["error"]["message"]
        cpu_layers = await hive.http.post(
            "/v1/workers/spawn", json={"model": MODEL, "device": "cpu:0", "gpu_layers": 4}
        )
        assert cpu_layers.status_code == 400
        assert await hive.client.workers() == []


async def test_a_gpu_of_a_cpu_only_build_is_listed_with_its_problem(
    make_hive: HiveFactory, tmp_path: Path
) -> None:
    async with make_hive(
        nvml=FakeNvml([FakeGpu()]), llama_server=fake_llama_server(tmp_path, "cpu")
    ) as hive:
        devices = (await hive.client.capabilities()).devices
        response = await hive.http.post(
            "/v1/workers/spawn", json={"model": MODEL, "device": "cuda:0"}
        )
    assert [(d.id, d.problem is None) for d in devices] == [("cpu:0", True), ("cuda:0", False)]
    assert response.status_code == 400
    assert "no CUDA support" in response.json()["error"]["message"]


async def test_the_queen_sees_footprints_and_the_memory_a_new_worker_took_at_once(
    make_hive: HiveFactory, models_dir: Path, tmp_path: Path
) -> None:
    write_tiny_gguf(models_dir / "tiny-real.gguf", n_layers=2)
    gpu = FakeGpu(free_bytes=20 * GIB)
    async with make_hive(
        nvml=FakeNvml([gpu]), llama_server=fake_llama_server(tmp_path, "cuda")
    ) as hive:

        async def reported() -> dict[str, Any]:
            hives = (await hive.queen.get("/v1/hives")).json()["hives"]
            return next((h for h in hives if h["id"] == hive.settings.hive_id), {})

        first = await until(reported, lambda h: bool(h))
        assert first["footprints"]["tiny-real.gguf"]["layers"] == 2
        assert first["devices"][1]["memory_free_bytes"] == 20 * GIB

        gpu.free_bytes = 15 * GIB  # what the new worker's model takes on the card
        await hive.client.spawn(SpawnRequest(model=MODEL, device="cuda:0"))
        # The heartbeat interval here is 60 s: the hive beats after a spawn by itself.
        await until(reported, lambda h: h["devices"][1]["memory_free_bytes"] == 15 * GIB)
        # And after a stop: the memory is back at once for a model waiting for it.
        [worker] = await hive.client.workers()
        gpu.free_bytes = 20 * GIB
        await hive.client.stop_worker(worker.pid)
        await until(reported, lambda h: h["devices"][1]["memory_free_bytes"] == 20 * GIB)
