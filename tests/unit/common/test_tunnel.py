"""The RPC tunnel: only a peer holding the cluster token ever reaches the RPC server behind it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from rbee.common.tunnel import TunnelClient, TunnelRefused, TunnelServer, open_tunnel

TOKEN = "cluster-token-0123456789"


class Echo:
    """A stand-in for the RPC server on loopback: echoes, and records every byte it got."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.open -= 1


@pytest.fixture
async def rpc() -> AsyncIterator[tuple[Echo, int]]:
    echo = Echo()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    yield echo, server.sockets[0].getsockname()[1]
    # The tunnel hands its sockets to the kernel: the stand-in sees their end a moment later.
    for _ in range(500):
        if not echo.open:
            break
        await asyncio.sleep(0.01)
    server.close()


async def far_end(target: int, **options: object) -> tuple[TunnelServer, int]:
    tunnel = TunnelServer(token=TOKEN, name="w1-rpc-b", target_port=target, **options)  # type: ignore[arg-type]
    return tunnel, await tunnel.start("127.0.0.1", 0)


async def test_the_token_holder_talks_to_the_rpc_server_through_both_ends(
    rpc: tuple[Echo, int],
) -> None:
    _echo, target = rpc
    tunnel, port = await far_end(target)
    near = TunnelClient("127.0.0.1", port, "w1-rpc-b", TOKEN)
    local = await near.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        payload = bytes(range(256)) * 4096  # 1 MiB, like a tensor while loading
        writer.write(payload)
        await writer.drain()
        assert await reader.readexactly(len(payload)) == payload
        writer.close()
        assert tunnel.admitted == 1
    finally:
        await near.close()
        await tunnel.close()


async def test_a_peer_without_the_token_never_reaches_the_rpc_server(
    rpc: tuple[Echo, int],
) -> None:
    echo, target = rpc
    tunnel, port = await far_end(target)
    try:
        # Speaking the RPC protocol straight away (what llama-server would do) gets nowhere.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00" * 64 + b"\n")
        await writer.drain()
        greeting = await reader.readline()
        assert greeting.startswith(b"RBEE-RPC 1 ")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing more
        writer.close()
        # A wrong token, and the right token's answer for another tunnel, are refused too.
        with pytest.raises(TunnelRefused):
            await open_tunnel("127.0.0.1", port, "w1-rpc-b", "another-cluster-token")
        with pytest.raises(TunnelRefused):
            await open_tunnel("127.0.0.1", port, "w2-rpc-b", TOKEN)
        assert echo.connections == 0
        assert echo.received == b""
        assert tunnel.refused == 3
    finally:
        await tunnel.close()


async def test_only_the_allowed_peer_address_may_connect(rpc: tuple[Echo, int]) -> None:
    echo, target = rpc
    tunnel, port = await far_end(target, allow_peer="198.18.0.2")
    try:
        with pytest.raises(TunnelRefused):
            await open_tunnel("127.0.0.1", port, "w1-rpc-b", TOKEN)
        assert echo.connections == 0
    finally:
        await tunnel.close()


async def test_the_far_end_says_when_its_last_connection_closed(rpc: tuple[Echo, int]) -> None:
    _echo, target = rpc
    idle = asyncio.Event()
    tunnel, port = await far_end(target, on_idle=idle.set)
    try:
        reader, writer = await open_tunnel("127.0.0.1", port, "w1-rpc-b", TOKEN)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert not idle.is_set()
        writer.close()
        await asyncio.wait_for(idle.wait(), 10)
    finally:
        await tunnel.close()


async def test_the_near_end_reports_a_far_end_it_cannot_reach() -> None:
    failures: list[str] = []
    near = TunnelClient("127.0.0.1", 9, "w1-rpc-b", TOKEN, on_failure=failures.append)
    local = await near.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert failures
        assert "cannot reach the RPC server w1-rpc-b" in failures[0]
    finally:
        await near.close()
