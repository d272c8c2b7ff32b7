"""Fake workers for the queen's in-process tests: one HTTP server per worker on a loopback port.

The queen reaches workers over real sockets (its worker client is aiohttp, see
`rbee.queen.upstream`), so a fake worker is a real server. Its answers come from a handler
written the httpx way (`httpx.Request` in, `httpx.Response` out), where the request's URL host
is the worker's name. A handler that raises `httpx.TransportError` makes its worker drop the
connection: before the answer, as a dead worker would; during a streamed body, as a worker
that died mid-answer would (the end of the chunked body never comes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
from aiohttp import web

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
# The handler for a worker's name, looked up on every request (None: it drops the connection).
Route = Callable[[str], Handler | None]


def worker_beat(
    worker_id: str, port: int, model: str = "m", status: str = "ready", **extra: Any
) -> dict[str, Any]:
    """A worker heartbeat for a fake worker served on a loopback port."""
    worker = {"id": worker_id, "model_id": model, "host": "127.0.0.1", "port": port}
    return {"worker": {**worker, "status": status, "version": "1", **extra}}


def hive_beat(models: Sequence[str], hive_id: str = "h1") -> dict[str, Any]:
    """A heartbeat of a hive at hive.test with one small CPU and `models` in its catalog."""
    cpu = {"id": "cpu:0", "kind": "cpu", "name": "cpu", "memory_total_bytes": 10,
           "memory_free_bytes": 5}  # fmt: skip
    hive = {"id": hive_id, "url": "http://hive.test:7835", "version": "1"}
    return {"hive": hive, "devices": [cpu], "models": list(models)}


async def _body_of(answer: httpx.Response) -> AsyncIterator[bytes]:
    """A handler's answer body: whole if it was given whole, else as its stream yields it."""
    try:
        whole = answer.content
    except httpx.ResponseNotRead:
        async for chunk in answer.aiter_raw():
            yield chunk
    else:
        yield whole


def _drop(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


class WorkerServers:
    """Starts a server per worker name on first use; `served` lists the names requests reached."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.served: list[str] = []
        self._runners: dict[str, tuple[web.AppRunner | web.ServerRunner, int]] = {}

    async def port(self, name: str) -> int:
        """The loopback port of worker `name`, started now if it is not running yet."""
        if name not in self._runners:

            async def handle(request: web.BaseRequest) -> web.StreamResponse:
                return await self._serve(name, request)

            runner = web.ServerRunner(web.Server(handle, handler_cancellation=True))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port: int = runner.addresses[0][1]
            self._runners[name] = (runner, port)
        return self._runners[name][1]

    async def _serve(self, name: str, request: web.BaseRequest) -> web.StreamResponse:
        self.served.append(name)
        body = await request.read()
        handler = self.route(name)
        try:
            if handler is None:
                raise httpx.ConnectError("no such worker")
            answer = await handler(
                httpx.Request(request.method, f"http://{name}{request.path_qs}", content=body)
            )
        except httpx.TransportError:
            _drop(request)
            return web.Response()
        skipped = ("content-length", "transfer-encoding")
        response = web.StreamResponse(
            status=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k.lower() not in skipped},
        )
        await response.prepare(request)
        try:
            async for chunk in _body_of(answer):
                await response.write(chunk)
        except httpx.TransportError:
            _drop(request)
            return response
        await response.write_eof()
        return response

    async def aclose(self) -> None:
        for runner, _ in list(self._runners.values()):
            await runner.cleanup()
        self._runners.clear()
