"""API keys on a queen with a cluster token: inference only, revocable, hashed, counted, kept."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.queen.api import keys as keys_api
from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee_testing.worker_servers import WorkerServers

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
    await state_of(queen).keys.flush()

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
        await first.state.queen.keys.aclose()

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
        assert response.status_code == 400, body


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


@pytest.mark.parametrize(("umask", "dir_mode"), [(0o022, 0o755), (0o000, 0o777)])
async def test_every_file_of_the_store_is_the_owners_only(
    tmp_path: Path, worker: Worker, umask: int, dir_mode: int
) -> None:
    data_dir = tmp_path / "queen"
    data_dir.mkdir()
    data_dir.chmod(dir_mode)
    old_umask = os.umask(umask)
    try:
        app = queen_app(data_dir)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
        ) as client:
            key = await create(client, "grace")
            assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
            await app.state.queen.keys.flush()  # a write: the -wal and -shm files exist now
            files = {p.name: p.stat().st_mode & 0o777 for p in data_dir.iterdir()}
            await app.state.queen.keys.aclose()
    finally:
        os.umask(old_umask)
    assert {"keys.sqlite3", "keys.sqlite3-wal", "keys.sqlite3-shm"} <= set(files)
    assert files == dict.fromkeys(files, 0o600)


async def test_an_old_stores_side_files_become_the_owners_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "queen"
    data_dir.mkdir()
    for suffix in ("", "-wal", "-shm"):  # as an earlier version left them
        (data_dir / f"keys.sqlite3{suffix}").touch()
        (data_dir / f"keys.sqlite3{suffix}").chmod(0o644)
    app = create_app(QueenSettings(token=TOKEN, data_dir=data_dir))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
    ) as client:
        await create(client, "heidi")
        modes = {p.name: p.stat().st_mode & 0o777 for p in data_dir.iterdir()}
        await app.state.queen.keys.aclose()
    assert modes == dict.fromkeys(["keys.sqlite3", "keys.sqlite3-wal", "keys.sqlite3-shm"], 0o600)


async def test_a_queen_without_a_token_refuses_to_create_keys(tmp_path: Path) -> None:
    app = create_app(QueenSettings(data_dir=tmp_path / "queen"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
    ) as client:
        response = await client.post("/v1/keys", json={"name": "ivan"})
        listed = await client.get("/v1/keys")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "keys_not_checked"
    assert "no cluster token" in error["message"]
    assert "RBEE_TOKEN" in error["message"]
    assert listed.json()["keys"] == []


async def test_queens_on_two_ports_keep_separate_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clusters of one user (two queens: two ports) never accept each other's keys."""
    monkeypatch.setenv("HOME", str(tmp_path))
    first, second = (create_app(QueenSettings(token=TOKEN, port=port)) for port in (7833, 17833))
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=first), base_url="http://127.0.0.1:7833"
        ) as one,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=second), base_url="http://127.0.0.1:17833"
        ) as two,
    ):
        key = await create(one, "judy")
        assert (await one.get("/v1/models", headers=bearer(key))).status_code == 200
        assert (await two.get("/v1/models", headers=bearer(key))).status_code == 401
        assert (await two.get("/v1/keys", headers=OPERATOR)).json()["keys"] == []
        await create(two, "judy")  # the same name is free there
        await first.state.queen.keys.aclose()
        await second.state.queen.keys.aclose()
    share = tmp_path / ".local" / "share" / "rbee"
    assert (share / "queen" / "keys.sqlite3").is_file()  # the default port's path is unchanged
    assert (share / "queen-17833" / "keys.sqlite3").is_file()


async def test_counts_made_while_the_operator_lists_keys_all_arrive(
    queen: httpx.AsyncClient,
) -> None:
    """The gate counts each request on the event loop while `GET /v1/keys` writes the counts:
    every count arrives and no listing fails (a thread used to take the loop's dict from under
    it: counts were lost, or "dictionary changed size during iteration")."""
    state = state_of(queen)
    names = [
        (await queen.post("/v1/keys", json={"name": f"k{i}"}, headers=OPERATOR)).json()["name"]
        for i in range(20)
    ]
    counted, listings = 0, 0
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the thread and the loop take turns as often as they can
    try:

        async def count() -> None:
            nonlocal counted
            while listings < 400:
                for name in names:
                    state.keys.count_request(name)  # what the gate does for each request
                counted += len(names)
                await asyncio.sleep(0)

        async def list_keys() -> None:
            nonlocal listings
            while listings < 400:
                await keys_api.list_keys(state)  # the route's own function, as GET /v1/keys
                listings += 1

        await asyncio.gather(count(), list_keys())
    finally:
        sys.setswitchinterval(switch)
    listed = (await queen.get("/v1/keys", headers=OPERATOR)).json()["keys"]
    assert sum(entry["requests"] for entry in listed) == counted


async def test_the_queen_answers_while_the_key_store_is_busy(queen: httpx.AsyncClient) -> None:
    """The first request with a key reads the store from disk: in a thread, so a slow disk
    (here: a write holding the store) stalls that request only, never the whole queen."""
    store = state_of(queen).keys
    await store.aclose()  # as at start-up: not read yet
    busy, answered, gave_up = threading.Event(), threading.Event(), threading.Event()

    def slow_write() -> None:
        with store._lock:
            busy.set()
            if not answered.wait(30):  # the test's deadline, should the queen never answer
                gave_up.set()

    holder = threading.Thread(target=slow_write)
    holder.start()
    busy.wait()
    keyed = asyncio.create_task(queen.get("/v1/models", headers=bearer("rbee_sk_" + "x" * 43)))
    await asyncio.wait({keyed}, timeout=0.5)  # it reaches the gate, which reads the store
    assert not keyed.done()
    health = await queen.get("/health")
    answered.set()
    holder.join()
    assert health.status_code == 200
    assert not gave_up.is_set(), "the queen stalled while the key store was busy"
    assert (await keyed).status_code == 401
