"""The queen's HTTP client for inference requests to workers, on the proxy's hot path.

aiohttp rather than httpx here because every proxied request pays for it: measured against a
zero-cost worker on two cores, one POST with its answer read costs about 0.22 ms of CPU in
aiohttp's client against 0.75 ms in httpx's (0.53 ms in httpcore alone), and the queen's
budget over a plain reverse proxy is about a millisecond (see bench/proxy_bench.py). The rest
of the queen (hives, CLI, heartbeats) stays on httpx, where a request's cost does not matter.

Only what the proxy needs is exposed, with httpx-like names: status, headers, the body whole or
as it arrives, and closing. Every network failure surfaces as `UpstreamError`.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable

import aiohttp
from multidict import CIMultiDictProxy

from rbee.common.net import CLIENT_KEEPALIVE_S, SocketOption, socket_factory
from rbee.common.tls import client_context

# Generation can be slow to start on a busy CPU; connecting to a live worker is not. `connect`
# covers waiting for a pooled connection too; there is no overall deadline on an answer.
WORKER_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=3.0, sock_read=600.0)
NODELAY: list[SocketOption] = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

# What a broken or vanished worker raises, from resolving its name to reading its answer.
_NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


class UpstreamError(Exception):
    """The worker could not be reached, or the connection failed before its answer was whole."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class UpstreamResponse:
    """A worker's answer whose head has arrived; the body is read on demand."""

    def __init__(self, raw: aiohttp.ClientResponse) -> None:
        self._raw = raw
        self._complete = False
        self.content: bytes | None = None  # the whole body, once `aread` has read it
        self.status_code = raw.status
        self.headers: CIMultiDictProxy[str] = raw.headers

    async def aread(self) -> bytes:
        try:
            body = await self._raw.read()
        except _NETWORK_ERRORS as exc:
            raise UpstreamError(_describe(exc)) from exc
        self._complete = True
        self.content = body
        return body

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, in whatever pieces the network delivers."""
        try:
            async for chunk in self._raw.content.iter_any():
                yield chunk
        except _NETWORK_ERRORS as exc:
            raise UpstreamError(_describe(exc)) from exc
        self._complete = True

    def close(self) -> None:
        """A fully read answer gives its connection back to the pool; any other closes it, which
        is how a worker learns that nobody reads on and stops generating."""
        if self._complete:
            self._raw.release()
        else:
            self._raw.close()


class UpstreamClient:
    """One pool of kept-alive connections to all workers; the session is made on first use,
    inside the running event loop, as aiohttp requires."""

    def __init__(self, socket_options: Iterable[SocketOption] = NODELAY) -> None:
        self._socket_options = list(socket_options)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0,
            # Closed before the worker's server closes it: a request written into a connection
            # the worker is just closing would fail, and the worker would be benched for it.
            keepalive_timeout=CLIENT_KEEPALIVE_S,
            socket_factory=socket_factory(self._socket_options),
            ssl=client_context(),
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=WORKER_TIMEOUT,
            # Bodies pass through untouched and no header is added beyond those given.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send the request; returns once the answer's status and headers are in."""
        if self._session is None:
            self._session = self._open()
        try:
            raw = await self._session.post(url, data=body, headers=headers, allow_redirects=False)
        except _NETWORK_ERRORS as exc:
            raise UpstreamError(_describe(exc)) from exc
        except ValueError as exc:  # a URL aiohttp cannot use (the registry checks hosts first)
            raise UpstreamError(f"bad worker URL {url!r}: {exc}") from exc
        return UpstreamResponse(raw)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
