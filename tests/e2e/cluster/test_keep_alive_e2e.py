"""Keep-alive with real processes: a SmolLM2 worker the queen starts on demand unloads once
idle (its process and llama-server exit, the hive reports its memory free again), while an
explicitly started worker stays however long it idles."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.metrics import parse_samples, value

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
    # A 1 s default keep-alive: a worker that were not pinned would go within the test. The
    # hive's memory limit makes it report what its workers hold (other users' memory apart).
    flags = ("--keep-alive", "1s", "--spawn-timeout", "240")
    yield from start_cluster(tmp_path, *flags, hive_flags=("--memory-limit", "4GiB"))


def hive_view(cluster: Cluster) -> dict[str, Any]:
    hives = httpx.get(f"{cluster.queen_url}/v1/hives").json()["hives"]
    hive: dict[str, Any] = next(h for h in hives if h["id"] == cluster.hive_id)
    return hive


def rbee_used(cluster: Cluster) -> int:
    cpu = next(d for d in hive_view(cluster)["devices"] if d["id"] == "cpu:0")
    return int(cpu["rbee_used_bytes"] or 0)


def hive_process(cluster: Cluster, worker_id: str) -> dict[str, Any] | None:
    processes = httpx.get(f"{cluster.hive_url}/v1/workers").json()["workers"]
    return next((p for p in processes if p["worker_id"] == worker_id), None)


def chat(cluster: Cluster, keep_alive: object) -> httpx.Response:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "keep_alive": keep_alive,
    }
    return httpx.post(f"{cluster.queen_url}/v1/chat/completions", json=body, timeout=300)


def test_an_on_demand_worker_unloads_when_idle_and_a_pinned_one_stays(cluster: Cluster) -> None:
    # Pinned: started explicitly (an embedding worker, so chat requests start their own).
    done = cluster.run_job(
        {"operation": "worker_spawn", "model": DEFAULT_MODEL, "hive_id": cluster.hive_id,
         "embedding": True},
        timeout_s=300,
    )  # fmt: skip
    assert done["type"] == "done", done
    pinned_id = done["result"]["worker_id"]
    pinned_pid = done["result"]["pid"]
    # From a heartbeat that lists the worker as started: its figures were read after it loaded
    # (one sent while it still loaded holds its Python process only).
    base = wait_until(
        lambda: pinned_id in hive_view(cluster)["workers"] and rbee_used(cluster),
        30,
        "the hive reports its worker's memory",
    )

    # keep_alive passes through to the worker (llama.cpp ignores it) and holds the new worker.
    answer = chat(cluster, "10m")
    assert answer.status_code == 200, answer.text
    on_demand = answer.headers["x-rbee-worker-id"]
    assert on_demand != pinned_id
    process = hive_process(cluster, on_demand)
    assert process is not None
    worker = psutil.Process(process["pid"])
    engines = worker.children(recursive=True)
    assert any("llama-server" in p.name() for p in engines), engines
    loaded = wait_until(
        lambda: (used := rbee_used(cluster)) > base * 1.3 and used,
        30,
        "the hive reports the new worker's memory",
    )
    models = httpx.get(f"{cluster.queen_url}/v1/models").json()["data"]
    entry = next(m["rbee"] for m in models if m["id"] == DEFAULT_MODEL)
    assert entry["pinned"] is True  # one of its workers is
    time.sleep(3)  # past the queen's 1 s default: this request's 10m holds it
    assert hive_process(cluster, on_demand) is not None

    # keep_alive 0: unloaded as soon as it is idle.
    assert chat(cluster, 0).status_code == 200
    wait_until(
        lambda: not worker.is_running() and not any(p.is_running() for p in engines),
        60,
        "the on-demand worker and its llama-server exit",
    )
    wait_until(
        lambda: all(w["id"] != on_demand for w in cluster.workers()),
        30,
        "the queen forgets the unloaded worker",
    )
    freed = wait_until(
        lambda: (used := rbee_used(cluster)) < loaded - (loaded - base) / 2 and used,
        30,
        f"the hive reports the memory free again (base {base}, loaded {loaded})",
    )
    assert freed < loaded
    samples = parse_samples(httpx.get(f"{cluster.queen_url}/metrics").text)
    assert value(samples, "rbee_model_unloads_total", model=DEFAULT_MODEL, reason="idle") == 1
    assert value(samples, "rbee_model_loads_total", model=DEFAULT_MODEL, reason="demand") == 1
    assert value(samples, "rbee_model_loads_total", model=DEFAULT_MODEL, reason="manual") == 1

    # The pinned worker idled all along, past the 1 s default many times over: it stays.
    assert psutil.pid_exists(pinned_pid)
    assert [w["id"] for w in cluster.workers()] == [pinned_id]
