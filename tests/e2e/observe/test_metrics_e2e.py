"""Traffic through a real cluster moves the queen's, the worker's and the hive's figures by
exactly what was sent."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee.queen.metrics import UNKNOWN_MODEL
from rbee_testing.metrics import value

from .conftest import Cluster

pytestmark = pytest.mark.e2e

QUESTION = [
    {"role": "system", "content": "Answer accurately and concisely."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_counters_and_histograms_move_by_the_traffic_sent(cluster: Cluster) -> None:
    worker = cluster.spawned[0]
    queen_before = cluster.scrape(cluster.queen_url)
    worker_before = cluster.scrape(worker["url"])
    prompt_tokens = completion_tokens = 0
    with cluster.client() as client:
        for stream in (False, False, True):
            body = {
                "model": DEFAULT_MODEL,
                "messages": QUESTION,
                "temperature": 0,
                "max_tokens": 12,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            }
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            if not stream:
                usage = response.json()["usage"]
                prompt_tokens += usage["prompt_tokens"]
                completion_tokens += usage["completion_tokens"]
        missing = client.post(
            "/v1/chat/completions", json={"model": "no-such-model", "messages": QUESTION}
        )
        assert missing.status_code == 404
        # The last answer is in, but the worker's "ready again" heartbeat and the queen's own
        # bookkeeping may still be on their way: read the figures once both have landed.
        deadline = time.monotonic() + 30
        while True:
            view = client.get(f"/v1/workers/{worker['worker_id']}").json()
            if view["status"] == "ready" and view["in_flight"] == 0:
                break
            assert time.monotonic() < deadline, view
            time.sleep(0.05)
    queen = cluster.scrape(cluster.queen_url)
    after = cluster.scrape(worker["url"])

    def moved(name: str, **labels: str) -> float:
        return value(queen, name, **labels) - value(queen_before, name, **labels)

    def grew(name: str) -> float:
        return value(after, name) - value(worker_before, name)

    labels = {"model": DEFAULT_MODEL}
    assert moved("rbee_requests_total", worker=worker["worker_id"], code="200", **labels) == 3
    assert moved("rbee_requests_total", model=UNKNOWN_MODEL, code="404") == 1
    assert moved("rbee_request_duration_seconds_count", **labels) == 3
    assert moved("rbee_time_to_first_token_seconds_count", **labels) == 1
    assert moved("rbee_queue_wait_seconds_count", **labels) == 3
    assert moved("rbee_request_duration_seconds_sum", **labels) > 0
    assert value(queen, "rbee_workers", status="ready") == 1
    assert value(queen, "rbee_hives_online") == 1
    assert value(queen, "rbee_in_flight", worker=worker["worker_id"]) == 0
    assert value(queen, "rbee_heartbeats_total", kind="hive") > 0
    assert value(queen, "rbee_worker_starts_total", result="ready", **labels) == 1

    # The same question at temperature 0 gives the same tokens, streamed or not.
    assert grew("rbee_worker_generated_tokens_total") == completion_tokens * 3 / 2
    assert grew("rbee_worker_prompt_tokens_total") == prompt_tokens * 3 / 2
    assert grew("rbee_worker_time_to_first_token_seconds_count") == 3
    assert value(after, "rbee_worker_inter_token_seconds_count") > 0
    assert value(after, "rbee_worker_slots") == cluster.spawned[0]["slots"]  # 2 by default
    assert value(after, "rbee_worker_slots_busy") == 0

    hive = cluster.scrape(cluster.hive_url)
    assert value(hive, "rbee_hive_workers") == 1
    assert value(hive, "rbee_hive_device_memory_free_bytes", device="cpu:0") > 0


def test_every_daemon_refuses_metrics_without_the_token(cluster: Cluster) -> None:
    for url in (cluster.queen_url, cluster.hive_url, cluster.spawned[0]["url"]):
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{cluster.queen_url}/v1/metrics/targets", timeout=10).status_code == 401


def test_made_up_model_names_from_an_api_key_do_not_grow_the_queen(cluster: Cluster) -> None:
    """An API key only allowed to infer sends 2,000 made-up model names and one of a megabyte:
    each is a 404 that quotes a little of the name, and /metrics stays the size it was."""
    with cluster.client() as admin:
        created = admin.post("/v1/keys", json={"name": f"e2e-{secrets.token_hex(4)}"})
        assert created.status_code == 201, created.text
    key = created.json()["key"]
    metrics = httpx.Client(base_url=cluster.queen_url, headers=cluster.headers, timeout=30)
    with (
        httpx.Client(
            base_url=cluster.queen_url, headers={"authorization": f"Bearer {key}"}, timeout=30
        ) as client,
        metrics,
    ):
        assert client.get("/metrics").status_code == 403, "the key may infer, not read figures"
        client.post("/v1/chat/completions", json={"model": "warm-up", "messages": QUESTION})
        before = len(metrics.get("/metrics").content)
        for _ in range(2000):
            body = {"model": secrets.token_hex(16), "messages": QUESTION}
            assert client.post("/v1/chat/completions", json=body).status_code == 404
        huge = client.post("/v1/chat/completions", json={"model": "y" * (1 << 20)})
        assert huge.status_code == 404
        assert len(huge.content) < 2000, "the answer quotes 200 characters of the name"
        after = len(metrics.get("/metrics").content)
        assert client.get("/v1/models").status_code == 200, "the queen carries on"
    assert after - before < 500, (before, after)
