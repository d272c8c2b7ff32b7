"""A token-less local queen (and hive and worker) that a web page in the same browser cannot
drive: the exact attack of issue 10 and its variants, in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.hive.app import create_app as create_hive
from rbee.hive.settings import HiveSettings
from rbee.worker.app import create_app as create_worker
from rbee.worker.settings import WorkerSettings
from rbee_testing.fake_engine import FakeEngine

from .conftest import ClientFactory

EVIL = {
    "worker": {
        "id": "evil",
        "model_id": "smollm2-135m-instruct",
        "port": 443,
        "host": "attacker.example",
        "slots": 64,
        "status": "ready",
        "version": "1",
    },
    "timestamp": "2026-01-01T00:00:00Z",
}


async def workers(queen: httpx.AsyncClient) -> list[str]:
    return [w["id"] for w in (await queen.get("/v1/workers")).json()["workers"]]


async def test_a_text_plain_heartbeat_is_415_and_registers_nothing(
    queen: httpx.AsyncClient,
) -> None:
    response = await queen.post(
        "/v1/worker-heartbeat", content=json.dumps(EVIL), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    form = await queen.post("/v1/worker-heartbeat", data={"worker": "evil"})
    assert form.status_code == 415
    bare = await queen.post("/v1/worker-heartbeat", content=b"{}")  # no content type at all
    assert bare.status_code == 415
    assert await workers(queen) == []


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:7833", "10.0.0.5:7833"])
async def test_a_foreign_host_is_refused_without_a_token(
    queen: httpx.AsyncClient, host: str
) -> None:
    for method, path, body in [
        ("POST", "/v1/worker-heartbeat", EVIL),
        ("GET", "/v1/workers", None),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
    ]:
        response = await queen.request(method, path, json=body, headers={"host": host})
        assert response.status_code == 421, (method, path)
        assert response.json()["error"]["code"] == "host_not_allowed"
    assert await workers(queen) == []


@pytest.mark.parametrize("host", ["127.0.0.1:7833", "localhost:7833", "[::1]:7833", "127.0.0.2"])
async def test_loopback_names_and_addresses_are_served(queen: httpx.AsyncClient, host: str) -> None:
    response = await queen.get("/v1/workers", headers={"host": host})
    assert response.status_code == 200


async def test_allowed_hosts_are_served_and_a_token_lifts_the_host_check(
    make_client: ClientFactory,
) -> None:
    allowed = make_client(allowed_host=["queen.lan"])
    assert (await allowed.get("/v1/workers", headers={"host": "queen.lan:7833"})).status_code == 200
    assert (await allowed.get("/v1/workers", headers={"host": "other.lan"})).status_code == 421

    tokened = make_client(token="s3cret")
    headers = {"host": "queen.lan", "authorization": "Bearer s3cret"}
    assert (await tokened.get("/v1/workers", headers=headers)).status_code == 200


async def test_a_foreign_origin_is_refused_on_state_changing_requests(
    queen: httpx.AsyncClient,
) -> None:
    foreign = {"origin": "https://attacker.example"}
    beat = await queen.post("/v1/worker-heartbeat", json=EVIL, headers=foreign)
    assert beat.status_code == 403
    assert beat.json()["error"]["code"] == "foreign_origin"
    for method, path in [
        ("DELETE", "/v1/workers/x"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/keys"),
        ("DELETE", "/v1/jobs/x"),
    ]:
        response = await queen.request(method, path, json={}, headers=foreign)
        assert response.status_code == 403, (method, path)
    null_origin = await queen.post("/v1/worker-heartbeat", json=EVIL, headers={"origin": "null"})
    assert null_origin.status_code == 403
    assert await workers(queen) == []
    # The same origin (the dashboard the queen serves itself) is fine.
    same = await queen.post(
        "/v1/worker-heartbeat", json=EVIL, headers={"origin": "http://127.0.0.1:9"}
    )
    assert same.status_code == 200


async def test_a_cors_preflight_from_a_foreign_origin_gets_no_cors_headers(
    queen: httpx.AsyncClient,
) -> None:
    response = await queen.options(
        "/v1/worker-heartbeat",
        headers={
            "origin": "https://attacker.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert response.status_code == 403
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    # And no answer of the queen ever carries one, even to a simple cross-site GET.
    listed = await queen.get("/v1/workers", headers={"origin": "https://attacker.example"})
    assert not [h for h in listed.headers if h.lower().startswith("access-control-")]


@pytest.fixture
async def hive_and_worker(tmp_path: Path) -> AsyncIterator[list[httpx.AsyncClient]]:
    hive = create_hive(
        HiveSettings(
            queen_url="http://127.0.0.1:9",
            models_dir=tmp_path / "models",
            log_dir=tmp_path / "logs",
        )
    )
    worker = create_worker(
        WorkerSettings(model="fake", port=9, queen_url="http://127.0.0.1:9"),
        engine_factory=FakeEngine,
    )
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=hive), base_url="http://127.0.0.1:9"
        ) as h,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=worker), base_url="http://127.0.0.1:9"
        ) as w,
    ):
        yield [h, w]


async def test_the_hive_and_the_worker_follow_the_same_rules(
    hive_and_worker: list[httpx.AsyncClient],
) -> None:
    hive, worker = hive_and_worker
    spawn: dict[str, Any] = {"model": "x"}
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    for client, path, body in [
        (hive, "/v1/workers/spawn", spawn),
        (worker, "/v1/chat/completions", chat),
    ]:
        plain = await client.post(
            path, content=json.dumps(body), headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 415, path
        rebound = await client.post(path, json=body, headers={"host": "attacker.example"})
        assert rebound.status_code == 421, path
        cross = await client.post(path, json=body, headers={"origin": "http://attacker.example"})
        assert cross.status_code == 403, path


async def test_bodies_over_the_limit_are_413_without_being_read_whole(
    make_client: ClientFactory,
) -> None:
    queen = make_client(max_body_bytes=64 * 1024)
    big = b"{" + b" " * (65 * 1024) + b"}"
    chat = await queen.post(
        "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
    )
    assert chat.status_code == 413

    sent = 0

    async def trickle() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        nonlocal sent
        for _ in range(1000):
            sent += 1
            yield b" " * 1024

    beat = await queen.post(
        "/v1/worker-heartbeat", content=trickle(), headers={"content-type": "application/json"}
    )
    assert beat.status_code == 413
    assert sent < 200  # the heartbeat limit (64 KiB) stopped reading long before the end
    assert (await queen.get("/health")).status_code == 200
