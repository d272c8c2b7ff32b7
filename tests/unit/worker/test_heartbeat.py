"""Heartbeats: at once on a change, every interval otherwise, and back soon after the queen is."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator

import aiohttp
import psutil
import pytest

from rbee.common.net import dead_peer_options
from rbee.contracts.workers import WorkerInfo, WorkerStatus
from rbee.worker import heartbeat
from rbee.worker.heartbeat import Heartbeater, queen_session
from rbee_testing.queen_catcher import QueenCatcher


class Status:
    def __init__(self) -> None:
        self.value = WorkerStatus.STARTING

    def info(self) -> WorkerInfo:
        return WorkerInfo(id="w1", model_id="m", port=8080, status=self.value, version="1")


@pytest.fixture
async def queen() -> AsyncIterator[QueenCatcher]:
    """A real HTTP server on a loopback port, up at first."""
    async with QueenCatcher() as queen:
        yield queen


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with queen_session() as client:
        yield client


async def wait_for(condition: object, within_s: float = 2.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(within_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def test_status_change_is_sent_at_once_not_at_the_next_interval(
    queen: QueenCatcher, client: aiohttp.ClientSession
) -> None:
    status = Status()
    beater = Heartbeater(client, queen.url, status.info, interval_s=60, token="s3cret")
    task = asyncio.create_task(beater.run())
    await wait_for(lambda: queen.statuses == [WorkerStatus.STARTING])
    status.value = WorkerStatus.READY
    beater.notify()
    await wait_for(lambda: queen.statuses[-1] is WorkerStatus.READY, within_s=1.0)
    assert queen.auth
    assert set(queen.auth) == {"Bearer s3cret"}
    beater.close()
    await task


async def test_a_lifecycle_step_goes_at_once_and_a_change_of_the_slots_settles_first(
    queen: QueenCatcher, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queen routes to a new worker once it hears `ready`: that beat is not held back by
    the settling that keeps `busy`/`ready` flips out of a starting request's way."""
    monkeypatch.setattr(heartbeat, "STATUS_SETTLE_S", 60.0)
    status = Status()
    beater = Heartbeater(client, queen.url, status.info, interval_s=60)
    task = asyncio.create_task(beater.run())
    await wait_for(lambda: queen.statuses == [WorkerStatus.STARTING])
    status.value = WorkerStatus.READY
    beater.notify(settle=False)
    await wait_for(lambda: queen.statuses[-1] is WorkerStatus.READY, within_s=1.0)
    status.value = WorkerStatus.BUSY
    beater.notify(settle=True)
    await asyncio.sleep(0.3)
    assert queen.statuses[-1] is WorkerStatus.READY, "a slot change waits for the settling"
    status.value = WorkerStatus.STOPPING
    beater.notify(settle=False)  # a lifecycle step during the settling ends it
    await wait_for(lambda: queen.statuses[-1] is WorkerStatus.STOPPING, within_s=1.0)
    beater.close()
    await task


async def test_one_heartbeat_per_interval_between_changes(
    queen: QueenCatcher, client: aiohttp.ClientSession
) -> None:
    status = Status()
    beater = Heartbeater(client, queen.url, status.info, interval_s=0.1)
    task = asyncio.create_task(beater.run())
    await asyncio.sleep(0.55)
    beater.close()
    await task
    assert 4 <= len(queen.beats) <= 8
    # One connection kept alive between beats, not a new one each time.
    assert len(set(queen.peers)) == 1


async def test_queen_down_at_start_then_up_registers_within_one_interval(
    queen: QueenCatcher, client: aiohttp.ClientSession
) -> None:
    await queen.stop()
    status = Status()
    beater = Heartbeater(client, queen.url, status.info, interval_s=0.4, first_retry_s=0.01)
    task = asyncio.create_task(beater.run())
    # Long enough for the backoff to reach its cap: the interval.
    await asyncio.sleep(1.5)
    assert beater.failures >= 4
    assert not beater.connected
    loop = asyncio.get_running_loop()
    await queen.start()
    back_at = loop.time()
    # The queen records the beat before the worker has read the answer: wait for the worker's
    # side too. The bound is the backoff's cap plus room for a busy two-core machine.
    await wait_for(lambda: bool(queen.beats) and beater.connected, within_s=0.4 + 0.6)
    assert loop.time() - back_at <= 0.4 + 0.6
    beater.close()
    await task


async def test_backoff_grows_but_never_past_the_interval(
    queen: QueenCatcher, client: aiohttp.ClientSession
) -> None:
    await queen.stop()
    beater = Heartbeater(client, queen.url, Status().info, interval_s=0.2, first_retry_s=0.01)
    task = asyncio.create_task(beater.run())
    await asyncio.sleep(1.0)
    beater.close()
    await task
    # Doubling from 10 ms: 10+20+40+80+160 ms, then every 200 ms — about 8 tries, not 100.
    assert 5 <= beater.failures <= 12
    assert beater.sent == 0


async def test_a_refusing_queen_is_retried_not_fatal(
    queen: QueenCatcher, client: aiohttp.ClientSession
) -> None:
    queen.answer = 500
    beater = Heartbeater(client, queen.url, Status().info, interval_s=0.05, first_retry_s=0.01)
    assert not await beater.send(Status().info())
    task = asyncio.create_task(beater.run())
    await asyncio.sleep(0.2)
    beater.close()
    await task
    assert queen.requests >= 3
    assert not queen.beats


async def test_a_queen_that_never_answers_times_out_and_is_logged(
    client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A queen that accepts the connection and then says nothing (hung, or a black hole)."""

    released = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await released.wait()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    beater = Heartbeater(client, f"http://127.0.0.1:{port}", Status().info, interval_s=30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="rbee.worker.heartbeat"):
        assert not await beater.send(Status().info(), timeout_s=0.3)
    assert loop.time() - started < 2.0
    assert beater.failures == 1
    assert "queen unreachable" in caplog.text
    released.set()
    server.close()
    await server.wait_closed()


async def test_the_connection_to_the_queen_notices_a_dead_peer(
    queen: QueenCatcher, client: aiohttp.ClientSession
) -> None:
    """Its socket carries `rbee.common.net`'s options: a queen whose machine vanished is found
    dead within seconds, not at a read timeout."""
    beater = Heartbeater(client, queen.url, Status().info, interval_s=30)
    assert await beater.send(Status().info())
    # The kept-alive connection, as the kernel holds it in this process.
    (held,) = [
        c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr[1] == queen.port
    ]
    with socket.socket(fileno=os.dup(held.fd)) as sock:
        for level, option, value in dead_peer_options():
            assert sock.getsockopt(level, option) == value, (level, option)


async def test_closing_sends_nothing_more_as_the_closer_sends_the_final_status(
    queen: QueenCatcher, client: aiohttp.ClientSession
) -> None:
    """A stop (a swap waits for it) sends one last beat, `stopped`, not one more before it."""
    beater = Heartbeater(client, queen.url, Status().info, interval_s=60)
    task = asyncio.create_task(beater.run())
    await wait_for(lambda: len(queen.beats) == 1)
    beater.close()
    async with asyncio.timeout(2):
        await task
    assert len(queen.beats) == 1
