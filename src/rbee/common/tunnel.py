"""An authenticated TCP tunnel: how a split worker's `llama-server` reaches RPC servers on other
hives without any RPC server being open to the network.

llama.cpp's RPC server has no authentication ("never run the RPC server on an open network"), so
rbee runs it on loopback only and puts this tunnel in front of it:

- the far end (`TunnelServer`, on the helper hive) listens on the hive's address. A connection
  first gets a challenge, `RBEE-RPC 1 <nonce>\\n`, and must answer with
  `<hex HMAC-SHA256(cluster token, nonce | tunnel name)>\\n`: a proof that it holds the cluster
  token, which itself never crosses the network. A wrong or missing answer, or a peer address
  other than the one allowed (the main worker's host), closes the connection before a single
  byte reaches the RPC server. Only then is the RPC server connected and `OK\\n` sent; from there
  on bytes flow both ways unchanged. Where the cluster uses TLS, the tunnel does too (the hive's
  certificate, verified against the cluster's CA).
- the near end (`TunnelClient`, in the worker) listens on 127.0.0.1 of the worker's machine:
  `llama-server --rpc 127.0.0.1:P` connects there, and each of its connections is carried to
  the far end, handshake first.

Every socket has the dead-peer options (a helper cut off the network is found dead in seconds,
so its worker ends instead of hanging) and TCP_NODELAY: the RPC protocol is many small
request/answer round trips per token, which Nagle's algorithm would hold back by tens of
milliseconds each. Past the handshake, a plain TCP tunnel's bytes are moved by the kernel
(`splice`, a thread per direction that only waits on it): no Python runs per message, so the
tunnel adds next to nothing to a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from rbee.common.net import dead_peer_options

log = logging.getLogger("rbee.tunnel")

GREETING = b"RBEE-RPC 1 "
OK = b"OK\n"
NONCE_BYTES = 32
HANDSHAKE_TIMEOUT_S = 10.0
CHUNK = 1 << 20  # RPC messages carry whole tensors while a model loads


class TunnelRefused(Exception):
    """The far end closed the connection during the handshake: wrong token or not allowed."""


def proof(token: str, nonce: bytes, name: str) -> str:
    """The answer to a challenge: the token's HMAC of the nonce and the tunnel's name (so an
    answer for one tunnel is no use on another)."""
    return hmac.new(token.encode(), nonce + b"|" + name.encode(), hashlib.sha256).hexdigest()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY, and the dead-peer options of `rbee.common.net` (keepalive probes, a bound on
    unacknowledged data): a helper whose cable is pulled sends no FIN, and llama.cpp waits for
    its answer forever; the tunnel's socket then fails within `DEAD_PEER_S`, and closing the
    tunnel makes `llama-server` abort (and on the helper, ends the RPC server's session)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        for level, option, value in dead_peer_options():
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2.0)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _take_socket(stream: Stream) -> tuple[socket.socket, bytes]:
    """The connection's socket, taken over from asyncio for a blocking copy, with what its
    reader had already buffered (bytes that arrived with or right after the handshake)."""
    reader, writer = stream
    transport = cast(asyncio.Transport, writer.transport)
    transport.pause_reading()
    transport.set_write_buffer_limits(high=0)  # the handshake's last line must go out first
    await writer.drain()
    sock = writer.get_extra_info("socket")
    taken = socket.socket(fileno=os.dup(sock.fileno()))
    taken.setblocking(True)
    # asyncio offers no public way to take what a reader has buffered.
    buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
    pending = bytes(buffered)
    buffered.clear()
    transport.abort()  # closes asyncio's descriptor only: the connection lives on in `taken`
    return taken, pending


def _copy(src: socket.socket, dst: socket.socket, first: bytes) -> None:
    """Move bytes from `src` to `dst` in the kernel (splice through a pipe) until `src` ends,
    then shut both down, which also ends the copy the other way."""
    read_end, write_end = os.pipe()
    try:
        if first:
            dst.sendall(first)
        while moved := os.splice(src.fileno(), write_end, CHUNK):
            while moved > 0:
                moved -= os.splice(read_end, dst.fileno(), moved)
    except OSError:
        pass
    finally:
        os.close(read_end)
        os.close(write_end)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


async def _kernel_splice(a: Stream, b: Stream) -> None:
    """Both ways at once, each in a thread of its own that only waits on the kernel: no Python
    runs per message, so a token's RPC round trips cost what they cost without the tunnel. The
    threads close the sockets when both are done, even if the event loop is gone by then."""
    sock_a, pending_a = await _take_socket(a)
    try:
        sock_b, pending_b = await _take_socket(b)
    except BaseException:
        sock_a.close()
        raise
    loop = asyncio.get_running_loop()
    done = [loop.create_future(), loop.create_future()]
    running = [2]
    lock = threading.Lock()

    def run(index: int, src: socket.socket, dst: socket.socket, first: bytes) -> None:
        try:
            _copy(src, dst, first)
        finally:
            with lock:
                running[0] -= 1
                last = running[0] == 0
            if last:
                sock_a.close()
                sock_b.close()
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(done[index].set_result, None)

    for index, args in enumerate(((sock_a, sock_b, pending_a), (sock_b, sock_a, pending_b))):
        name = f"rbee-tunnel-{'ab'[index]}"
        threading.Thread(target=run, args=(index, *args), name=name, daemon=True).start()
    try:
        await asyncio.shield(asyncio.gather(*done))
    finally:  # cancelled (the tunnel closes): shutting the sockets down ends both threads
        for sock in (sock_a, sock_b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        await asyncio.gather(*done, return_exceptions=True)


def _plain_tcp(stream: Stream) -> bool:
    return (
        stream[1].get_extra_info("ssl_object") is None
        and stream[1].get_extra_info("socket") is not None
    )


async def splice(a: Stream, b: Stream) -> None:
    """Copy bytes both ways until either side is done, then close both. Plain TCP on Linux is
    copied by the kernel (`os.splice`); TLS, or a system without splice, by asyncio."""
    if hasattr(os, "splice") and _plain_tcp(a) and _plain_tcp(b):
        await _kernel_splice(a, b)
        return
    try:
        one = asyncio.ensure_future(_pump(a[0], b[1]))
        two = asyncio.ensure_future(_pump(b[0], a[1]))
        # When one side goes away, the whole RPC session is over: llama.cpp never half-closes.
        _, pending = await asyncio.wait((one, two), return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await asyncio.gather(_close(a[1]), _close(b[1]), return_exceptions=True)


def _same_address(peer: str, allowed: str) -> bool:
    try:
        return ipaddress.ip_address(peer) == ipaddress.ip_address(allowed)
    except ValueError:
        return peer == allowed


@dataclass
class TunnelServer:
    """The far end: admits connections that prove the token, and joins each to the RPC server
    on `target` (a loopback port). `allow_peer`: the one address allowed to connect (None: any
    that holds the token). `on_idle` is called when the last admitted connection closes."""

    token: str
    name: str
    target_port: int
    target_host: str = "127.0.0.1"
    allow_peer: str | None = None
    tls: ssl.SSLContext | None = None
    on_idle: Callable[[], None] | None = None
    admitted: int = 0  # connections admitted so far
    refused: int = 0
    open: int = 0  # connections open now
    _server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (0 asks the OS for one)."""
        self._server = await asyncio.start_server(self._handle, host, port, ssl=self.tls)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        if self.allow_peer is not None and not _same_address(host, self.allow_peer):
            self.refused += 1
            log.warning(
                "tunnel %s: refused %s (only %s may connect)", self.name, host, self.allow_peer
            )
            await _close(writer)
            return
        nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            writer.write(GREETING + nonce.hex().encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, ConnectionError, OSError, ValueError):
            line = b""
        expected = proof(self.token, nonce, self.name).encode()
        if not hmac.compare_digest(line.strip(), expected):
            self.refused += 1
            log.warning("tunnel %s: refused %s (no proof of the cluster token)", self.name, host)
            await _close(writer)
            return
        try:
            target = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError as exc:
            log.warning("tunnel %s: the RPC server does not answer: %s", self.name, exc)
            await _close(writer)
            return
        _nodelay(target[1])
        self.admitted += 1
        self.open += 1
        try:
            writer.write(OK)
            await writer.drain()
            await splice((reader, writer), target)
        finally:
            self.open -= 1
            if self.open == 0 and self.on_idle is not None:
                self.on_idle()


async def open_tunnel(
    host: str,
    port: int,
    name: str,
    token: str,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the far end, past its handshake; `TunnelRefused` if it turned us away."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None),
        timeout_s,
    )
    _nodelay(writer)
    try:
        greeting = await asyncio.wait_for(reader.readline(), timeout_s)
        if not greeting.startswith(GREETING):
            raise TunnelRefused(f"{host}:{port} is not an rbee RPC tunnel (or refused us)")
        nonce = bytes.fromhex(greeting[len(GREETING) :].strip().decode())
        writer.write(proof(token, nonce, name).encode() + b"\n")
        await writer.drain()
        if await asyncio.wait_for(reader.readline(), timeout_s) != OK:
            raise TunnelRefused(f"the RPC tunnel {name} at {host}:{port} refused the cluster token")
    except BaseException:
        await _close(writer)
        raise
    return reader, writer


@dataclass
class TunnelClient:
    """The near end: a loopback port whose every connection is carried to the far end."""

    host: str
    port: int
    name: str
    token: str
    tls: ssl.SSLContext | None = None
    on_failure: Callable[[str], None] | None = None
    _server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1; returns the port to give `llama-server --rpc 127.0.0.1:PORT`."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            far = await open_tunnel(self.host, self.port, self.name, self.token, self.tls)
        except (OSError, TimeoutError, TunnelRefused, ValueError, ssl.SSLError) as exc:
            reason = f"cannot reach the RPC server {self.name} at {self.host}:{self.port}: {exc}"
            log.warning("%s", reason)
            if self.on_failure is not None:
                self.on_failure(reason)
            await _close(writer)
            return
        await splice((reader, writer), far)
