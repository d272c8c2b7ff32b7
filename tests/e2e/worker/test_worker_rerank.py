"""Reranking with real processes: a queen and a worker whose GGUF file pools by rank (a tiny
random-weight reranker from rbee_testing.gguf: no reranker GGUF installs offline from the
package registries). The worker starts llama-server with --reranking by itself; the queen
routes /v1/rerank and /v1/reranking to it. The scores are noise; their shape is llama.cpp's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_testing.gguf import write_tiny_gguf

pytestmark = pytest.mark.e2e

QUERY = "what does a panda eat?"
DOCUMENTS = ["the capital of France is Paris", "pandas eat bamboo", "a giant panda"]


def test_a_reranker_file_serves_rerank_through_the_queen(
    cluster: Any, queen_module: Any, tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "reranker.gguf", pooling=4)  # llama.cpp's `rank`
    worker = cluster.worker(
        queen_module.url, "--heartbeat-interval", "1", "--ctx-size", "128", model=str(model)
    )
    [listed] = httpx.get(f"{queen_module.url}/v1/workers", params={"model_id": "reranker"}).json()[
        "workers"
    ]
    assert listed["rerank"] is True
    assert listed["id"] == worker.id
    body = {"model": "reranker", "query": QUERY, "documents": DOCUMENTS}
    # Real work on a machine that may be busy: more than httpx's default 5 s allowed.
    answer = httpx.post(
        f"{queen_module.url}/v1/rerank",
        json={**body, "top_n": 2, "return_documents": True},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    ranked = answer.json()
    assert ranked["model"] == "reranker"
    assert ranked["usage"]["prompt_tokens"] > 0
    assert len(ranked["results"]) == 2
    scores = [r["relevance_score"] for r in ranked["results"]]
    assert scores == sorted(scores, reverse=True)
    for result in ranked["results"]:
        assert result["document"]["text"] == DOCUMENTS[result["index"]]
    # The alias, and the same scores for the same pairs (llama.cpp is deterministic).
    again = httpx.post(f"{queen_module.url}/v1/reranking", json=body, timeout=60)
    assert again.status_code == 200, again.text
    assert len(again.json()["results"]) == 3
    by_index = {r["index"]: r["relevance_score"] for r in again.json()["results"]}
    for result in ranked["results"]:
        assert by_index[result["index"]] == pytest.approx(result["relevance_score"], abs=1e-4)
    models = httpx.get(f"{queen_module.url}/v1/models").json()["data"]
    assert next(m for m in models if m["id"] == "reranker")["rbee"]["apis"] == ["rerank"]
    too_long = httpx.post(
        f"{queen_module.url}/v1/rerank",
        json={**body, "documents": ["short", "x" * 600]},
        timeout=60,
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    no_query = httpx.post(
        f"{queen_module.url}/v1/rerank", json={"model": "reranker", "documents": DOCUMENTS}
    )
    assert no_query.status_code == 400
    assert no_query.json()["error"]["param"] == "query"


def test_rerank_on_a_generative_model_is_400(
    cluster: Any, queen_module: Any, tiny_model: Path
) -> None:
    worker = cluster.worker(queen_module.url, "--heartbeat-interval", "1", model=str(tiny_model))
    body = {"model": "tiny", "query": QUERY, "documents": DOCUMENTS}
    for url in (queen_module.url, worker.url):
        refused = httpx.post(f"{url}/v1/rerank", json=body, timeout=30)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "model_not_reranker"
