"""Ollama's API on an in-process queen with a cluster token: the credentials of the OpenAI API
(an API key or the cluster token as the bearer token), the key's tokens counted, errors in
Ollama's shape. The worker is a fake on a loopback port, recording what the queen sent it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee_testing.worker_servers import WorkerServers

TOKEN = "cluster-s3cret"
OPERATOR = {"authorization": f"Bearer {TOKEN}"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


class Worker:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.refuse: dict[str, Any] | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.refuse is not None:
            return httpx.Response(400, json={"error": self.refuse})
        chunks = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"index": 0, "delta": {"content": "Par"}}]},
            {"choices": [{"index": 0, "delta": {"content": "is"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": USAGE},
        ]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


@pytest.fixture
def worker() -> Worker:
    return Worker()


@pytest.fixture
async def app(tmp_path: Path, worker: Worker) -> AsyncIterator[Any]:
    servers = WorkerServers(lambda name: worker.handle)
    port = await servers.port("w1")
    app = create_app(QueenSettings(token=TOKEN, data_dir=tmp_path / "queen"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9") as client:
        beat = {
            "worker": {"id": "w1", "model_id": "m", "port": port, "status": "ready", "version": "1"}
        }
        response = await client.post("/v1/worker-heartbeat", json=beat, headers=OPERATOR)
        assert response.status_code == 200
        created = await client.post("/v1/keys", json={"name": "alice"}, headers=OPERATOR)
        app.state.key = created.json()["key"]
        yield app
    await app.state.queen.aclose()
    await servers.aclose()


def client_for(app: Any, secret: str | None) -> ollama.AsyncClient:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return ollama.AsyncClient(
        host="http://127.0.0.1:9", headers=headers, transport=httpx.ASGITransport(app=app)
    )


async def test_an_api_key_or_the_cluster_token_and_nothing_else(app: Any, worker: Worker) -> None:
    for secret in (app.state.key, TOKEN):
        listed = await client_for(app, secret).list()
        assert [m.model for m in listed.models] == ["m"]
    for secret in (None, "rbee_sk_wrong"):
        with pytest.raises(ollama.ResponseError) as caught:
            await client_for(app, secret).list()
        assert caught.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as caught:
            await client_for(app, secret).chat("m", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 401
    assert worker.bodies == []


async def test_a_keys_tokens_are_counted_and_the_answer_is_ollamas(
    app: Any, worker: Worker
) -> None:
    client = client_for(app, app.state.key)
    answer = await client.chat("m", messages=[{"role": "user", "content": "Capital of France?"}])
    assert answer.message.content == "Paris"
    assert (answer.prompt_eval_count, answer.eval_count) == (5, 2)
    parts = [
        p
        async for p in await client.generate(
            "m", "Capital of France?", stream=True, options={"num_predict": 4, "num_ctx": 4096}
        )
    ]
    assert [p.response for p in parts] == ["Par", "is", ""]
    sent = worker.bodies[-1]
    assert sent["max_tokens"] == 4
    assert "num_ctx" not in sent
    await app.state.queen.keys.flush()
    listed = await httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
    ).get("/v1/keys", headers=OPERATOR)
    (entry,) = listed.json()["keys"]
    assert (entry["requests"], entry["tokens"]) == (2, 14)


async def test_load_time_options_are_named_in_a_header(app: Any) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9", headers=OPERATOR
    ) as http:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "options": {"num_ctx": 4096, "num_thread": 2},
        }
        streamed = await http.post("/api/chat", json=body)
        assert streamed.headers["content-type"] == "application/x-ndjson"
        assert streamed.headers["x-rbee-ignored-options"] == "num_ctx,num_thread"
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        assert lines[-1]["done"] is True
        assert "".join(line["message"]["content"] for line in lines) == "Paris"


async def test_errors_are_ollamas_shape_with_their_status(app: Any, worker: Worker) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9", headers=OPERATOR
    ) as http:
        unknown = await http.post(
            "/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        )
        assert unknown.status_code == 404
        assert isinstance(unknown.json()["error"], str)
        assert "nope" in unknown.json()["error"]
        bad = await http.post("/api/generate", json={"model": "m", "prompt": 3})
        assert bad.status_code == 400
        assert "prompt" in bad.json()["error"]
        worker.refuse = {"message": "temperature: too hot", "type": "invalid_request_error"}
        for stream in (True, False):
            refused = await http.post(
                "/api/chat",
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": "x"}],
                    "stream": stream,
                },
            )
            assert refused.status_code == 400
            assert refused.json() == {"error": "temperature: too hot"}
