"""A hive lends its devices to a split worker: llama.cpp's RPC server on loopback, behind rbee's
authenticated tunnel, stopped with its worker and found again by a restarted hive (issue 24)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

import psutil
import pytest

from rbee.common.tunnel import open_tunnel
from rbee.contracts.rpc import RpcServerInfo, RpcServerRequest
from rbee.hive import rpc

from .conftest import Hive, HiveFactory

TOKEN = "rpc-test-cluster-token-0123456789"
RPC_SERVER = Path(rpc.default_rpc_server())
HELLO = 14  # llama.cpp's RPC_CMD_HELLO, the first command of every RPC session
CONN_CAPS = 24
pytestmark = pytest.mark.skipif(
    not RPC_SERVER.is_absolute(), reason="no ggml-rpc-server next to llama-server (run ./dev)"
)


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """The RPC server's protocol major version, as llama-server's first request asks it."""
    writer.write(struct.pack("<BQ", HELLO, CONN_CAPS) + bytes(CONN_CAPS))
    await writer.drain()
    (size,) = struct.unpack("<Q", await asyncio.wait_for(reader.readexactly(8), 30))
    answer = await asyncio.wait_for(reader.readexactly(size), 30)
    return answer[0]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(*pids: int) -> None:
    for _ in range(600):
        if all(gone(pid) for pid in pids):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still running after 60 s: {[p for p in pids if not gone(p)]}")


def engine_of(info: RpcServerInfo) -> psutil.Process:
    (child,) = psutil.Process(info.pid).children()
    return child


async def test_the_rpc_server_answers_only_through_the_tunnel_and_stops_on_request(
    make_hive: HiveFactory,
) -> None:
    async with make_hive(token=TOKEN) as hive:
        info = await hive.client.start_rpc_server(RpcServerRequest(worker_id="w1", bytes=1 << 20))
        engine = engine_of(info)
        try:
            assert info.endpoint == f"rbee://127.0.0.1:{info.port}/w1@{hive.settings.hive_id}"
            assert [i.rpc_id for i in await hive.client.rpc_servers()] == [info.rpc_id]
            # llama.cpp's server listens on loopback only, on a port of its own.
            listening = [
                c.laddr for c in engine.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            ]
            assert listening
            assert all(addr.ip == "127.0.0.1" for addr in listening)
            assert info.port not in {addr.port for addr in listening}

            # Through the tunnel with the cluster token: the RPC server's own answer.
            reader, writer = await open_tunnel("127.0.0.1", info.port, info.rpc_id, TOKEN)
            assert await hello(reader, writer) == 7
            writer.close()
            # Without it, the same request gets the challenge and a closed connection.
            reader, writer = await asyncio.open_connection("127.0.0.1", info.port)
            writer.write(struct.pack("<BQ", HELLO, CONN_CAPS) + bytes(CONN_CAPS) + b"\n")
            await writer.drain()
            assert (await reader.readline()).startswith(b"RBEE-RPC 1 ")
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()

            stopped = await hive.client.stop_rpc_server(info.rpc_id)
            assert stopped.signal == "SIGTERM"
            await wait_gone(info.pid, engine.pid)  # the RPC server went with it
            assert await hive.client.rpc_servers() == []
        finally:
            for pid in (info.pid, engine.pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()


async def test_a_dead_rpc_server_takes_its_tunnel_with_it(make_hive: HiveFactory) -> None:
    async with make_hive(token=TOKEN) as hive:
        info = await hive.client.start_rpc_server(RpcServerRequest(worker_id="w2"))
        engine = engine_of(info)
        engine.kill()
        await wait_gone(info.pid)
        assert await hive.client.rpc_servers() == []


async def test_a_restarted_hive_stops_the_rpc_servers_nobody_uses(
    make_hive: HiveFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_hive(token=TOKEN) as hive:
        used = await hive.client.start_rpc_server(RpcServerRequest(worker_id="w3"))
        unused = await hive.client.start_rpc_server(RpcServerRequest(worker_id="w4"))
        reader, writer = await open_tunnel("127.0.0.1", used.port, used.rpc_id, TOKEN)
        assert await hello(reader, writer) == 7
        try:
            monkeypatch.setattr(rpc, "SWEEP_GRACE_S", 0.0)
            # A new hive process finds them by their marks, as this sweep does at its start.
            fresh = rpc.RpcServers(hive.settings)
            assert await fresh.sweep() == [unused.rpc_id]
            await wait_gone(unused.pid)
            assert [i.rpc_id for i in fresh.listed()] == [used.rpc_id]
        finally:
            writer.close()
            await servers_stop_all(hive)


async def test_no_rpc_server_without_a_cluster_token(hive: Hive) -> None:
    response = await hive.http.post("/v1/rpc-servers", json={"worker_id": "w5"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "rpc_needs_token"


async def servers_stop_all(hive: Hive) -> None:
    for info in await hive.client.rpc_servers():
        with contextlib.suppress(Exception):
            await hive.client.stop_rpc_server(str(info.pid))


async def test_what_an_rpc_server_is_given_counts_against_the_memory_limit(
    make_hive: HiveFactory,
) -> None:
    gib = 1 << 30
    async with make_hive(token=TOKEN, memory_limit=4 * gib) as hive:

        async def cpu_free() -> int:
            caps = await hive.client.capabilities()
            return next(d for d in caps.devices if d.kind == "cpu").memory_free_bytes

        before = await cpu_free()
        info = await hive.client.start_rpc_server(RpcServerRequest(worker_id="w6", bytes=gib))
        try:
            # Its share of the model is the hive's no more: placement sees 1 GiB less room.
            assert await cpu_free() <= before - gib
        finally:
            await hive.client.stop_rpc_server(info.rpc_id)
        await wait_gone(info.pid)
        assert await cpu_free() > before - gib
