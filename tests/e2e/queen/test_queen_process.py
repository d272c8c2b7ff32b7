"""The real `queen-rbee` process over HTTP: registry, SSE stream, shutdown, refusal to start."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from rbee_testing.processes import ServerProcess, console_script, free_port

pytestmark = pytest.mark.e2e


def hb(worker_id: str, status: str = "ready", **extra: Any) -> dict[str, Any]:
    worker = {"id": worker_id, "model_id": "m", "port": 8080, "status": status, "version": "1"}
    return {"worker": {**worker, **extra}}


@pytest.fixture
def queen() -> Iterator[tuple[ServerProcess, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [console_script("queen-rbee"), "--port", str(port), "--heartbeat-timeout", "1.5"]
    args += ["--cleanup-interval", "0.5", "--summary-interval", "0.5"]
    with ServerProcess(args, health_url=f"{url}/health") as proc:
        yield proc, url


def test_stream_reports_registration_changes_offline_and_summaries(
    queen: tuple[ServerProcess, str],
) -> None:
    _, url = queen
    seen: list[tuple[str, dict[str, Any]]] = []
    with (
        httpx.Client(base_url=url, timeout=10) as client,
        connect_sse(client, "GET", "/v1/heartbeats/stream") as source,
    ):
        events = source.iter_sse()
        first = next(events)
        assert first.event == "summary"
        client.post("/v1/worker-heartbeat", json=hb("w1", "starting")).raise_for_status()
        client.post("/v1/worker-heartbeat", json=hb("w1", "ready")).raise_for_status()
        deadline = time.monotonic() + 8
        for event in events:
            seen.append((event.event, json.loads(event.data)))
            if event.event == "worker" and json.loads(event.data)["state"] == "removed":
                break
            assert time.monotonic() < deadline, seen
    states = [data["state"] for name, data in seen if name == "worker"]
    assert states == ["starting", "ready", "offline", "removed"]
    summaries = [data for name, data in seen if name == "summary"]
    assert summaries, "expected periodic summary events"
    assert {"online", "available"} <= set(summaries[0])


def test_sigterm_exits_zero(queen: tuple[ServerProcess, str]) -> None:
    proc, url = queen
    httpx.post(f"{url}/v1/worker-heartbeat", json=hb("w1")).raise_for_status()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_sigint_exits_zero(queen: tuple[ServerProcess, str]) -> None:
    proc, _ = queen
    proc.signal(signal.SIGINT)
    assert proc.wait(10) == 0


def test_malformed_heartbeat_leaves_the_queen_running(queen: tuple[ServerProcess, str]) -> None:
    _, url = queen
    bad = httpx.post(
        f"{url}/v1/worker-heartbeat", content=b"]]", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400
    assert httpx.post(f"{url}/v1/worker-heartbeat", json=hb("w1")).status_code == 200
    assert httpx.get(f"{url}/v1/workers/w1").json()["available"] is True


def test_refuses_to_listen_off_loopback_without_a_token() -> None:
    result = subprocess.run(
        [console_script("queen-rbee"), "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "token" in lines[0]
    assert "Traceback" not in result.stderr


def test_taken_port_is_a_one_line_error(queen: tuple[ServerProcess, str]) -> None:
    _, url = queen
    port = url.rsplit(":", 1)[1]
    result = subprocess.run(
        [console_script("queen-rbee"), "--port", port], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_oversized_body_is_413_before_it_is_sent(queen: tuple[ServerProcess, str]) -> None:
    """A client announcing a 1 GiB body gets 413 at once, without sending it; the queen
    stays up. (Raw socket: an HTTP client would insist on sending the body it announced.)"""
    proc, url = queen
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{".encode()
        )
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer
    assert httpx.get(f"{url}/health").status_code == 200
    assert proc.proc is not None
    assert proc.proc.poll() is None


def test_a_web_page_cannot_register_a_worker(queen: tuple[ServerProcess, str]) -> None:
    """The attack of issue 10 against a real queen: a cross-site `text/plain` POST, and the
    same through a rebound DNS name."""
    _, url = queen
    evil = json.dumps(hb("evil", host="attacker.example", slots=64))
    plain = httpx.post(
        f"{url}/v1/worker-heartbeat",
        content=evil,
        headers={"content-type": "text/plain", "origin": "https://attacker.example"},
    )
    assert plain.status_code in (403, 415)
    rebound = httpx.post(
        f"{url}/v1/worker-heartbeat", content=evil, headers={"content-type": "text/plain"}
    )
    assert rebound.status_code == 415
    renamed = httpx.post(
        f"{url}/v1/worker-heartbeat", json=json.loads(evil), headers={"host": "attacker.example"}
    )
    assert renamed.status_code == 421
    assert httpx.get(f"{url}/v1/workers/evil").status_code == 404
