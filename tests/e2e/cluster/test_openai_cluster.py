"""The queen as the cluster's one OpenAI endpoint, end to end with real workers (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT
from rbee_testing.metrics import parse_samples, value

from .conftest import Cluster, start_cluster

pytestmark = pytest.mark.e2e
# See DEFAULT_SYSTEM_PROMPT for why a system message is sent.
QUESTION = [
    {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
    {"role": "user", "content": "What is the capital of France?"},
]


# A completion that goes on for a long time: greedy counting runs to the token limit, where a
# sampled one (or a story) may end after a few dozen tokens.
COUNTING = {
    "model": DEFAULT_MODEL,
    "prompt": "1, 2, 3, 4, 5,",
    "max_tokens": 1500,
    "temperature": 0,
    "stream": True,
}


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.queen_url}/v1", api_key="unused", max_retries=0)


def ask(cluster: Cluster, max_tokens: int = 24) -> tuple[str, str]:
    raw = client(cluster).chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=max_tokens,  # type: ignore[arg-type]
    )
    answer = raw.parse().choices[0].message.content or ""
    return raw.headers["x-rbee-worker-id"], answer


def test_openai_client_gets_paris(cluster: Cluster) -> None:
    worker_id, answer = ask(cluster)
    assert "Paris" in answer
    assert worker_id in {w["id"] for w in cluster.workers()}


def test_openai_client_streams_paris(cluster: Cluster) -> None:
    stream = client(cluster).chat.completions.create(
        model=DEFAULT_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,  # type: ignore[arg-type]
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3
    assert "Paris" in "".join(pieces)


def test_models_lists_the_served_model(cluster: Cluster) -> None:
    models = {m.id: m for m in client(cluster).models.list()}
    assert DEFAULT_MODEL in models


def test_concurrent_requests_use_both_workers(cluster: Cluster) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ask(cluster, 16), range(4)))
    assert all("Paris" in answer for _, answer in results)
    assert len({worker for worker, _ in results}) == 2


def test_unknown_model_is_404(cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(cluster).chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"


def queue_waiting(cluster: Cluster) -> float:
    scraped = httpx.get(f"{cluster.queen_url}/metrics", timeout=10).text
    return value(parse_samples(scraped), "rbee_queue_waiting", model=DEFAULT_MODEL)


def test_full_queue_answers_429(cluster: Cluster) -> None:
    # Greedy counting runs to its token limit: long enough to hold both workers for seconds.
    long = {**COUNTING, "max_tokens": 300, "stream": False}
    url = f"{cluster.queen_url}/v1/completions"
    with ThreadPoolExecutor(4) as pool:
        busy = [
            pool.submit(httpx.post, url, json=long, timeout=120)
            for _ in range(4)  # two generating, two waiting: the queue (2) is full
        ]
        deadline = time.monotonic() + 30
        while queue_waiting(cluster) < 2:
            assert time.monotonic() < deadline, "the two extra requests never queued"
            time.sleep(0.02)
        rejected = httpx.post(url, json=long, timeout=30)
        assert rejected.status_code == 429
        assert int(rejected.headers["retry-after"]) >= 1
        assert rejected.json()["error"]["type"] == "rate_limit_error"
        answers = [f.result() for f in busy]
        assert [r.status_code for r in answers] == [200, 200, 200, 200], [r.text for r in answers]


def test_client_that_disconnects_frees_the_workers_slot(cluster: Cluster) -> None:
    with (
        httpx.Client(base_url=cluster.queen_url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=COUNTING) as streamed,
    ):
        worker_id = streamed.headers["x-rbee-worker-id"]
        lines = streamed.iter_lines()  # kept alive: dropping it would close the stream
        for _ in range(4):
            next(lines)
        wait_for_status(cluster, worker_id, "busy")
    # The stream is closed long before 1000 tokens: the worker must say it is free again.
    wait_for_status(cluster, worker_id, "ready")


def wait_for_status(cluster: Cluster, worker_id: str, status: str, within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while httpx.get(f"{cluster.queen_url}/v1/workers/{worker_id}").json()["status"] != status:
        assert time.monotonic() < deadline, f"{worker_id} did not turn {status}"
        time.sleep(0.02)


def test_killed_worker_fails_over_and_cut_stream_ends_with_error(cluster: Cluster) -> None:
    """Runs last in this module: it kills a worker."""
    with (
        httpx.Client(base_url=cluster.queen_url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=COUNTING) as streamed,
    ):
        victim = streamed.headers["x-rbee-worker-id"]
        lines = streamed.iter_lines()
        got = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: ") for line in got)
        pid = next(p["pid"] for p in hive_processes(cluster) if p["worker_id"] == victim)

        def later_request(_: int) -> tuple[str, str]:
            return ask(cluster, 12)

        with ThreadPoolExecutor(3) as pool:
            followers = [pool.submit(later_request, i) for i in range(3)]
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            rest = list(lines)
            # A killed process's kernel resets its connections: the queen sees that at once,
            # long before the ~10 s it takes to find a silent peer (the slack is for a busy CI).
            assert time.monotonic() - killed_at < 5.0
            last_data = [line for line in rest if line.startswith("data: ")][-1]
            last = json.loads(last_data.removeprefix("data: "))
            assert last["error"]["code"] == "worker_failed"
            answers = [f.result(timeout=120) for f in followers]
    assert all("Paris" in answer for _, answer in answers)
    assert all(worker != victim for worker, _ in answers)


def hive_processes(cluster: Cluster) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = httpx.get(f"{cluster.hive_url}/v1/workers").json()["workers"]
    return listed


def test_request_for_a_cold_model_starts_a_worker_through_the_hive(tmp_path: Path) -> None:
    for cold in start_cluster(tmp_path, "--spawn-timeout", "120"):
        assert cold.workers() == []
        worker_id, answer = ask(cold)
        assert "Paris" in answer
        workers = cold.workers()
        assert [w["id"] for w in workers] == [worker_id]
        assert workers[0]["hive_id"] == cold.hive_id
