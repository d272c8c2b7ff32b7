"""SIGTERM, a queen that goes away and comes back, and the token — with real processes."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.worker.engines.llama_process import DIR_PREFIX

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 8,
}


def registry_status(queen_url: str, worker_id: str, token: str | None = None) -> str | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{queen_url}/v1/workers/{worker_id}", headers=headers, timeout=2)
    except httpx.HTTPError:
        return None
    return response.json()["status"] if response.status_code == 200 else None


def wait_status(queen_url: str, worker_id: str, want: str, timeout: float, **kw: Any) -> float:
    """Seconds it took until the queen lists the worker with status `want`."""
    started = time.monotonic()
    while registry_status(queen_url, worker_id, **kw) != want:
        assert time.monotonic() - started < timeout, f"not {want} after {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_sigterm_takes_the_worker_out_of_the_registry_at_once_and_exits_0(cluster: Any) -> None:
    queen = cluster.queen()
    worker = cluster.worker(queen.url)
    wait_status(queen.url, worker.id, "ready", timeout=5)
    worker.proc.signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0
    # The queen's timeout is 90 s: only the worker's own `stopped` heartbeat removes it this fast.
    assert registry_status(queen.url, worker.id) is None
    assert "Traceback" not in worker.proc.output()


def test_a_killed_workers_engine_dies_with_it_and_the_next_worker_clears_its_socket_dir(
    cluster: Any,
) -> None:
    queen = cluster.queen()
    worker = cluster.worker(queen.url)
    (engine,) = psutil.Process(worker.proc.pid).children()
    (socket_dir,) = Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}{worker.proc.pid}-*")
    worker.proc.signal(signal.SIGKILL)
    worker.proc.wait(10)
    _, alive = psutil.wait_procs([engine], timeout=10)
    assert not alive, f"llama-server (pid {engine.pid}) outlived its SIGKILLed worker"
    assert socket_dir.exists()  # nobody was left to remove it...
    cluster.worker(queen.url)
    assert not socket_dir.exists()  # ...until the next worker on the machine started


def test_queen_restarted_on_the_same_port_sees_the_worker_within_one_interval(
    cluster: Any,
) -> None:
    queen = cluster.queen()
    interval = 1.0
    worker = cluster.worker(queen.url, "--heartbeat-interval", str(interval))
    wait_status(queen.url, worker.id, "ready", timeout=5)
    queen.proc.stop()
    # Queen down for several intervals: the worker keeps serving and keeps retrying.
    time.sleep(2.5)
    answer = httpx.post(f"{worker.url}/v1/chat/completions", json=CHAT, timeout=30)
    assert answer.status_code == 200
    again = cluster.queen(port=queen.port)
    took = wait_status(again.url, worker.id, "ready", timeout=interval + 2)
    assert took <= interval + 0.5
    assert worker.proc.proc.poll() is None, "the worker must not restart or exit"


def test_worker_started_before_its_queen_registers_when_the_queen_arrives(cluster: Any) -> None:
    from rbee_testing.processes import free_port

    port = free_port()
    worker = cluster.worker(f"http://127.0.0.1:{port}", "--heartbeat-interval", "1")
    assert httpx.get(f"{worker.url}/health").json()["status"] == "ok"
    queen = cluster.queen(port=port)
    assert wait_status(queen.url, worker.id, "ready", timeout=3) <= 1.5


def test_with_a_token_the_worker_requires_it_and_the_queen_accepts_its_heartbeats(
    cluster: Any, tiny_model: Any
) -> None:
    token = "e2e-s3cret"
    queen = cluster.queen(token=token)
    worker = cluster.worker(queen.url, model=str(tiny_model), token=token)
    wait_status(queen.url, worker.id, "ready", timeout=5, token=token)
    body = {**CHAT, "model": "tiny"}
    assert httpx.post(f"{worker.url}/v1/chat/completions", json=body).status_code == 401
    ok = httpx.post(
        f"{worker.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert ok.status_code == 200
    assert ok.json()["usage"]["completion_tokens"] >= 1
