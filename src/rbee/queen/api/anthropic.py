"""The queen's Anthropic Messages and OpenAI Responses paths: routed by `model` exactly like chat
completions (the proxy's admission queue, least-loaded worker, on-demand start, failover before
the first byte, its metrics and events), passed through to the worker byte for byte.

On `/v1/messages...` every error is in Anthropic's shape, the queen's own (unknown model, no
worker, queue full) and the worker's alike, and an error in the middle of a stream is an
`event: error`. Tokens served to an API key are read from these APIs' own usage fields.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from rbee.common import anthropic
from rbee.common.errors import RbeeError
from rbee.common.gate import API_KEY_SCOPE
from rbee.queen.state import QueenState
from rbee.queen.usage_apis import metered_events, whole_tokens

MESSAGES_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
RESPONSES_PATHS = ("/v1/responses", "/v1/responses/input_tokens")


def endpoint(path: str) -> Callable[[Request], Awaitable[Response]]:
    messages = anthropic.is_anthropic_path(path)

    async def forward(request: Request) -> Response:
        state: QueenState = request.app.state.queen
        # The proxy meters OpenAI's usage; these APIs' is metered here.
        key: str | None = request.scope.pop(API_KEY_SCOPE, None)
        try:
            response = await state.proxy.forward(request, path)
        except RbeeError as exc:
            if messages:
                return anthropic.error_response(exc)
            raise
        record = (lambda tokens: state.proxy.usage(key, tokens)) if key is not None else None
        if isinstance(response, StreamingResponse):
            chunks: AsyncGenerator[bytes, None] = response.body_iterator  # type: ignore[assignment]
            if messages:
                chunks = _anthropic_errors(chunks)
            if record is not None:
                chunks = metered_events(chunks, record)
            response.body_iterator = chunks
            return response
        if response.status_code >= 400 and messages:
            body = anthropic.reshape(response.status_code, bytes(response.body))
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            return Response(body, response.status_code, headers, "application/json")
        tokens = whole_tokens(bytes(response.body)) if response.status_code == 200 else None
        if record is not None and tokens is not None:
            record(tokens)
        return response

    return forward


async def _anthropic_errors(
    chunks: AsyncGenerator[bytes, None],
) -> AsyncGenerator[bytes, None]:
    """The queen's stream errors (`data: {"error": ...}`, sent when a worker breaks off or a
    start fails while the client waits) as Anthropic's `event: error`."""
    async with aclosing(chunks):
        async for chunk in chunks:
            if chunk.startswith(b'data: {"error"'):
                try:
                    error = json.loads(chunk[6:])["error"]
                    chunk = anthropic.sse_error(_status(error), str(error.get("message")))
                except (ValueError, KeyError, TypeError, AttributeError):
                    pass
            yield chunk


def _status(error: dict[str, object]) -> int:
    kind = error.get("type")
    return 429 if kind == "rate_limit_error" else 400 if kind == "invalid_request_error" else 503
