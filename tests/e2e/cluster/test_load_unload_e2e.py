"""Loading and unloading by hand with real processes: `rbee load` starts a SmolLM2 worker,
`rbee unload` stops it (its process and llama-server exit), an unknown model is a clear CLI
error, and a streaming request through the OpenAI SDK for the unloaded (cold) model succeeds
(the queen's `: loading` comments are ignored by the SDK)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import psutil
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.metrics import parse_samples, value
from rbee_testing.processes import console_script

from .conftest import Cluster, start_cluster

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        if result := condition():
            return result
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f}s: {what}"
        time.sleep(0.2)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, "--spawn-timeout", "240")


def rbee(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEE_QUEEN_URL": cluster.queen_url, "COLUMNS": "200"}
    env.pop("RBEE_TOKEN", None)
    return subprocess.run(
        [console_script("rbee"), *args], env=env, capture_output=True, text=True, timeout=400
    )


def hive_process(cluster: Cluster, worker_id: str) -> dict[str, Any] | None:
    processes = httpx.get(f"{cluster.hive_url}/v1/workers").json()["workers"]
    return next((p for p in processes if p["worker_id"] == worker_id), None)


def test_rbee_load_then_unload_stops_the_worker_and_its_llama_server(cluster: Cluster) -> None:
    loaded = rbee(cluster, "load", DEFAULT_MODEL)
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded {DEFAULT_MODEL}" in loaded.stdout
    [worker] = cluster.workers()
    assert worker["keep_alive_s"] is None  # pinned, as every start by hand
    process = hive_process(cluster, worker["id"])
    assert process is not None
    proc = psutil.Process(process["pid"])
    engines = proc.children(recursive=True)
    assert any("llama-server" in p.name() for p in engines), engines

    unloaded = rbee(cluster, "unload", DEFAULT_MODEL)
    assert unloaded.returncode == 0, unloaded.stderr
    assert f"unloaded {DEFAULT_MODEL}: stopped {worker['id']}" in unloaded.stdout
    wait_until(
        lambda: not proc.is_running() and not any(p.is_running() for p in engines),
        60,
        "the worker and its llama-server exit",
    )
    wait_until(lambda: not cluster.workers(), 30, "the queen forgets the unloaded worker")
    samples = parse_samples(httpx.get(f"{cluster.queen_url}/metrics").text)
    assert value(samples, "rbee_model_loads_total", model=DEFAULT_MODEL, reason="manual") == 1
    assert value(samples, "rbee_model_unloads_total", model=DEFAULT_MODEL, reason="manual") == 1

    # Nothing to unload now, and a model nobody has: clear errors naming it, nothing starts.
    again = rbee(cluster, "unload", DEFAULT_MODEL)
    assert again.returncode != 0
    assert "is not loaded" in again.stderr
    unknown = rbee(cluster, "load", "banana-7b")
    assert unknown.returncode != 0
    assert "unknown model 'banana-7b'" in unknown.stderr
    assert DEFAULT_MODEL in unknown.stderr
    assert cluster.workers() == []

    # The model is cold again: a streaming request through the OpenAI SDK waits for its load
    # (hearing `: loading` comments, which the SDK skips) and gets the whole answer.
    client = openai.OpenAI(base_url=f"{cluster.queen_url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        timeout=300,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip(), "the stream carried no text"
    assert len(cluster.workers()) == 1
