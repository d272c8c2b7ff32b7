"""`POST /v1/rerank` and `/v1/reranking` through an in-process queen: routed by model to the
workers of a reranker model (embedding workers that say `rerank`), refused with a 400 for a
model that is no reranker, listed in `/v1/models` apis. Workers are fakes on loopback ports
that record what reached them; the hive is a fake behind a transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee_testing.worker_servers import WorkerServers, hive_beat, worker_beat

RERANKED = {
    "model": "bge",
    "object": "list",
    "usage": {"prompt_tokens": 12, "total_tokens": 12},
    "results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.2}],
}
ASK = {"model": "bge", "query": "what is a panda?", "documents": ["a city", "a bear"]}


class Cluster:
    def __init__(self) -> None:
        self.reached: list[tuple[str, str, dict[str, Any]]] = []  # worker, path, body
        self.servers = WorkerServers(lambda name: self.worker(name))
        self.spawns: list[dict[str, Any]] = []
        self.app = create_app(
            QueenSettings.model_validate({"spawn_timeout": 5, "queue_timeout": 0.5}),
            transport=httpx.MockTransport(self.hive),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1:9", timeout=10
        )

    def worker(self, name: str) -> Any:
        async def handle(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            self.reached.append((name, request.url.path, body))
            if request.url.path in ("/v1/rerank", "/v1/reranking"):
                return httpx.Response(200, json=RERANKED)
            return httpx.Response(200, json={"object": "list", "data": []})

        return handle

    async def hive(self, request: httpx.Request) -> httpx.Response:
        spec = json.loads(request.content)
        self.spawns.append(spec)
        worker_id = f"spawned-{len(self.spawns)}"

        async def come_up() -> None:
            await asyncio.sleep(0.05)  # the worker reads its file: a reranker
            await self.heartbeat(worker_id, spec["model"], embedding=True, rerank=True)

        asyncio.get_running_loop().create_task(come_up())
        url = f"http://{worker_id}:8080"
        return httpx.Response(
            201, json={"worker_id": worker_id, "pid": 1, "port": 8080, "url": url}
        )

    async def heartbeat(self, worker_id: str, model: str, **extra: Any) -> None:
        port = await self.servers.port(worker_id)
        body = worker_beat(worker_id, port, model, "ready", hive_id="h1", **extra)
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()

    async def rerank(self, path: str = "/v1/rerank", **body: Any) -> httpx.Response:
        return await self.client.post(path, json={**ASK, **body})

    async def apis(self) -> dict[str, list[str]]:
        data = (await self.client.get("/v1/models")).json()["data"]
        return {m["id"]: m["rbee"]["apis"] for m in data}


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    yield c
    await c.client.aclose()
    await c.app.state.queen.aclose()
    await c.servers.aclose()


async def test_rerank_and_its_alias_reach_the_reranker_models_worker(cluster: Cluster) -> None:
    await cluster.heartbeat("chat1", "smol")
    await cluster.heartbeat("emb1", "nomic", embedding=True)
    await cluster.heartbeat("rr1", "bge", embedding=True, rerank=True)
    for path in ("/v1/rerank", "/v1/reranking"):
        answer = await cluster.rerank(path, top_n=1)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-rbee-worker-id"] == "rr1"
        assert answer.json()["results"][0] == {"index": 1, "relevance_score": 0.9}
    assert [(w, p) for w, p, _ in cluster.reached] == [
        ("rr1", "/v1/rerank"),
        ("rr1", "/v1/reranking"),
    ]
    assert cluster.reached[0][2] == {**ASK, "top_n": 1}  # the body as the client sent it


async def test_models_list_rerank_for_a_reranker_only(cluster: Cluster) -> None:
    await cluster.heartbeat("chat1", "smol")
    await cluster.heartbeat("emb1", "nomic", embedding=True)
    await cluster.heartbeat("rr1", "bge", embedding=True, rerank=True)
    apis = await cluster.apis()
    assert apis["bge"] == ["rerank"]
    assert apis["nomic"] == ["embeddings"]
    assert "rerank" not in apis["smol"]


@pytest.mark.parametrize("model", ["smol", "nomic"])
async def test_rerank_on_a_model_that_is_no_reranker_is_400_naming_why(
    cluster: Cluster, model: str
) -> None:
    await cluster.heartbeat("chat1", "smol")
    await cluster.heartbeat("emb1", "nomic", embedding=True)
    refused = await cluster.rerank(model=model)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "model_not_reranker"
    assert error["param"] == "model"
    assert model in error["message"]
    assert "rank" in error["message"]
    assert cluster.reached == []  # no worker was bothered


async def test_rerank_of_an_unknown_model_is_404(cluster: Cluster) -> None:
    await cluster.heartbeat("rr1", "bge", embedding=True, rerank=True)
    missing = await cluster.rerank(model="nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_a_cold_reranker_a_hive_has_gets_an_embedding_worker_started(
    cluster: Cluster,
) -> None:
    (await cluster.client.post("/v1/hive-heartbeat", json=hive_beat(["bge"]))).raise_for_status()
    answer = await cluster.rerank()
    assert answer.status_code == 200, answer.text
    assert [s["model"] for s in cluster.spawns] == ["bge"]
    assert cluster.spawns[0]["embedding"] is True
    assert answer.headers["x-rbee-worker-id"] == "spawned-1"
    assert (await cluster.apis())["bge"] == ["rerank"]
