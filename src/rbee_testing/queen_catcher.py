"""A stand-in queen for tests of the worker's heartbeats: a real HTTP server on a loopback port.

It takes heartbeats over a real socket, as the queen does, and records each one with the
Authorization header it came with. `stop()` closes the port, so the worker meets a queen that is
down (connection refused); `start()` opens the same port again. `answer` sets the status code
it answers with (500 to refuse beats). Product code never starts one.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from aiohttp import web

from rbee.contracts.workers import WorkerHeartbeat, WorkerStatus
from rbee.worker.heartbeat import HEARTBEAT_PATH
from rbee_testing.processes import free_port


class QueenCatcher:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.beats: list[WorkerHeartbeat] = []
        self.auth: list[str | None] = []
        self.peers: list[object] = []  # each beat's (address, port) on the worker's side
        self.requests = 0  # every request that reached the server, accepted or not
        self.answer = 200
        self._runner: web.AppRunner | None = None

    @property
    def statuses(self) -> list[WorkerStatus]:
        return [beat.worker.status for beat in self.beats]

    async def _heartbeat(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.answer >= 300:
            return web.json_response({"error": "refused by the test"}, status=self.answer)
        beat = WorkerHeartbeat.model_validate_json(await request.read())
        self.auth.append(request.headers.get("Authorization"))
        self.beats.append(beat)
        self.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        return web.json_response({"status": "ok", "message": ""})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(HEARTBEAT_PATH, self._heartbeat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
