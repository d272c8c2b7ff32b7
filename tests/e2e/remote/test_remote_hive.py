"""`rbee hive start|status|logs|stop --ssh`: a hive on another machine (a network namespace
running a real sshd) joins a queen on this one, serves a chat request, and goes away."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.processes import (
    RUN_MARKER,
    ServerProcess,
    console_script,
    free_port,
    processes_with_in_argv,
)

from .conftest import Box, remote_hive_command

pytestmark = pytest.mark.e2e
RBEE = console_script("rbee")


@pytest.fixture
def queen(token: str) -> Iterator[str]:
    """A queen on every address of this machine, so the box reaches it over the LAN."""
    port = free_port()
    with ServerProcess(
        [console_script("queen-rbee"), "--host", "0.0.0.0", "--port", str(port)],
        env={"RBEE_TOKEN": token},
        health_url=f"http://127.0.0.1:{port}/health",
    ):
        yield f"http://127.0.0.1:{port}"


def rbee_env(box: Box, queen: str, token: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_") or k == RUN_MARKER}
    env.update(
        RBEE_TOKEN=token,
        RBEE_QUEEN_URL=queen,
        RBEE_SSH_COMMAND=box.ssh_command,
        RBEE_STATE_DIR=str(tmp_path / "run"),
        COLUMNS="200",
    )
    return env


def run(
    env: dict[str, str], *args: str, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RBEE, *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_a_hive_started_over_ssh_serves_through_the_queen_and_stops(
    box: Box, queen: str, token: str, tmp_path: Path
) -> None:
    env = rbee_env(box, queen, token, tmp_path)
    hive_port = free_port()
    where = ["--ssh", box.target, "--port", str(hive_port)]
    started = run(
        env,
        "hive", "start", *where,
        "--hive-id", "box1", "--remote-command", remote_hive_command(),
        "--heartbeat-interval", "1",
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert f"hive box1 is up on {box.target}" in started.stdout
        assert f"http://{box.address}:{hive_port}" in started.stdout

        assert processes_with_in_argv(token) == []

        status = run(env, "hive", "status", *where)
        assert status.returncode == 0, status.stderr
        assert "running" in status.stdout
        assert f"the queen at {queen} sees it" in status.stdout
        assert "does not see it" not in status.stdout

        spawned = run(env, "worker", "spawn", "-m", DEFAULT_MODEL, "--hive", "box1", timeout_s=300)
        assert spawned.returncode == 0, spawned.stderr
        answer = run(env, "infer", "What is the capital of France?", "--max-tokens", "48")
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
        workers = json.loads(run(env, "status", "--json").stdout)["workers"]
        assert [(w["hive_id"], w["host"]) for w in workers] == [("box1", box.address)]
        assert processes_with_in_argv(token) == []

        logs = run(env, "hive", "logs", *where)
        assert logs.returncode == 0, logs.stderr
        assert "rbee hive start" in logs.stdout

        stopped = run(env, "hive", "stop", *where, "--workers")
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped 1 worker(s)" in stopped.stdout
        assert f"rbee-hive on {box.target} (port {hive_port}) stopped" in stopped.stdout
        deadline = time.monotonic() + 20
        while box.rbee_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert box.rbee_processes() == []

        after = run(env, "hive", "status", *where)
        assert after.returncode == 1
        assert "not running" in after.stdout
    finally:
        for proc in box.rbee_processes():
            proc.kill()


def test_start_over_ssh_says_why_it_failed(
    box: Box, queen: str, token: str, tmp_path: Path
) -> None:
    env = rbee_env(box, queen, token, tmp_path)
    port = ["--port", str(free_port())]

    missing = run(
        env, "hive", "start", "--ssh", box.target, *port, "--remote-command", "/nope/rbee-hive"
    )
    assert missing.returncode == 1
    assert "rbee-hive not found on" in missing.stderr
    assert "/nope/rbee-hive" in missing.stderr

    no_sshd = run(
        {**env, "RBEE_SSH_COMMAND": box.ssh_command + " -p 2"},
        "hive",
        "start",
        "--ssh",
        box.target,
        *port,
    )
    assert no_sshd.returncode == 1
    assert f"SSH to {box.target} failed" in no_sshd.stderr

    # A hive that exits at start: its own message, from the end of its log.
    exited = run(
        env,
        "hive", "start", "--ssh", box.target, *port,
        "--remote-command", remote_hive_command(), "--worker-ports", "9000-8000",
    )  # fmt: skip
    assert exited.returncode == 1
    assert f"rbee-hive on {box.target} exited" in exited.stderr
    assert "--worker-ports" in exited.stderr

    # A queen URL the box cannot reach: the hive runs but never joins, and the log says why.
    unreachable = run(
        env,
        "hive", "start", "--ssh", box.target, *port,
        "--remote-command", remote_hive_command(), "--heartbeat-interval", "1",
        "--queen-url", "http://192.0.2.1:9", "--timeout", "8",
    )  # fmt: skip
    assert unreachable.returncode == 1
    assert "cannot reach the queen at http://192.0.2.1:9" in unreachable.stderr
    assert run(env, "hive", "stop", "--ssh", box.target, *port).returncode == 0
    assert box.rbee_processes() == []


def test_hive_service_over_ssh_writes_the_unit_and_the_private_token_file(
    box: Box, token: str, tmp_path: Path
) -> None:
    """This machine has no systemd user session, so `systemctl --user` fails there: the unit
    and the token file must be written all the same, and the failure said in one line."""
    env = rbee_env(box, "http://127.0.0.1:7900", token, tmp_path)
    result = run(
        env, "hive", "service", "--ssh", box.target, "--remote-command", remote_hive_command()
    )

    unit = (box.home / ".config" / "systemd" / "user" / "rbee-hive.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start == (
        f"ExecStart={remote_hive_command()} --queen-url http://{box.lan.gateway}:7900 "
        f"--host 0.0.0.0 --port 7835 --hive-id {box.address} --advertise-host {box.address}"
    )
    assert token not in unit
    env_file = box.home / ".config" / "rbee" / "hive.env"
    assert env_file.read_text() == f"RBEE_TOKEN={token}\n"
    assert env_file.stat().st_mode & 0o777 == 0o600
    if result.returncode != 0:
        assert result.stderr.startswith(
            f"rbee: wrote the unit rbee-hive.service on {box.target}, but systemctl --user "
            "failed there:"
        ), result.stderr


def test_hive_service_over_ssh_runs_under_the_remote_systemd_and_rejoins_after_its_reboot(
    systemd_box: Box, queen: str, token: str, tmp_path: Path
) -> None:
    """The box runs a real systemd user manager: the unit installed over SSH starts a hive that
    joins the queen here, and after a power cut of the box its fresh manager starts it again."""
    box, manager = systemd_box, systemd_box.systemd
    assert manager is not None
    env = rbee_env(box, queen, token, tmp_path)
    hive_port = free_port()
    installed = run(
        env,
        "hive", "service", "--ssh", box.target, "--port", str(hive_port), "--hive-id", "box1",
        "--remote-command", remote_hive_command(), "--heartbeat-interval", "1",
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert f"rbee-hive.service is enabled and started on {box.target}" in installed.stdout
    assert f"loginctl enable-linger failed on {box.target} (" in installed.stdout

    def joined() -> bool:
        listed = json.loads(run(env, "status", "--json").stdout)["hives"]
        return [(h["id"], h["url"], h["online"]) for h in listed] == [
            ("box1", f"http://{box.address}:{hive_port}", True)
        ]

    def wait_joined(what: str) -> None:
        deadline = time.monotonic() + 60
        while not joined():
            assert time.monotonic() < deadline, f"the hive did not join the queen {what}"
            time.sleep(0.5)

    wait_joined("once installed")
    assert manager.unit_property("rbee-hive.service", "ActiveState") == "active"
    assert box.rbee_processes(), "the hive runs inside the box"
    unit = (box.home / ".config" / "systemd" / "user" / "rbee-hive.service").read_text()
    assert token not in unit
    env_file = box.home / ".config" / "rbee" / "hive.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert processes_with_in_argv(token) == []

    manager.crash()
    assert box.rbee_processes() == []
    manager.boot()
    wait_joined("after the box rebooted")
    assert processes_with_in_argv(token) == []
