"""A worker's answer on its way to the client, once the proxy has chosen to relay it: one try
at a worker (`Attempt`), and the relay that frees the worker's slot however the answer ends."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rbee.common.errors import BadGateway
from rbee.contracts.errors import ErrorBody
from rbee.queen.loading import sse_data
from rbee.queen.metrics import CLIENT_CLOSED, RequestTrack
from rbee.queen.routing.retry import Outcome
from rbee.queen.routing.router import Lease, Router
from rbee.queen.upstream import UpstreamError, UpstreamResponse

log = logging.getLogger("rbee.queen.proxy")


def sse_error(message: str) -> bytes:
    body = ErrorBody.of(message, "server_error", "worker_failed").model_dump()
    return sse_data(body)


@dataclass
class Attempt:
    """One try at a worker. `answered`: the worker's response, read whole (`content`) or with
    its first bytes in `first` and the rest to come from `rest`; `full`: its whole 429;
    otherwise why it failed."""

    outcome: Outcome
    reason: str = ""
    upstream: UpstreamResponse | None = None
    first: bytes = b""
    rest: AsyncIterator[bytes] | None = None
    refused: bool = False  # nothing listens there any more: the worker process is gone


class Relay:
    """A worker's answer on its way to the client. `finish` frees the worker's slot, records
    the request's figures and closes the worker's response, once, however the relay ends:
    at the answer's end, cut by the worker, or before it began, because the client left just
    as the worker's first bytes came in (its body is then never read)."""

    def __init__(self, router: Router, lease: Lease, attempt: Attempt, track: RequestTrack):
        assert attempt.upstream is not None
        assert attempt.rest is not None
        self.router = router
        self.lease = lease
        self.attempt = attempt
        self.upstream = attempt.upstream
        self.track = track
        self.started = False
        self.finished = False

    async def chunks(self) -> AsyncIterator[bytes]:
        attempt, track = self.attempt, self.track
        assert attempt.rest is not None
        self.started = True
        failed = False
        try:
            track.first_byte()
            if attempt.first:
                yield attempt.first
            async for chunk in attempt.rest:
                yield chunk
        except UpstreamError as exc:
            failed = True
            who = self.lease.worker_id
            log.warning("worker %s failed mid-answer: %s", who, exc)
            if track.streamed:
                yield sse_error(f"worker {who} failed mid-stream: {type(exc).__name__}")
        finally:
            self.finish(failed)

    def finish(self, failed: bool = False) -> None:
        """Synchronous, so that it runs whole even when the client's leaving cancels the task."""
        if self.finished:
            return
        self.finished = True
        if failed:
            self.router.fail(self.lease)
        else:
            self.router.release(self.lease)
        # A stream cut by its worker counts as a bad gateway, whatever status went out; one
        # whose client left before any of it was sent, as a client that closed the request.
        if failed:
            code: int | str = BadGateway.status_code
        else:
            code = self.upstream.status_code if self.started else CLIENT_CLOSED
        self.track.end(code)
        self.upstream.close()


class RelayResponse(StreamingResponse):
    """A streamed answer that finishes its relay even if its body is never read: the server
    may fail to send the first bytes (the client just left) before it starts the body."""

    def __init__(self, relay: Relay, **kwargs: Any) -> None:
        super().__init__(relay.chunks(), **kwargs)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.finish()
