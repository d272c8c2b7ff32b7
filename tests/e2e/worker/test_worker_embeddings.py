"""Embedding workers as real processes: started by the model file itself or by --embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_testing.gguf import write_tiny_gguf

pytestmark = pytest.mark.e2e


def test_a_model_whose_file_names_a_pooling_serves_embeddings_by_itself(
    cluster: Any, queen_module: Any, tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "encoder.gguf", pooling=1)
    worker = cluster.worker(queen_module.url, "--heartbeat-interval", "1", model=str(model))
    embedded = httpx.post(
        f"{worker.url}/v1/embeddings",
        json={"model": "encoder", "input": ["héllo", "wörld"]},
        timeout=30,
    )
    assert embedded.status_code == 200, embedded.text
    assert [len(d["embedding"]) for d in embedded.json()["data"]] == [32, 32]
    chat = {"model": "encoder", "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(f"{worker.url}/v1/chat/completions", json=chat)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_chat"
    [listed] = httpx.get(f"{queen_module.url}/v1/workers", params={"model_id": "encoder"}).json()[
        "workers"
    ]
    assert listed["embedding"] is True


def test_a_generative_model_embeds_with_the_flag_and_not_without(
    cluster: Any, queen_module: Any, tiny_model: Path
) -> None:
    body = {"model": "tiny", "input": "some text to embed"}
    plain = cluster.worker(queen_module.url, model=str(tiny_model))
    refused = httpx.post(f"{plain.url}/v1/embeddings", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "model"
    embedding = cluster.worker(queen_module.url, "--embedding", model=str(tiny_model))
    # Real work on a machine that may be busy: more than httpx's default 5 s allowed.
    first = httpx.post(f"{embedding.url}/v1/embeddings", json=body, timeout=30).json()
    again = httpx.post(f"{embedding.url}/v1/embeddings", json=body, timeout=30).json()
    assert first["data"][0]["embedding"] == again["data"][0]["embedding"]
    assert first["usage"]["prompt_tokens"] > 0
    too_long = httpx.post(
        f"{embedding.url}/v1/embeddings", json={"model": "tiny", "input": ["ok", "x" * 5000]}
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "input[1]"
