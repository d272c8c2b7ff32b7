"""`rbee queen|hive start|stop|status` and `rbee status` against real processes."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from rbee.cli import processes
from rbee_testing.processes import free_port

pytestmark = pytest.mark.e2e


def port_is_free(port: int) -> bool:
    """Nothing listens there and a new daemon could bind it (TIME_WAIT leftovers are fine)."""
    return not processes.port_in_use("127.0.0.1", port)


def test_status_with_no_queen_is_one_line_and_exit_1(rbee: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = rbee("--queen-url", url, "status")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"rbee: queen is not running at {url} — start it with `rbee queen start` or `rbee up`\n"
    )


def test_queen_and_hive_run_in_the_background_and_stop_cleanly(
    rbee: Any, reaper: list[str], tmp_path: Any
) -> None:
    port, hive_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    reaper.extend([f"--port {port}", f"--port {hive_port}"])
    q = ("--queen-url", url)

    down = rbee(*q, "queen", "status")
    started = rbee(*q, "queen", "start")
    again = rbee(*q, "queen", "start")
    up = rbee(*q, "queen", "status")

    assert down.returncode == 1
    assert down.stdout.strip() == f"queen-rbee: down (nothing answers at {url})"
    assert started.returncode == 0, started.stderr
    assert "queen-rbee started (pid " in started.stdout
    assert f"at {url}" in started.stdout
    assert again.returncode == 0
    assert "queen-rbee is already running" in again.stdout
    assert up.returncode == 0
    assert "queen-rbee: up (pid " in up.stdout
    assert "answering" in up.stdout

    hive = rbee(
        *q,
        "hive",
        "start",
        "--port",
        str(hive_port),
        "--hive-id",
        "e2e-hive",
        "--models-dir",
        str(tmp_path / "models"),
        "--heartbeat-interval",
        "1",
    )
    assert hive.returncode == 0, hive.stderr
    assert rbee(*q, "hive", "status", "--port", str(hive_port)).returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = json.loads(rbee(*q, "status", "--json").stdout)
        if [h["id"] for h in status["hives"]] == ["e2e-hive"]:
            break
        time.sleep(0.2)
    assert [h["id"] for h in status["hives"]] == ["e2e-hive"]

    hive_stopped = rbee(*q, "hive", "stop")
    queen_stopped = rbee(*q, "queen", "stop")
    after = rbee(*q, "queen", "status")
    stop_again = rbee(*q, "queen", "stop")

    assert hive_stopped.stdout.startswith("rbee-hive stopped (pid ")
    assert queen_stopped.stdout.startswith("queen-rbee stopped (pid ")
    assert after.returncode == 1
    assert stop_again.returncode == 0
    assert "queen-rbee is not running" in stop_again.stdout
    assert port_is_free(port)
    assert port_is_free(hive_port)


def test_queen_start_on_a_taken_port_says_so(rbee: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]

        result = rbee("--queen-url", f"http://127.0.0.1:{port}", "queen", "start")

    assert result.returncode == 1
    assert result.stderr == (
        f"rbee: port {port} is already in use by another program — pick another with --port\n"
    )
