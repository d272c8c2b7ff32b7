"""`POST /v1/rerank` on an in-process worker: a reranker's worker passes the request to its
engine (llama.cpp's /v1/rerank, here a fake that records it) holding a slot, names its model,
counts the tokens; bad input and a worker that is no reranker get a clear 400 before the
engine is asked."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from rbee.worker.api.rerank import MAX_DOCUMENTS
from rbee_testing.fake_engine import FakeEngine

MODEL = "fake-model"  # what the conftest's workers serve
ASK = {"model": MODEL, "query": "what is a panda?", "documents": ["a city", "a panda bear"]}


class Answer:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.content_type = "application/json"
        self._body = json.dumps(body).encode()

    async def read(self) -> bytes:
        return self._body

    async def close(self) -> None:
        pass


class RerankingEngine(FakeEngine):
    """llama.cpp's server as far as rerank goes: ranks the documents by length."""

    native_tools = False

    def __init__(self) -> None:
        super().__init__()
        self.relayed: list[tuple[str, dict[str, Any]]] = []
        self.gate: asyncio.Event | None = None
        self.asked = asyncio.Event()

    async def relay(self, path: str, body: bytes) -> Answer:
        request = json.loads(body)
        self.relayed.append((path, request))
        self.asked.set()
        if self.gate is not None:
            await self.gate.wait()
        docs = request["documents"]
        results = sorted(
            ({"index": i, "relevance_score": float(len(d))} for i, d in enumerate(docs)),
            key=lambda r: -r["relevance_score"],
        )[: request.get("top_n", len(docs))]
        usage = {"prompt_tokens": 7 * len(docs), "total_tokens": 7 * len(docs)}
        return Answer(
            200, {"model": "/models/x.gguf", "object": "list", "usage": usage, "results": results}
        )


async def test_a_reranker_worker_passes_rerank_to_its_engine(make_worker: Any) -> None:
    worker = await make_worker(RerankingEngine, rerank=True)
    for path in ("/v1/rerank", "/v1/reranking"):
        answer = await worker.client.post(path, json={**ASK, "top_n": 1, "return_documents": True})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == MODEL
        assert answer.json()["results"] == [
            {"index": 1, "relevance_score": 12.0, "document": {"text": "a panda bear"}}
        ]
    engine = worker.engines[0]
    # llama.cpp is asked on its own path, without the field the worker honours itself.
    assert engine.relayed == [("/v1/rerank", {**ASK, "top_n": 1})] * 2
    metrics = (await worker.client.get("/metrics")).text
    assert "rbee_worker_prompt_tokens_total 28.0" in metrics
    beat = await worker.first_beat()
    assert beat.worker.rerank is True
    assert beat.worker.embedding is True


async def test_rerank_holds_a_slot_while_the_engine_ranks(make_worker: Any) -> None:
    worker = await make_worker(RerankingEngine, rerank=True)
    engine = worker.engines[0]
    engine.gate = asyncio.Event()
    pending = asyncio.create_task(worker.client.post("/v1/rerank", json=ASK))
    await asyncio.wait_for(engine.asked.wait(), 10)
    health = (await worker.client.get("/health")).json()
    assert health["in_flight"] == 1
    engine.gate.set()
    assert (await pending).status_code == 200
    assert (await worker.client.get("/health")).json()["in_flight"] == 0


async def test_bad_input_is_400_before_the_engine_is_asked(make_worker: Any) -> None:
    worker = await make_worker(RerankingEngine, rerank=True)
    cases = [
        ({"query": "q"}, "documents"),
        ({"documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["d"] * (MAX_DOCUMENTS + 1)}, "documents"),
        ({"query": "q", "documents": ["a"], "rank_fields": ["title"]}, "rank_fields"),
    ]
    for body, param in cases:
        refused = await worker.client.post("/v1/rerank", json={"model": MODEL, **body})
        assert refused.status_code == 400, body
        assert refused.json()["error"]["param"] == param
    assert worker.engines[0].relayed == []


async def test_a_worker_that_is_no_reranker_says_so(make_worker: Any) -> None:
    for settings in ({}, {"embedding": True}):
        worker = await make_worker(RerankingEngine, **settings)
        refused = await worker.client.post("/v1/rerank", json=ASK)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "model_not_reranker"
        assert worker.engines[0].relayed == []
    wrong_model = await worker.client.post("/v1/rerank", json={**ASK, "model": "other"})
    assert wrong_model.status_code == 404


async def test_a_reranker_worker_makes_no_embeddings(make_worker: Any) -> None:
    worker = await make_worker(RerankingEngine, rerank=True)
    refused = await worker.client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_embedding"
    assert "/v1/rerank" in refused.json()["error"]["message"]
