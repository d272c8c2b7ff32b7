"""A streaming request that waits for its model to load: SSE comments until its answer.

The OpenAI SDKs (and SSE clients generally) ignore comment lines, but they keep the connection
busy, so neither the client nor a proxy between gives up on a long load. Once the answer is
there, the worker's stream follows; an error (the start failed, or the worker answered with
one) arrives as an SSE error event, since the 200 has already gone out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi.responses import Response, StreamingResponse

from rbee.common.errors import RbeeError
from rbee.contracts.errors import ErrorBody, read_error
from rbee.queen.metrics import CLIENT_CLOSED, RequestTrack


class Finishing(Protocol):
    def finish(self, failed: bool = False) -> None: ...


def sse_data(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


def loading_comment(model: str) -> bytes:
    return f": loading {model[:200]}\n\n".encode()


async def body_of(response: Response) -> bytes:
    """A response's whole body, streamed or not."""
    if isinstance(response, StreamingResponse):
        chunks = [
            c if isinstance(c, bytes) else str(c).encode() async for c in response.body_iterator
        ]
        return b"".join(chunks)
    return bytes(response.body)


def _error_event(body: bytes, status: int) -> bytes:
    message, code = read_error(status, body)
    return sse_data(ErrorBody.of(message, "server_error", code or f"http_{status}").model_dump())


async def loading_stream(
    task: asyncio.Future[Response],
    model: str,
    track: RequestTrack,
    interval_s: float,
) -> AsyncIterator[bytes]:
    """Comments every `interval_s` while `task` (the proxied request) waits for the model,
    then its answer. A client that leaves cancels the wait (and frees the worker's slot)."""
    response: Response | None = None
    try:
        while not task.done():
            yield loading_comment(model)
            await asyncio.wait({task}, timeout=interval_s)
        try:
            response = task.result()
        except RbeeError as exc:
            track.refused(exc.status_code)
            yield sse_data(exc.body())
            return
        if not isinstance(response, StreamingResponse) or response.status_code >= 400:
            yield _error_event(await body_of(response), response.status_code)
            return
        async for chunk in response.body_iterator:
            yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            track.refused(CLIENT_CLOSED)
        relay: Finishing | None = getattr(response, "relay", None)
        if relay is not None:  # its body may never have been read: free the slot all the same
            relay.finish()
