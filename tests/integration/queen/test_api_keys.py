"""API keys on a queen with a cluster token: inference only, revocable, hashed, counted, kept."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee.testing.worker_servers import WorkerServers

TOKEN = "cluster-s3cret"
OPERATOR = {"authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Worker:
    """One fake worker behind the queen's transport, recording what the queen sent it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        if not body.get("stream"):
            answer = {"id": "c", "object": "chat.completion", "choices": [], "usage": usage}
            return httpx.Response(200, json=answer)
        chunks = [{"choices": [{"delta": {"content": "Paris"}}]}]
        if body.get("stream_options", {}).get("include_usage"):
            chunks.append({"choices": [], "usage": usage})
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


def queen_app(data_dir: Path) -> FastAPI:
    return create_app(QueenSettings(token=TOKEN, data_dir=data_dir))


@pytest.fixture
def worker() -> Worker:
    return Worker()


@pytest.fixture
async def queen(tmp_path: Path, worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    servers = WorkerServers(lambda name: worker.handle)
    port = await servers.port("w1")
    app = queen_app(tmp_path / "queen")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
    ) as client:
        beat = {
            "worker": {"id": "w1", "model_id": "m", "port": port, "status": "ready", "version": "1"}
        }
        assert (
            await client.post("/v1/worker-heartbeat", json=beat, headers=OPERATOR)
        ).status_code == 200
        yield client
        await app.state.queen.aclose()
    await servers.aclose()


def state_of(client: httpx.AsyncClient) -> QueenState:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    state: QueenState = transport.app.state.queen  # type: ignore[attr-defined]
    return state


async def create(queen: httpx.AsyncClient, name: str, **fields: Any) -> str:
    response = await queen.post("/v1/keys", json={"name": name, **fields}, headers=OPERATOR)
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


async def test_a_key_runs_inference_and_nothing_else(queen: httpx.AsyncClient) -> None:
    key = await create(queen, "alice")

    assert (await queen.get("/v1/models", headers=bearer(key))).status_code == 200
    chat = await queen.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert chat.status_code == 200
    text = await queen.post(
        "/v1/completions", json={"model": "m", "prompt": "hi"}, headers=bearer(key)
    )
    assert text.status_code == 200

    for method, path in [
        ("POST", "/v1/worker-heartbeat"),
        ("POST", "/v1/hive-heartbeat"),
        ("GET", "/v1/workers"),
        ("DELETE", "/v1/workers/w1"),
        ("GET", "/v1/hives"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("DELETE", "/v1/keys/alice"),
    ]:
        response = await queen.request(method, path, json={}, headers=bearer(key))
        assert response.status_code == 403, (method, path)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("permission_error", "forbidden_for_api_key")
        assert error["message"]
    # Nothing changed behind the refusals.
    assert [
        w["id"] for w in (await queen.get("/v1/workers", headers=OPERATOR)).json()["workers"]
    ] == ["w1"]


async def test_unknown_and_revoked_keys_are_401(queen: httpx.AsyncClient) -> None:
    key = await create(queen, "bob")
    assert (await queen.get("/v1/models", headers=bearer(key))).status_code == 200

    revoked = await queen.delete("/v1/keys/bob", headers=OPERATOR)
    assert revoked.status_code == 200
    for credential in (key, key[:-1] + "x", "rbee_sk_nope", "nope"):
        response = await queen.get("/v1/models", headers=bearer(credential))
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert (await queen.delete("/v1/keys/bob", headers=OPERATOR)).status_code == 404


async def test_listing_shows_usage_and_never_the_secret(
    queen: httpx.AsyncClient, worker: Worker
) -> None:
    key = await create(queen, "carol")
    await queen.post("/v1/chat/completions", json=CHAT, headers=bearer(key))  # 7 tokens
    stream = await queen.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(key)
    )
    # The queen asked the worker for usage on the key's behalf, and kept that chunk from a
    # client that did not ask for it.
    assert worker.bodies[-1]["stream_options"] == {"include_usage": True}
    assert '"usage"' not in stream.text
    assert "Paris" in stream.text
    state_of(queen).keys.flush()

    listed = await queen.get("/v1/keys", headers=OPERATOR)
    assert key not in listed.text
    (entry,) = listed.json()["keys"]
    assert entry["name"] == "carol"
    assert (entry["requests"], entry["tokens"]) == (2, 14)
    assert entry["last_used"] is not None
    assert "key" not in entry


async def test_keys_are_stored_hashed_and_survive_a_restart(tmp_path: Path, worker: Worker) -> None:
    first = queen_app(tmp_path / "queen")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=first), base_url="http://127.0.0.1:9"
    ) as client:
        key = await create(client, "dave", expires_days=30)
        await client.get("/v1/models", headers=bearer(key))
        first.state.queen.keys.close()

    database = tmp_path / "queen" / "keys.sqlite3"
    raw = database.read_bytes()
    assert key.encode() not in raw
    with sqlite3.connect(database) as db:
        (stored,) = db.execute("SELECT hash, requests FROM api_keys WHERE name = 'dave'")
    assert stored == (hashlib.sha256(key.encode()).hexdigest(), 1)
    assert database.stat().st_mode & 0o077 == 0  # readable by the queen's user only

    second = queen_app(tmp_path / "queen")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=second), base_url="http://127.0.0.1:9"
    ) as client:
        assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
        (entry,) = (await client.get("/v1/keys", headers=OPERATOR)).json()["keys"]
        assert entry["expires"] is not None
        assert entry["requests"] == 2


async def test_bad_key_requests_are_clear_errors(queen: httpx.AsyncClient) -> None:
    await create(queen, "erin")
    again = await queen.post("/v1/keys", json={"name": "erin"}, headers=OPERATOR)
    assert again.status_code == 409
    for body in ({"name": "no spaces"}, {"name": ""}, {"name": "ok", "expires_days": 0}, {}):
        response = await queen.post("/v1/keys", json=body, headers=OPERATOR)
        assert response.status_code == 422, body


async def test_no_token_or_key_is_ever_logged(
    queen: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = await create(queen, "frank")
    await queen.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    await queen.get("/v1/workers", headers=bearer(key))
    await queen.get("/v1/models", headers=bearer(key + "x"))
    await queen.delete("/v1/keys/frank", headers=OPERATOR)
    assert key not in caplog.text
    assert TOKEN not in caplog.text
