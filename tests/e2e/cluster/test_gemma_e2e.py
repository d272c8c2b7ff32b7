"""Gemma 3 270M, the second bundled model, out of the box: a real hive lists it, a real worker
started through the queen loads it, and it completes text through the queen's /v1/completions
(a base model: no chat template)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rbee.common.bundled import GEMMA_MODEL

from .conftest import Cluster, start_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, "--spawn-timeout", "240")


def test_a_hive_serves_gemma_through_completions(cluster: Cluster) -> None:
    listed = httpx.get(f"{cluster.hive_url}/v1/models", timeout=30).json()["models"]
    gemma = next(m for m in listed if m["id"] == GEMMA_MODEL)
    assert gemma["source"] == "bundled"
    assert gemma["size_bytes"] > 200_000_000

    cluster.spawn_worker(GEMMA_MODEL)
    body = {
        "model": GEMMA_MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
    }
    answer = httpx.post(f"{cluster.queen_url}/v1/completions", json=body, timeout=240)

    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["model"] == GEMMA_MODEL
    assert data["usage"]["completion_tokens"] > 0
    assert data["choices"][0]["text"].strip(), data
