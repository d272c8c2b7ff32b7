"""The queen client's parsing: SSE, error bodies, job requests."""

from __future__ import annotations

import json

import httpx
import pytest

from rbee.clients.queen import (
    JobFailed,
    QueenClient,
    QueenError,
    QueenHTTPError,
    QueenUnreachable,
)
from rbee.contracts.jobs import WorkerSpawnJob


def client_for(handler: httpx.MockTransport | None = None, **routes: httpx.Response) -> QueenClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return routes[f"{request.method} {request.url.path}".replace(" ", "_").replace("/", "_")]

    return QueenClient("http://q:1/", token="t", transport=handler or httpx.MockTransport(answer))


def sse_body(*chunks: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text="".join(chunks))


async def test_chat_stream_joins_pieces_and_stops_at_done() -> None:
    seen: list[httpx.Request] = []

    def queen(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        piece = {"choices": [{"index": 0, "delta": {"content": "Par"}}]}
        rest = {"choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": None}]}
        role_only = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
        return sse_body(
            ": keep-alive comment\n\n",
            f"data: {json.dumps(role_only)}\n\n",
            f"data: {json.dumps(piece)}\r\n\r\n",
            f"data:{json.dumps(rest)}\n\n",
            "data: [DONE]\n\n",
            f"data: {json.dumps(piece)}\n\n",  # nothing after [DONE] counts
        )

    async with QueenClient("http://q:1/", token="t", transport=httpx.MockTransport(queen)) as c:
        pieces = [p async for p in c.chat_stream("m", [{"role": "user", "content": "x"}])]

    assert pieces == ["Par", "is"]
    assert seen[0].headers["authorization"] == "Bearer t"
    assert str(seen[0].url) == "http://q:1/v1/chat/completions"


async def test_an_error_inside_the_stream_raises() -> None:
    error = {"error": {"message": "worker died", "type": "server_error", "code": "upstream_error"}}

    def queen(request: httpx.Request) -> httpx.Response:
        return sse_body(f"data: {json.dumps(error)}\n\n")

    async with QueenClient(transport=httpx.MockTransport(queen)) as client:
        with pytest.raises(QueenHTTPError, match="worker died") as raised:
            [p async for p in client.chat_stream("m", [])]
    assert raised.value.code == "upstream_error"


@pytest.mark.parametrize(
    ("response", "message", "code"),
    [
        (
            httpx.Response(404, json={"error": {"message": "nope", "code": "model_not_found"}}),
            "nope",
            "model_not_found",
        ),
        (httpx.Response(422, json={"detail": "bad field"}), "bad field", None),
        (httpx.Response(502, text="Bad Gateway"), "Bad Gateway", None),
        (httpx.Response(500, text=""), "HTTP 500", None),
    ],
)
async def test_error_bodies_become_a_message(
    response: httpx.Response, message: str, code: str | None
) -> None:
    async with QueenClient(transport=httpx.MockTransport(lambda _: response)) as client:
        with pytest.raises(QueenHTTPError) as raised:
            await client.workers()
    assert str(raised.value) == message
    assert raised.value.code == code
    assert raised.value.status == response.status_code


async def test_connection_refused_is_unreachable_with_the_url() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with QueenClient("http://127.0.0.1:9/", transport=httpx.MockTransport(refuse)) as c:
        with pytest.raises(QueenUnreachable, match=r"no queen answers at http://127.0.0.1:9$"):
            await c.health()


async def test_a_dropped_connection_is_a_queen_error_not_a_crash() -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed", request=request)

    async with QueenClient(transport=httpx.MockTransport(drop)) as client:
        with pytest.raises(QueenError, match="lost the connection"):
            await client.hives()


async def test_run_job_sends_only_set_fields_and_returns_the_result() -> None:
    bodies: list[object] = []

    def queen(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            bodies.append(json.loads(request.content))
            return httpx.Response(201, json={"job_id": "j", "sse_url": "/v1/jobs/j/stream"})
        return sse_body(
            'data: {"type": "log", "message": "hi"}\n\n',
            "data: not json\n\n",
            'data: {"type": "done", "result": {"worker_id": "w"}}\n\n',
        )

    async with QueenClient(transport=httpx.MockTransport(queen)) as client:
        result = await client.run_job(WorkerSpawnJob(operation="worker_spawn", model="m"))

    assert result == {"worker_id": "w"}
    assert bodies == [{"operation": "worker_spawn", "model": "m", "kv_cache_type": "auto"}]


async def test_a_job_stream_that_ends_without_a_result_fails() -> None:
    def queen(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json={"job_id": "j", "sse_url": "/v1/jobs/j/stream"})
        return sse_body('data: {"type": "log", "message": "hi"}\n\n')

    async with QueenClient(transport=httpx.MockTransport(queen)) as client:
        with pytest.raises(JobFailed, match="ended without a result"):
            await client.run_job(WorkerSpawnJob(operation="worker_spawn", model="m"))
