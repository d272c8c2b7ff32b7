"""Real processes: a queen, hives started against it, the real llm-worker-rbee, a stand-in Hub.

Workers live in their own sessions and outlive a killed hive by design; a hive's teardown ends
whatever it started (rbee_testing.processes.ServerProcess).
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbee_testing.processes import ServerProcess, console_script, free_port

STANDIN_HUB = Path(__file__).parent / "standin_hub.py"


@dataclass
class Daemon:
    proc: ServerProcess
    url: str


@dataclass
class HiveProc(Daemon):
    hive_id: str
    port: int


@pytest.fixture
def queen() -> Iterator[Daemon]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(
        [console_script("queen-rbee"), "--port", str(port)], health_url=f"{url}/health"
    ) as proc:
        yield Daemon(proc, url)


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    return root


@pytest.fixture
def hub(hub_root: Path) -> Iterator[Daemon]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, str(STANDIN_HUB), "--port", str(port), "--root", str(hub_root)]
    with ServerProcess(args, health_url=f"{url}/health") as proc:
        yield Daemon(proc, url)


HiveStarter = Callable[..., HiveProc]


@pytest.fixture
def start_hive(queen: Daemon, hub: Daemon, tmp_path: Path) -> Iterator[HiveStarter]:
    """Starts `rbee-hive` processes; the same `hive_id`/`port` may be passed to restart one."""
    started: list[HiveProc] = []
    first = free_port()

    def start(
        *,
        hive_id: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        flags: tuple[str, ...] = (),
    ) -> HiveProc:
        hive_id = hive_id or f"e2e-{secrets.token_hex(3)}"
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        args = [
            console_script("rbee-hive"),
            *("--queen-url", queen.url, "--port", str(port), "--hive-id", hive_id),
            *("--models-dir", str(tmp_path / "models"), "--log-dir", str(tmp_path / "logs")),
            *("--worker-ports", f"{first}-{min(first + 40, 65535)}"),
            *("--heartbeat-interval", "1", "--stop-grace", "10"),
            *flags,
        ]
        proc = ServerProcess(
            args, health_url=f"{url}/health", env={"HF_ENDPOINT": hub.url, **(env or {})}
        ).start()
        hive = HiveProc(proc, url, hive_id, port)
        started.append(hive)
        return hive

    yield start
    # Each hive's workers, and their engines, end with it (ServerProcess.end).
    for hive in started:
        hive.proc.__exit__(None, None, None)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Poll `check` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
