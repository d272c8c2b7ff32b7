"""Replicas with real processes: a 1-slot SmolLM2 model with 8 concurrent clients, on two real
hives whose memory limits each hold one worker of it, gets a second worker (on the other hive)
once its requests have waited, every request is answered, and once idle the replica unloads
(keep-alive 2 s) back to the model's min_replicas (1)."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.metrics import parse_samples, value
from rbee_testing.processes import ServerProcess, console_script, free_port

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        if result := condition():
            return result
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f}s: {what}"
        time.sleep(0.2)


def hive_process(queen_url: str, port: int, hive_id: str, tmp: Path) -> ServerProcess:
    first = random.randrange(20000, 40000)
    return ServerProcess(
        [
            console_script("rbee-hive"),
            "--queen-url", queen_url,
            "--port", str(port),
            "--hive-id", hive_id,
            "--models-dir", str(tmp / f"models-{hive_id}"),
            "--log-dir", str(tmp / f"logs-{hive_id}"),
            "--worker-ports", f"{first}-{first + 50}",
            "--heartbeat-interval", "1",
            "--memory-limit", "400MiB",  # one SmolLM2 worker, not two
        ],
        health_url=f"http://127.0.0.1:{port}/health",
    )  # fmt: skip


@pytest.fixture
def queen_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    queen = ServerProcess(
        [
            console_script("queen-rbee"), "--port", str(port),
            "--keep-alive", "2s", "--replica-after", "1", "--max-replicas", "2",
            "--model-min-replicas", f"{DEFAULT_MODEL}=1",
            "--spawn-timeout", "240", "--queue-timeout", "600",
        ],
        health_url=f"{url}/health",
    )  # fmt: skip
    hive_ids = [f"replica-hive-{n}-{free_port()}" for n in (1, 2)]
    hives = [hive_process(url, free_port(), hive_id, tmp_path) for hive_id in hive_ids]
    with queen, hives[0], hives[1]:
        wait_until(
            lambda: (
                {h["id"] for h in httpx.get(f"{url}/v1/hives").json()["hives"]} >= set(hive_ids)
            ),
            30,
            "both hives reach the queen",
        )
        yield url


def workers(queen_url: str) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = httpx.get(f"{queen_url}/v1/workers").json()["workers"]
    return [w for w in listed if w.get("online", True)]


def test_a_busy_one_slot_model_gets_a_replica_on_the_other_hive_then_drops_back(
    queen_url: str,
) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about a bee."}],
        "max_tokens": 48,
        "temperature": 0,
    }
    served: list[tuple[int, str, str]] = []  # (status, worker id, hive id)

    def client(_: int) -> None:
        # Each client asks until the model has two workers (or 12 times): however fast this
        # machine answers, requests keep waiting for the one slot until the replica is up.
        with httpx.Client(timeout=600) as http:
            for _ in range(12):
                answer = http.post(f"{queen_url}/v1/chat/completions", json=body)
                served.append(
                    (answer.status_code, answer.headers.get("x-rbee-worker-id", ""), answer.text)
                )
                if len({worker for _, worker, _ in served}) >= 2:
                    return

    # Where each worker runs, seen while the clients run: the replica may unload (keep-alive
    # 2 s) before the last client is answered, so it is looked for then, not after.
    hive_of: dict[str, str] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            with contextlib.suppress(httpx.HTTPError):
                hive_of.update({str(w["id"]): str(w["hive_id"]) for w in workers(queen_url)})

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    done.set()
    watcher.join()
    assert all(status == 200 for status, _, _ in served), [s for s in served if s[0] != 200]
    assert len({worker for _, worker, _ in served}) == 2, "a second replica served requests"

    samples = parse_samples(httpx.get(f"{queen_url}/metrics").text)
    assert value(samples, "rbee_model_loads_total", model=DEFAULT_MODEL, reason="replica") == 1
    assert value(samples, "rbee_model_loads_total", model=DEFAULT_MODEL, reason="demand") == 1
    models = httpx.get(f"{queen_url}/v1/models").json()["data"]
    entry = next(m["rbee"] for m in models if m["id"] == DEFAULT_MODEL)
    assert entry["max_replicas"] == 2
    # The two workers are on different hives: each hive's limit holds one.
    serving = {worker for _, worker, _ in served}
    assert serving <= set(hive_of), (serving, hive_of)
    assert len({hive_of[w] for w in serving}) == 2, hive_of

    # Idle past the 2 s keep-alive: back to min_replicas (1), and it stays there.
    wait_until(lambda: len(workers(queen_url)) == 1, 60, "the idle replica unloads")
    time.sleep(5)
    assert len(workers(queen_url)) == 1
    samples = parse_samples(httpx.get(f"{queen_url}/metrics").text)
    assert value(samples, "rbee_model_unloads_total", model=DEFAULT_MODEL, reason="idle") == 1
