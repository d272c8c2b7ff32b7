"""The queen's OpenAI API in-process. Hives are played by an injected transport; each worker is
a small HTTP server on a loopback port (the queen's worker client is aiohttp, over real
sockets) whose answers come from the test's handler."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee.queen.upstream import UpstreamResponse
from rbee_testing.worker_servers import Handler, WorkerServers, hive_beat, worker_beat


def completion(worker: str, body: dict[str, Any]) -> httpx.Response:
    answer = {
        "id": "x",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {worker}"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "echo": {k: v for k, v in body.items() if k not in ("model", "messages")},
    }
    return httpx.Response(200, json=answer)


async def sse_chunks(n: int, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise httpx.ReadError("connection reset by peer")
        yield f'data: {{"n": {i}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


class Cluster:
    """Fake workers on loopback ports and a fake hive behind a transport; the queen is real."""

    def __init__(self) -> None:
        self.workers: dict[str, Handler] = {}
        self.servers = WorkerServers(self.workers.get)
        self.hive_spawns: list[dict[str, Any]] = []
        self.queen: httpx.AsyncClient | None = None
        self.app = create_app(
            QueenSettings.model_validate(
                {"queue_size": 2, "queue_timeout": 0.5, "spawn_timeout": 5, "cooldown": 30}
            ),
            transport=httpx.MockTransport(self.handle),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://127.0.0.1:9",
            timeout=10,
        )
        self.served = self.servers.served

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == "hive.test", "only hive traffic goes through the transport"
        return await self.hive(request)

    async def hive(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/workers/spawn"
        spec = json.loads(request.content)
        self.hive_spawns.append(spec)
        worker_id = f"spawned-{len(self.hive_spawns)}"
        self.workers[worker_id] = self.ok_worker(worker_id)

        async def come_up() -> None:
            await asyncio.sleep(0.05)
            embedding = spec.get("embedding", False)
            await self.heartbeat(
                worker_id, spec["model"], "ready", hive_id="h1", embedding=embedding
            )

        asyncio.get_running_loop().create_task(come_up())
        url = f"http://{worker_id}:8080"
        return httpx.Response(
            201, json={"worker_id": worker_id, "pid": 1, "port": 8080, "url": url}
        )

    def ok_worker(self, name: str) -> Handler:
        async def handler(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            if body.get("stream"):
                return httpx.Response(
                    200, content=sse_chunks(3), headers={"content-type": "text/event-stream"}
                )
            return completion(name, body)

        return handler

    async def heartbeat(
        self, worker_id: str, model: str = "m", status: str = "ready", **extra: Any
    ) -> None:
        port = await self.servers.port(worker_id)
        body = worker_beat(worker_id, port, model, status, **extra)
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()

    async def hive_heartbeat(self, models: list[str]) -> None:
        body = hive_beat(models)
        (await self.client.post("/v1/hive-heartbeat", json=body)).raise_for_status()

    async def chat(self, model: str = "m", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post("/v1/chat/completions", json=body)


def asking(n: int) -> list[dict[str, str]]:
    """The messages of conversation n: each its own prefix."""
    return [{"role": "user", "content": f"question {n}"}]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    yield c
    await c.client.aclose()
    await c.app.state.queen.aclose()
    await c.servers.aclose()


async def test_answer_names_its_worker_and_unknown_fields_pass_through(cluster: Cluster) -> None:
    cluster.workers["w1"] = cluster.ok_worker("w1")
    await cluster.heartbeat("w1")
    response = await cluster.chat(temperature=0, custom_knob={"a": 1})
    assert response.status_code == 200
    assert response.headers["x-rbee-worker-id"] == "w1"
    assert response.json()["choices"][0]["message"]["content"] == "from w1"
    assert response.json()["echo"] == {"temperature": 0, "custom_knob": {"a": 1}}


async def test_streams_pass_through_to_done(cluster: Cluster) -> None:
    cluster.workers["w1"] = cluster.ok_worker("w1")
    await cluster.heartbeat("w1")
    response = await cluster.chat(stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.count("data: ") == 4
    assert response.text.endswith("data: [DONE]\n\n")


async def test_requests_spread_over_equal_workers(cluster: Cluster) -> None:
    for name in ("w1", "w2"):
        cluster.workers[name] = cluster.ok_worker(name)
        await cluster.heartbeat(name)
    # Four conversations (the prefix policy keeps one conversation on one worker).
    served = [
        (await cluster.chat(messages=asking(i))).headers["x-rbee-worker-id"] for i in range(4)
    ]
    assert sorted(served) == ["w1", "w1", "w2", "w2"]


async def test_dead_worker_is_stepped_around_and_benched(cluster: Cluster) -> None:
    cluster.workers["alive"] = cluster.ok_worker("alive")
    await cluster.heartbeat("alive")
    await cluster.heartbeat("dead")  # registered, but it drops every connection
    for i in range(4):
        response = await cluster.chat(messages=asking(i))
        assert response.status_code == 200
        assert response.headers["x-rbee-worker-id"] == "alive"
    assert cluster.served.count("dead") == 1, "a failed worker sits out instead of failing again"


async def test_worker_5xx_before_first_byte_is_retried(cluster: Cluster) -> None:
    async def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom"}})

    cluster.workers["broken"] = broken
    cluster.workers["good"] = cluster.ok_worker("good")
    await cluster.heartbeat("broken")
    await cluster.heartbeat("good")
    for _ in range(2):
        response = await cluster.chat()
        assert response.status_code == 200
        assert response.headers["x-rbee-worker-id"] == "good"


async def test_whole_answer_cut_midway_is_retried_elsewhere(cluster: Cluster) -> None:
    async def dying(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse_chunks(5, fail_after=2))

    cluster.workers["dying"] = dying
    cluster.workers["good"] = cluster.ok_worker("good")
    await cluster.heartbeat("dying")
    await cluster.heartbeat("good")
    for _ in range(2):
        response = await cluster.chat()
        assert response.status_code == 200
        assert response.headers["x-rbee-worker-id"] == "good"
        assert response.json()["choices"][0]["message"]["content"] == "from good"
    assert cluster.served.count("dying") == 1


async def test_worker_4xx_is_passed_to_the_client(cluster: Cluster) -> None:
    async def strict(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "prompt too long", "code": "ctx"}})

    cluster.workers["w1"] = strict
    await cluster.heartbeat("w1")
    response = await cluster.chat()
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "prompt too long"


class ExplodingClient:
    """A worker client that fails in a way nobody planned for."""

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        raise RuntimeError("something nobody planned for")


async def test_unexpected_failure_answers_json_and_frees_the_slot(cluster: Cluster) -> None:
    cluster.workers["w1"] = cluster.ok_worker("w1")
    await cluster.heartbeat("w1")
    proxy = cluster.app.state.queen.proxy
    real, proxy.client = proxy.client, ExplodingClient()
    failed = await cluster.chat()
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "internal_error"
    proxy.client = real
    served = await asyncio.wait_for(cluster.chat(), 5)  # the one slot was given back
    assert served.status_code == 200


async def test_client_that_leaves_before_the_answer_frees_the_slot(cluster: Cluster) -> None:
    started = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(30)
        return completion("w1", json.loads(request.content))

    cluster.workers["w1"] = slow
    await cluster.heartbeat("w1")
    leaving = asyncio.create_task(cluster.chat())
    await started.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    cluster.workers["w1"] = cluster.ok_worker("w1")
    served = await asyncio.wait_for(cluster.chat(), 5)
    assert served.status_code == 200


async def test_stream_cut_midway_ends_with_an_error_event(cluster: Cluster) -> None:
    async def dying(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=sse_chunks(5, fail_after=2), headers={"content-type": "text/event-stream"}
        )

    cluster.workers["w1"] = dying
    await cluster.heartbeat("w1")
    response = await asyncio.wait_for(cluster.chat(stream=True), 5)
    events = [line for line in response.text.split("\n\n") if line]
    assert events[:2] == ['data: {"n": 0}', 'data: {"n": 1}']
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "worker_failed"


async def test_when_every_worker_fails_the_answer_is_503(cluster: Cluster) -> None:
    await cluster.heartbeat("dead1")
    await cluster.heartbeat("dead2")
    response = await cluster.chat()
    assert response.status_code == 503
    assert "dead1, dead2 failed" in response.json()["error"]["message"]
    assert (await cluster.chat()).status_code == 503


async def test_unknown_model_is_404_listing_known_models(cluster: Cluster) -> None:
    cluster.workers["w1"] = cluster.ok_worker("w1")
    await cluster.heartbeat("w1", model="real-model")
    response = await cluster.chat(model="no-such-model")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "real-model" in error["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{oops", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"messages": []}', "missing_model"),
    ],
)
async def test_bad_requests_are_400(cluster: Cluster, body: bytes, code: str) -> None:
    response = await cluster.client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


async def test_full_queue_is_429_with_retry_after(cluster: Cluster) -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return completion("slow", json.loads(request.content))

    cluster.workers["slow"] = slow
    await cluster.heartbeat("slow")
    running = [asyncio.create_task(cluster.chat()) for _ in range(3)]  # 1 serving + 2 waiting
    await asyncio.sleep(0.1)
    rejected = await cluster.chat()
    assert rejected.status_code == 429
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "queue_full"
    release.set()
    assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200, 200]


async def test_wait_that_expires_is_429(cluster: Cluster) -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return completion("slow", json.loads(request.content))

    cluster.workers["slow"] = slow
    await cluster.heartbeat("slow")
    first = asyncio.create_task(cluster.chat())
    await asyncio.sleep(0.05)
    expired = await cluster.chat()  # queue_timeout is 0.5 s
    assert expired.status_code == 429
    assert expired.json()["error"]["code"] == "queue_timeout"
    release.set()
    assert (await first).status_code == 200


async def test_cold_model_starts_one_worker_for_many_requests(cluster: Cluster) -> None:
    await cluster.hive_heartbeat(["cold"])
    responses = await asyncio.gather(*(cluster.chat(model="cold") for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert len(cluster.hive_spawns) == 1
    assert cluster.hive_spawns[0]["model"] == "cold"
    assert {r.headers["x-rbee-worker-id"] for r in responses} == {"spawned-1"}


async def test_a_spawn_job_passes_its_kv_cache_type_to_the_hive(cluster: Cluster) -> None:
    await cluster.hive_heartbeat(["cold"])
    job = {"operation": "worker_spawn", "model": "cold", "kv_cache_type": "q8_0"}
    bad = await cluster.client.post("/v1/jobs", json={**job, "kv_cache_type": "q4_0"})
    assert bad.status_code == 400
    created = await cluster.client.post("/v1/jobs", json=job)
    assert created.status_code == 201, created.text
    events = (await cluster.client.get(created.json()["sse_url"])).text
    assert '"type":"done"' in events.replace(" ", ""), events
    assert [s["kv_cache_type"] for s in cluster.hive_spawns] == ["q8_0"]
    assert cluster.hive_spawns[0]["rerank"] is False
    # A worker the queen starts for a request keeps the worker's own choice.
    await cluster.hive_heartbeat(["other"])
    assert (await cluster.chat(model="other")).status_code == 200
    assert cluster.hive_spawns[1]["kv_cache_type"] == "auto"


async def test_a_rerank_spawn_job_asks_the_hive_for_a_reranking_worker(cluster: Cluster) -> None:
    await cluster.hive_heartbeat(["ranker"])
    job = {"operation": "worker_spawn", "model": "ranker", "rerank": True}
    created = await cluster.client.post("/v1/jobs", json=job)
    assert created.status_code == 201, created.text
    await cluster.client.get(created.json()["sse_url"])
    [spawn] = cluster.hive_spawns
    assert (spawn["rerank"], spawn["embedding"]) == (True, True)


async def test_models_lists_loaded_and_startable(cluster: Cluster) -> None:
    cluster.workers["w1"] = cluster.ok_worker("w1")
    await cluster.heartbeat("w1", model="hot")
    await cluster.hive_heartbeat(["hot", "cold"])
    data = (await cluster.client.get("/v1/models")).json()["data"]
    by_id = {m["id"]: m["rbee"] for m in data}
    assert by_id["hot"] == {
        "state": "loaded",
        "embedding": False,
        "workers": 1,
        "embedding_workers": 0,
        "hives": ["h1"],
        "backoff": [],
        # A worker started without a keep-alive (as this one) is pinned.
        "pinned": True,
        "keep_alive_left_s": None,
        "last_used_s_ago": 0.0,
        "queued": 0,
        "max_replicas": None,  # as many as fit
        "min_replicas": 0,
        "apis": ["chat.completions", "completions", "messages", "responses"],
        "worker_contexts": [{"worker_id": "w1", "hive_id": None, "ctx_size": None, "slots": 1}],
    }
    assert by_id["cold"] == {
        "state": "available",
        "embedding": False,
        "workers": 0,
        "embedding_workers": 0,
        "hives": ["h1"],
        "backoff": [],
        "pinned": False,
        "keep_alive_left_s": None,
        "last_used_s_ago": None,
        "queued": 0,
        "max_replicas": None,
        "min_replicas": 0,
        # Not loaded: it could be started for any of them.
        "apis": ["chat.completions", "completions", "messages", "responses", "embeddings"],
        "worker_contexts": [],
    }


async def embed(cluster: Cluster, model: str = "m") -> httpx.Response:
    return await cluster.client.post("/v1/embeddings", json={"model": model, "input": "hi"})


async def test_embeddings_go_to_embedding_workers_and_chat_to_the_others(
    cluster: Cluster,
) -> None:
    for name in ("chat1", "emb1"):
        cluster.workers[name] = cluster.ok_worker(name)
    await cluster.heartbeat("chat1")
    await cluster.heartbeat("emb1", embedding=True)
    for _ in range(3):
        embedded = await embed(cluster)
        assert embedded.status_code == 200
        assert embedded.headers["x-rbee-worker-id"] == "emb1"
        chatted = await cluster.chat()
        assert chatted.headers["x-rbee-worker-id"] == "chat1"
    data = (await cluster.client.get("/v1/models")).json()["data"]
    assert data[0]["rbee"]["embedding"] is True
    assert data[0]["rbee"]["embedding_workers"] == 1
    assert data[0]["rbee"]["workers"] == 2


async def test_embeddings_for_a_chat_only_model_are_400_naming_the_model(
    cluster: Cluster,
) -> None:
    cluster.workers["chat1"] = cluster.ok_worker("chat1")
    await cluster.heartbeat("chat1")
    refused = await embed(cluster)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_embedding"
    assert refused.json()["error"]["param"] == "model"
    assert "--embedding" in refused.json()["error"]["message"]
    cluster.workers["emb1"] = cluster.ok_worker("emb1")
    await cluster.heartbeat("emb-only", model="e", embedding=True)
    wrong = await cluster.chat(model="e")
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "model_not_chat"


async def test_embeddings_for_a_model_a_hive_has_start_an_embedding_worker(
    cluster: Cluster,
) -> None:
    cluster.workers["chat1"] = cluster.ok_worker("chat1")
    await cluster.heartbeat("chat1", model="cold")
    await cluster.hive_heartbeat(["cold"])
    answers = await asyncio.gather(*(embed(cluster, "cold") for _ in range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert cluster.hive_spawns == [
        {
            "model": "cold",
            "device": "cpu:0",
            "slots": 1,
            "ctx_size": 2048,
            "embedding": True,
            "kv_cache_type": "auto",
            "keep_alive_s": 300.0,  # started on demand: the queen's default keep-alive
            "load_timeout_s": 5.0,  # the base of the load deadline: no footprint known
            "rerank": False,
            "rpc_tunnels": [],  # on one device, not split over hives
            "tensor_split": [],
            "parts": [],
        }
    ]
    assert {a.headers["x-rbee-worker-id"] for a in answers} == {"spawned-1"}
    assert (await cluster.chat(model="cold")).headers["x-rbee-worker-id"] == "chat1"


async def test_a_worker_log_for_an_id_no_worker_could_have_is_a_400(cluster: Cluster) -> None:
    """Not passed on to the hives (one answered 400, which came back as 502; one with control
    characters broke the URL: 500)."""
    for bad in (";~Ì", "%10z%3F", "-starts-with-a-dash"):
        answer = await cluster.client.get(f"/v1/workers/{bad}/log")
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["error"]["param"] == "worker_id"
