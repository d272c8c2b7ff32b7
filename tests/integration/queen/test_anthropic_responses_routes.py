"""The queen's Anthropic Messages and OpenAI Responses paths, in process against a recording
worker (issue 25): routed by `model` to the worker's same path, `x-api-key` taken as the
bearer with the same roles, Anthropic's error shape for the queen's own errors and the gate's,
and the tokens of these APIs' usage counted for API keys."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee_testing.worker_servers import WorkerServers

TOKEN = "cluster-s3cret"
OPERATOR = {"authorization": f"Bearer {TOKEN}"}
MESSAGE = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"}


class Worker:
    """Answers each API as llama.cpp would, recording the path and body it was sent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.seen.append((request.url.path, body))
        path = request.url.path
        if path.endswith(("/count_tokens", "/input_tokens")):
            return httpx.Response(200, json={"input_tokens": 7})
        if path == "/v1/messages" and body.get("stream"):
            events = [
                ("message_start", {"message": {"usage": {"input_tokens": 5, "output_tokens": 0}}}),
                ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "x"}}),
                ("message_delta", {"usage": {"output_tokens": 3}}),
                ("message_stop", {}),
            ]
            sse = "".join(
                f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"
                for kind, data in events
            )
            return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
        if path == "/v1/messages":
            usage = {"input_tokens": 5, "output_tokens": 3}
            return httpx.Response(200, json={"type": "message", "content": [], "usage": usage})
        usage = {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}
        return httpx.Response(200, json={"object": "response", "output": [], "usage": usage})


@pytest.fixture
def worker() -> Worker:
    return Worker()


@pytest.fixture
async def queen(tmp_path: Path, worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    servers = WorkerServers(lambda name: worker.handle)
    port = await servers.port("w1")
    app = create_app(QueenSettings(token=TOKEN, data_dir=tmp_path / "queen"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
    ) as client:
        beat = {
            "worker": {"id": "w1", "model_id": "m", "port": port, "status": "ready", "version": "1"}
        }
        answer = await client.post("/v1/worker-heartbeat", json=beat, headers=OPERATOR)
        assert answer.status_code == 200
        yield client
        await app.state.queen.aclose()
    await servers.aclose()


async def key_for(queen: httpx.AsyncClient, name: str) -> str:
    response = await queen.post("/v1/keys", json={"name": name}, headers=OPERATOR)
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def state_of(client: httpx.AsyncClient) -> QueenState:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    state: QueenState = transport.app.state.queen  # type: ignore[attr-defined]
    return state


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", MESSAGE),
        ("/v1/messages/count_tokens", {"model": "m", "messages": MESSAGE["messages"]}),
        ("/v1/responses", {"model": "m", "input": "hi"}),
        ("/v1/responses/input_tokens", {"model": "m", "input": "hi"}),
    ],
)
async def test_each_path_goes_to_the_models_worker_at_the_same_path(
    queen: httpx.AsyncClient, worker: Worker, path: str, body: dict[str, Any]
) -> None:
    answer = await queen.post(path, json=body, headers={**OPERATOR, **ANTHROPIC_HEADERS})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-rbee-worker-id"] == "w1"
    assert worker.seen[-1] == (path, body), "passed on as it came"


async def test_an_api_key_in_x_api_key_is_taken_as_the_bearer(
    queen: httpx.AsyncClient, worker: Worker
) -> None:
    key = await key_for(queen, "claude")
    answer = await queen.post("/v1/messages", json=MESSAGE, headers={"x-api-key": key})
    assert answer.status_code == 200, answer.text
    # The same role as with Authorization: inference only.
    listed = await queen.get("/v1/keys", headers={"x-api-key": key})
    assert listed.status_code == 403
    # The cluster token there too.
    assert (await queen.get("/v1/keys", headers={"x-api-key": TOKEN})).status_code == 200


async def test_gate_refusals_on_messages_are_in_anthropics_shape(queen: httpx.AsyncClient) -> None:
    answer = await queen.post("/v1/messages", json=MESSAGE, headers={"x-api-key": "wrong"})
    assert answer.status_code == 401
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "authentication_error"
    # Other paths keep OpenAI's shape.
    other = await queen.post("/v1/responses", json={"model": "m", "input": "hi"})
    assert other.status_code == 401
    assert other.json()["error"]["type"] == "authentication_error"
    assert "type" not in other.json()


async def test_the_queens_own_errors_on_messages_are_in_anthropics_shape(
    queen: httpx.AsyncClient,
) -> None:
    unknown = await queen.post("/v1/messages", json={**MESSAGE, "model": "nope"}, headers=OPERATOR)
    assert unknown.status_code == 404
    assert unknown.json() == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": unknown.json()["error"]["message"],
            "code": "model_not_found",
        },
    }
    bad = await queen.post(
        "/v1/messages", content=b"{", headers={**OPERATOR, "content-type": "application/json"}
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    # On Responses the same error is OpenAI's.
    other = await queen.post(
        "/v1/responses", json={"model": "nope", "input": "x"}, headers=OPERATOR
    )
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "model_not_found"


async def test_a_worker_that_fails_is_an_api_error_in_anthropics_shape(
    queen: httpx.AsyncClient,
) -> None:
    beat = {
        "worker": {"id": "w2", "model_id": "gone", "port": 9, "status": "ready", "version": "1"}
    }
    assert (
        await queen.post("/v1/worker-heartbeat", json=beat, headers=OPERATOR)
    ).status_code == 200
    answer = await queen.post("/v1/messages", json={**MESSAGE, "model": "gone"}, headers=OPERATOR)
    assert answer.status_code in (502, 503), answer.text
    kind = "api_error" if answer.status_code == 502 else "overloaded_error"
    assert answer.json()["error"]["type"] == kind


@pytest.mark.parametrize(
    ("path", "body", "tokens"),
    [
        ("/v1/messages", MESSAGE, 8),
        ("/v1/messages", {**MESSAGE, "stream": True}, 8),
        ("/v1/responses", {"model": "m", "input": "hi"}, 6),
    ],
)
async def test_an_api_keys_tokens_are_counted_from_these_apis_usage(
    queen: httpx.AsyncClient, worker: Worker, path: str, body: dict[str, Any], tokens: int
) -> None:
    key = await key_for(queen, "counted")
    answer = await queen.post(path, json=body, headers={"x-api-key": key})
    assert answer.status_code == 200
    if body.get("stream"):
        assert "message_delta" in answer.text, "the stream passes whole"
        assert "stream_options" not in worker.seen[-1][1], "nothing asked on the key's behalf"
    await state_of(queen).keys.flush()
    (entry,) = (await queen.get("/v1/keys", headers=OPERATOR)).json()["keys"]
    assert entry["tokens"] == tokens
