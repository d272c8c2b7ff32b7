"""How a real worker and its real llama-server stop: by a signal to the process or its whole
group (a terminal's Ctrl-C, systemd), with the port given back at once, or because the engine
stopped answering."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee_testing.processes import free_port

from .conftest import SMOLLM, worker_args

pytestmark = pytest.mark.e2e

CHAT = {
    "model": SMOLLM,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 8,
}


def engine_of(worker_pid: int) -> psutil.Process:
    (engine,) = psutil.Process(worker_pid).children()
    return engine


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def bind_as_a_new_worker_would(port: int) -> None:
    """Raises EADDRINUSE while anything still listens there (SO_REUSEADDR, as rbee binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


class GroupWorker:
    """A worker in a process group of its own, as a terminal or systemd runs it."""

    def __init__(self, queen_url: str, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="rbee-worker-", suffix=".log")
        args = worker_args(SMOLLM, self.port, queen_url, f"e2e-{uuid.uuid4().hex[:8]}", *extra)
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"not healthy after {timeout_s}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def group_worker(queen_module: Any) -> Iterator[GroupWorker]:
    worker = GroupWorker(queen_module.url)
    try:
        worker.wait_healthy()
        yield worker
    finally:
        worker.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_workers_process_group_is_a_clean_stop_in_one_line(
    group_worker: GroupWorker, sig: signal.Signals
) -> None:
    engine = engine_of(group_worker.proc.pid)
    assert os.getpgid(engine.pid) == group_worker.proc.pid  # the signal reaches both
    os.killpg(group_worker.proc.pid, sig)
    assert group_worker.proc.wait(30) == 0, group_worker.output()
    output = group_worker.output()
    assert output.strip().splitlines()[-1] == "llm-worker-rbee: stopped (the queen was told)"
    assert [line for line in output.splitlines() if "stop" in line] == [
        "llm-worker-rbee: stopped (the queen was told)"
    ], output
    assert "error" not in output
    assert "Traceback" not in output


def test_llama_server_never_holds_the_workers_port_which_refuses_and_binds_at_once(
    cluster: Any,
) -> None:
    queen = cluster.queen()
    worker = cluster.worker(queen.url, "--shutdown-grace", "30")
    engine = engine_of(worker.proc.pid)
    held = {c.laddr.port for c in engine.net_connections(kind="inet")}
    assert worker.port not in held, f"llama-server (pid {engine.pid}) holds the worker's port"

    # A long answer keeps the worker busy after SIGTERM: its port must refuse at once anyway.
    streaming = threading.Event()

    def generate() -> None:
        body = {"model": SMOLLM, "prompt": "1, 2, 3,", "max_tokens": 1500, "stream": True}
        with httpx.stream(
            "POST", f"{worker.url}/v1/completions", json=body, timeout=120
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streaming.set()

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        assert streaming.wait(30)
        worker.proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not refuses(worker.port):
            assert time.monotonic() < deadline, "the port still accepts connections"
            time.sleep(0.05)
        assert worker.proc.proc.poll() is None, "the worker should still be finishing its answer"
    finally:
        thread.join(120)
    assert worker.proc.wait(60) == 0
    bind_as_a_new_worker_would(worker.port)


def test_a_worker_whose_engine_stops_answering_leaves_and_the_queen_serves_elsewhere(
    cluster: Any,
) -> None:
    queen = cluster.queen()
    hung = cluster.worker(queen.url, "--stall-timeout", "3", "--shutdown-grace", "1")
    healthy = cluster.worker(queen.url)
    engine = engine_of(hung.proc.pid)
    engine.suspend()  # SIGSTOP: alive, holding its socket, answering nothing
    try:
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(httpx.post(f"{queen.url}/v1/chat/completions", json=CHAT, timeout=120))

        # Two at once: one slot each, so one of them is sent to the hung worker.
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert {a.headers["x-rbee-worker-id"] for a in answers} == {healthy.id}
        assert hung.proc.wait(60) == 1
    finally:
        if engine.is_running():
            engine.resume()
    assert "llama.cpp's server stopped answering (no answer in 3s)" in hung.proc.output()
    listed = httpx.get(f"{queen.url}/v1/workers").json()
    assert [w["id"] for w in listed["workers"]] == [healthy.id]


def test_a_sigterm_during_a_streamed_answer_lets_it_finish_in_full_then_exits_0(
    group_worker: GroupWorker,
) -> None:
    body = {**CHAT, "max_tokens": 48, "stream": True, "stream_options": {"include_usage": True}}
    chunks: list[str] = []
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{group_worker.url}/v1/chat/completions", json=body) as answer,
    ):
        assert answer.status_code == 200
        lines = answer.iter_lines()
        for line in lines:  # the answer has begun: then the stop comes
            if line.startswith("data:") and '"content"' in line:
                break
        group_worker.proc.send_signal(signal.SIGTERM)
        chunks = [line for line in lines if line.startswith("data:")]
    assert chunks[-1] == "data: [DONE]", chunks[-3:]
    compact = [c.replace(" ", "") for c in chunks]
    assert any('"finish_reason":"length"' in c or '"finish_reason":"stop"' in c for c in compact)
    assert not any('"error"' in c for c in compact), chunks[-3:]
    assert group_worker.proc.wait(30) == 0, group_worker.output()
    assert refuses(group_worker.port)
