"""A start that does not finish leaves no worker running, and the hive's heartbeat names the
workers whose memory its figures hold (issue 22: a start that times out, double-booking)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from rbee.common.errors import Unavailable
from rbee.contracts.hive_api import SpawnRequest, WorkerProcess
from rbee.hive.heartbeat import build_heartbeat
from rbee.queen.app import create_app as create_queen
from rbee.queen.scheduler.placement import Demand
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState

from .conftest import Hive, HiveFactory

TINY = "acme/tiny-GGUF:tiny.Q4_0.gguf"


async def running(hive: Hive) -> list[WorkerProcess]:
    return await asyncio.to_thread(hive.state.supervisor.processes)


async def wait_for_workers(hive: Hive, count: int) -> list[WorkerProcess]:
    async with asyncio.timeout(60):
        while True:
            found = await running(hive)
            if len(found) == count:
                return found
            await asyncio.sleep(0.05)


async def test_a_worker_that_never_reports_ready_to_the_queen_is_stopped_on_its_hive(
    hive: Hive,
) -> None:
    # The stand-in worker answers /health but never heartbeats: the queen never hears "ready".
    settings = QueenSettings.model_validate({"heartbeat_timeout": 90, "spawn_timeout": 2})
    app = create_queen(settings, transport=hive.transport)
    queen: QueenState = app.state.queen
    try:
        queen.hives.update(await build_heartbeat(hive.state))
        demand = Demand(model=TINY, ctx_size=2048)
        with pytest.raises(Unavailable) as failed:
            await queen.spawner.start(queen.spawner.place(demand), demand)
        assert failed.value.code == "worker_start_timeout"
        # Stopped, not left running: the next start would otherwise run the model twice.
        assert await running(hive) == []
    finally:
        await queen.aclose()


async def test_a_spawn_whose_caller_leaves_kills_the_starting_worker(
    make_hive: HiveFactory,
) -> None:
    async with make_hive() as hive:
        (hive.settings.models_dir / "sleepy.gguf").write_bytes(b"GGUF" + bytes(10))
        request = hive.http.post("/v1/workers/spawn", json={"model": "sleepy.gguf"})
        spawn = asyncio.ensure_future(request)
        try:
            [starting] = await wait_for_workers(hive, 1)
            # Still starting: the hive's heartbeat does not count its memory as in its figures.
            assert starting.worker_id not in (await build_heartbeat(hive.state)).workers
        finally:
            spawn.cancel()  # the queen gave up waiting (its spawn timeout), or went away
            with contextlib.suppress(asyncio.CancelledError):
                await spawn
        await wait_for_workers(hive, 0)


async def test_the_hive_heartbeat_lists_a_worker_once_it_has_started(hive: Hive) -> None:
    spawned = await hive.client.spawn(SpawnRequest(model=TINY))
    assert (await build_heartbeat(hive.state)).workers == [spawned.worker_id]
