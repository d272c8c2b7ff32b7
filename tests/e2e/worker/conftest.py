"""Real processes: a `queen-rbee` and `llm-worker-rbee` workers on loopback ports."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbee_testing.gguf import write_tiny_gguf
from rbee_testing.processes import ServerProcess, console_script, free_port

SMOLLM = "smollm2-135m-instruct"


@dataclass
class Daemon:
    proc: ServerProcess
    url: str
    port: int
    id: str = ""


def start_queen(port: int | None = None, token: str | None = None) -> Daemon:
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        [console_script("queen-rbee"), "--port", str(port)],
        health_url=f"{url}/health",
        env={"RBEE_TOKEN": token} if token else None,
    )
    proc.start(timeout_s=30)
    return Daemon(proc, url, port)


def worker_args(model: str, port: int, queen_url: str, worker_id: str, *extra: str) -> list[str]:
    return [
        console_script("llm-worker-rbee"),
        "--model", model,
        "--port", str(port),
        "--queen-url", queen_url,
        "--worker-id", worker_id,
        # One thread: the test machine's cores are shared with the queen, the test and other
        # suites, and llama.cpp's spinning thread barriers stall badly when oversubscribed.
        "--threads", "1",
        *extra,
    ]  # fmt: skip


def start_worker(
    queen_url: str, *extra: str, model: str = SMOLLM, token: str | None = None
) -> Daemon:
    port = free_port()
    worker_id = f"e2e-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        worker_args(model, port, queen_url, worker_id, *extra),
        health_url=f"{url}/health",
        env={"RBEE_TOKEN": token} if token else None,
    )
    proc.start(timeout_s=60)
    return Daemon(proc, url, port, worker_id)


class Cluster:
    """Starts daemons for one test and stops every one of them afterwards, whatever happens."""

    def __init__(self) -> None:
        self.started: list[Daemon] = []

    def queen(self, port: int | None = None, token: str | None = None) -> Daemon:
        self.started.append(daemon := start_queen(port, token))
        return daemon

    def worker(
        self, queen_url: str, *extra: str, model: str = SMOLLM, token: str | None = None
    ) -> Daemon:
        self.started.append(daemon := start_worker(queen_url, *extra, model=model, token=token))
        return daemon

    def close(self) -> None:
        for daemon in reversed(self.started):
            daemon.proc.__exit__(None, None, None)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def queen_module() -> Iterator[Daemon]:
    queen = start_queen()
    yield queen
    queen.proc.__exit__(None, None, None)


@pytest.fixture(scope="module")
def smollm_worker(queen_module: Daemon) -> Iterator[Daemon]:
    worker = start_worker(queen_module.url, "--heartbeat-interval", "1")
    yield worker
    worker.proc.__exit__(None, None, None)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf", context_length=512)


@pytest.fixture
def run_worker() -> Callable[..., tuple[int, str]]:
    """Run a worker expected to exit by itself: (exit code, its output)."""

    def run(queen_url: str, model: str, *extra: str, timeout: float = 30) -> tuple[int, str]:
        port = free_port()
        proc = ServerProcess(worker_args(model, port, queen_url, "doomed", *extra))
        with proc:
            code = proc.wait(timeout)
            return code, proc.output()

    return run
