"""The queen's registry endpoints, in-process."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from rbee_testing.clock import FakeClock

from .conftest import ClientFactory


def hb(worker_id: str, model: str = "m", status: str = "ready", **extra: Any) -> dict[str, Any]:
    worker = {"id": worker_id, "model_id": model, "port": 8080, "status": status, "version": "1"}
    return {"worker": {**worker, **extra}, "timestamp": "2026-01-01T00:00:00Z"}


async def test_health_is_open_and_reports_version(make_client: ClientFactory) -> None:
    client = make_client(token="s3cret")
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["version"]


async def test_heartbeat_registers_a_worker_with_every_field(queen: httpx.AsyncClient) -> None:
    ack = await queen.post("/v1/worker-heartbeat", json=hb("w1", hive_id="h1", slots=2))
    assert ack.status_code == 200
    assert ack.json()["status"] == "ok"
    listed = (await queen.get("/v1/workers")).json()["workers"]
    assert len(listed) == 1
    view = listed[0]
    assert view["id"] == "w1"
    assert view["hive_id"] == "h1"
    assert view["slots"] == 2
    assert view["host"] == "127.0.0.1"
    assert view["online"] is True
    assert view["available"] is True
    assert view["last_seen_s"] >= 0
    assert view["timestamp"] == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ""),
        ("port", 0),
        ("port", 70000),
        ("status", "dancing"),
        ("in_flight", -1),
        ("slots", 0),
        ("host", "box:8080"),
        ("host", "http://box"),
    ],
)
async def test_malformed_heartbeat_is_400_naming_the_field(
    queen: httpx.AsyncClient, field: str, value: object
) -> None:
    response = await queen.post("/v1/worker-heartbeat", json=hb("w1", **{field: value}))
    assert response.status_code == 400
    body = response.json()
    assert any(err["loc"][-1] == field for err in body["detail"])
    assert field in body["error"]["message"]
    assert (await queen.get("/health")).status_code == 200


async def test_heartbeat_that_is_not_json_is_400(queen: httpx.AsyncClient) -> None:
    response = await queen.post(
        "/v1/worker-heartbeat", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "error" in response.json()


async def test_filters_by_model_and_availability(queen: httpx.AsyncClient) -> None:
    await queen.post("/v1/worker-heartbeat", json=hb("a1", model="a"))
    await queen.post("/v1/worker-heartbeat", json=hb("a2", model="a", status="busy"))
    await queen.post("/v1/worker-heartbeat", json=hb("b1", model="b"))
    by_model = (await queen.get("/v1/workers", params={"model_id": "a"})).json()["workers"]
    assert [w["id"] for w in by_model] == ["a1", "a2"]
    free = (await queen.get("/v1/workers", params={"available": "true"})).json()["workers"]
    assert [w["id"] for w in free] == ["a1", "b1"]
    both = await queen.get("/v1/workers", params={"model_id": "a", "available": "true"})
    assert [w["id"] for w in both.json()["workers"]] == ["a1"]


async def test_get_and_delete_one_worker(queen: httpx.AsyncClient) -> None:
    await queen.post("/v1/worker-heartbeat", json=hb("w1"))
    got = await queen.get("/v1/workers/w1")
    assert got.status_code == 200
    assert got.json()["id"] == "w1"
    assert (await queen.delete("/v1/workers/w1")).status_code == 200
    missing = await queen.get("/v1/workers/w1")
    assert missing.status_code == 404
    assert "w1" in missing.json()["error"]["message"]
    assert (await queen.delete("/v1/workers/w1")).status_code == 404


async def test_stale_worker_shows_offline(queen: httpx.AsyncClient, clock: FakeClock) -> None:
    await queen.post("/v1/worker-heartbeat", json=hb("w1"))
    clock.advance(91)
    view = (await queen.get("/v1/workers/w1")).json()
    assert view["online"] is False
    assert view["available"] is False
    assert view["last_seen_s"] == pytest.approx(91, abs=0.01)


async def test_token_guards_everything_but_health(make_client: ClientFactory) -> None:
    client = make_client(token="s3cret")
    for method, path in [
        ("GET", "/v1/workers"),
        ("GET", "/v1/hives"),
        ("DELETE", "/v1/workers/x"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ]:
        response = await client.request(method, path, json={"model": "m"})
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
    wrong = await client.get("/v1/workers", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    chat = {"model": "m", "messages": []}
    wrong = await client.post("/v1/chat/completions", json=chat, headers={"Authorization": "x"})
    assert wrong.status_code == 401
    denied = await client.post("/v1/worker-heartbeat", json=hb("w1"))
    assert denied.status_code == 401
    for docs in ("/openapi.json", "/docs", "/redoc"):
        assert (await client.get(docs)).status_code in (401, 404), docs
    good = {"Authorization": "Bearer s3cret"}
    assert (
        await client.post("/v1/worker-heartbeat", json=hb("w1"), headers=good)
    ).status_code == 200
    assert (await client.get("/v1/workers", headers=good)).json()["workers"][0]["id"] == "w1"


async def test_hive_heartbeat_and_listing(queen: httpx.AsyncClient, clock: FakeClock) -> None:
    body = {
        "hive": {"id": "h1", "url": "http://127.0.0.1:9", "version": "0.1.0"},
        "devices": [
            {
                "id": "cpu:0",
                "kind": "cpu",
                "name": "cpu",
                "cores": 2,
                "memory_total_bytes": 100,
                "memory_free_bytes": 50,
            }
        ],
        "models": ["smollm2-135m-instruct"],
    }
    assert (await queen.post("/v1/hive-heartbeat", json=body)).status_code == 200
    hives = (await queen.get("/v1/hives")).json()["hives"]
    assert hives[0]["id"] == "h1"
    assert hives[0]["online"] is True
    assert hives[0]["devices"][0]["memory_free_bytes"] == 50
    clock.advance(100)
    assert (await queen.get("/v1/hives")).json()["hives"][0]["online"] is False
