"""`rbee-hive --memory-limit` with real processes: a real hive whose limit holds one SmolLM2
worker (its llm-worker-rbee and llama-server) but not two, behind a real queen. The worker
that fits is pinned (a request's `keep_alive: -1`), so nothing can be evicted for the second
(eviction has tests of its own)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from rbee.common.bundled import DEFAULT_MODEL, bundled_model_path
from rbee.common.model_memory import estimate_memory
from rbee.contracts.workers import DEFAULT_CTX_SIZE
from rbee.hive.footprints import read_footprint
from rbee_testing.processes import ServerProcess, console_script, free_port

from .conftest import Daemon, HiveStarter, wait_for

pytestmark = pytest.mark.e2e

LIMIT = 400 << 20  # SmolLM2's estimate on a CPU is 275-421 MiB: one fits, a second does not
SECOND = "smollm2-copy.gguf"  # the same weights under another name: a second model


QUEUE_TIMEOUT_S = 5  # how long the second model waits for room before its 503


@pytest.fixture
def queen() -> Iterator[Daemon]:
    """The queen of this module's hives, with a short wait for room."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [console_script("queen-rbee"), "--port", str(port)]
    args += ["--queue-timeout", str(QUEUE_TIMEOUT_S)]
    with ServerProcess(args, health_url=f"{url}/health") as proc:
        yield Daemon(proc, url)


def hive_view(queen: Daemon, hive_id: str) -> dict[str, Any] | None:
    hives = httpx.get(f"{queen.url}/v1/hives", timeout=10).json()["hives"]
    return next((h for h in hives if h["id"] == hive_id), None)


def chat(queen: Daemon, model: str, **extra: Any) -> httpx.Response:
    messages = [{"role": "user", "content": "Hi"}]
    body = {"model": model, "messages": messages, "max_tokens": 4, **extra}
    return httpx.post(f"{queen.url}/v1/chat/completions", json=body, timeout=300)


def spawn_job(queen: Daemon, hive_id: str) -> dict[str, Any]:
    body = {"operation": "worker_spawn", "model": DEFAULT_MODEL, "hive_id": hive_id}
    with httpx.Client(base_url=queen.url, timeout=300) as client:
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 201, created.text
        with connect_sse(client, "GET", created.json()["sse_url"]) as source:
            for event in source.iter_sse():
                data: dict[str, Any] = json.loads(event.data)
                if data["type"] in ("done", "error"):
                    return data
    raise AssertionError("the job stream ended without a final event")


def test_a_limit_for_one_worker_refuses_a_second_with_the_numbers(
    queen: Daemon, start_hive: HiveStarter, tmp_path: Path
) -> None:
    (tmp_path / "models").mkdir()
    shutil.copy(bundled_model_path(DEFAULT_MODEL), tmp_path / "models" / SECOND)
    hive = start_hive(flags=("--memory-limit", "400MiB"))
    try:
        check_one_fits_not_two(queen, hive.url, hive.hive_id)
    finally:
        # Workers run in sessions of their own, without the test run's mark: stop them here.
        for worker in httpx.get(f"{hive.url}/v1/workers", timeout=10).json()["workers"]:
            httpx.post(f"{hive.url}/v1/workers/{worker['pid']}/stop", json={}, timeout=60)


def check_one_fits_not_two(queen: Daemon, hive_url: str, hive_id: str) -> None:
    wait_for(
        "both models' footprints at the queen",
        lambda: (
            (h := hive_view(queen, hive_id)) and {DEFAULT_MODEL, SECOND} <= set(h["footprints"])
        ),
    )

    # Started on demand (it fits in the empty limit), kept for good: never evicted.
    first = chat(queen, DEFAULT_MODEL, keep_alive=-1)
    assert first.status_code == 200, first.text

    # Once the hive reports the worker, what it holds is taken from the limit.
    held = wait_for(
        "the hive to count the worker's memory",
        lambda: (h := hive_view(queen, hive_id)) and h["workers"] and h["devices"][0],
    )
    assert held["memory_limit_bytes"] == LIMIT
    assert held["memory_free_bytes"] == max(0, LIMIT - held["rbee_used_bytes"])
    print(
        f"one SmolLM2 worker holds {held['rbee_used_bytes'] / 2**20:.0f} MiB (RSS, engine included)"
    )

    # Placement counted no less than the worker really holds: its engine's and its own memory
    # (after a real answer) are within the estimate for its context and slots on a CPU.
    footprint = read_footprint(Path(bundled_model_path(DEFAULT_MODEL)))
    (worker,) = httpx.get(f"{queen.url}/v1/workers", timeout=10).json()["workers"]
    counted = estimate_memory(
        footprint, ctx_size=worker["ctx_size"], slots=worker["slots"], device_kind="cpu"
    )
    assert held["rbee_used_bytes"] <= counted.total, (held, counted.describe())
    needed = estimate_memory(footprint, ctx_size=DEFAULT_CTX_SIZE, slots=1, device_kind="cpu").total
    # Another model, on demand: no room left under the limit, and none to be made.
    refused = chat(queen, SECOND)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert error["needed_bytes"] == needed
    assert 0 <= error["largest_free_bytes"] < needed
    assert int(refused.headers["Retry-After"]) >= 1

    # A second explicit start is refused the same way, and nothing was started.
    event = spawn_job(queen, hive_id)
    assert (event["type"], event["code"]) == ("error", "insufficient_memory"), event
    assert len(httpx.get(f"{hive_url}/v1/workers", timeout=10).json()["workers"]) == 1
    # The worker that fits still answers.
    assert chat(queen, DEFAULT_MODEL).status_code == 200


def test_a_limit_bigger_than_the_machine_is_refused_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            console_script("rbee-hive"),
            *("--queen-url", "http://127.0.0.1:9", "--port", str(free_port())),
            *("--models-dir", str(tmp_path / "models"), "--memory-limit", "100000GiB"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("rbee-hive: error: --memory-limit 100000GiB is more than any device")


def test_a_negative_limit_is_a_usage_error_naming_the_flag(tmp_path: Path) -> None:
    done = subprocess.run(
        [console_script("rbee-hive"), "--queen-url", "http://127.0.0.1:9", "--memory-limit=-1GiB"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "--memory-limit: '-1GiB': a size cannot be negative" in done.stderr
