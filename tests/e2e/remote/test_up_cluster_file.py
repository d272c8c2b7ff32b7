"""`rbee up` with a cluster file naming a hive on another machine: the queen here, the hive over
SSH, a worker on it serving through the queen, and Ctrl-C leaving nothing behind anywhere."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rbee.cli import processes
from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.processes import free_port

from .conftest import Box, remote_hive_command
from .test_remote_hive import RBEE, processes_with_in_argv, rbee_env, run

pytestmark = pytest.mark.e2e
READY_LINE = "Press Ctrl-C to stop everything."


def wait_for_output(proc: subprocess.Popen[str], log: Path, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = log.read_text()
        if text in output:
            return output
        if proc.poll() is not None:
            pytest.fail(f"rbee up exited {proc.returncode} before {text!r}:\n{output}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} from rbee up after {timeout_s}s:\n{log.read_text()}")


def local_processes_with(needle: str) -> list[str]:
    return [p for p in processes_with_in_argv(needle) if "pytest" not in p]


def test_rbee_up_with_a_cluster_file_runs_a_worker_on_the_remote_hive_and_stops_it_all(
    box: Box, token: str, tmp_path: Path
) -> None:
    port, hive_port = free_port(), free_port()
    queen = f"http://127.0.0.1:{port}"
    config = tmp_path / "cluster.toml"
    config.write_text(
        f"""
[queen]
port = {port}

[[hive]]
ssh = "{box.target}"
hive_id = "box1"
port = {hive_port}
remote_command = "{remote_hive_command()}"
heartbeat_interval = 1

[[worker]]
model = "{DEFAULT_MODEL}"
"""
    )
    env = {**rbee_env(box, queen, token, tmp_path), "RBEE_CONFIG": str(config)}

    dry = run(env, "up", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"queen on 0.0.0.0:{port}" in dry.stdout
    assert f"hive box1 on {box.target} over SSH" in dry.stdout
    assert f"1 worker of {DEFAULT_MODEL} on hive box1" in dry.stdout
    assert box.rbee_processes() == []
    assert local_processes_with(f"--port {port}") == []

    log = tmp_path / "up.out"
    with log.open("w") as out:
        up = subprocess.Popen(
            [RBEE, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        banner = wait_for_output(up, log, READY_LINE, timeout_s=300)
        assert f"OpenAI base URL: {queen}/v1" in banner
        assert f"hive box1 is up on {box.target}" in banner

        answer = run(env, "infer", "What is the capital of France?", "--max-tokens", "48")
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
        workers = json.loads(run(env, "status", "--json").stdout)["workers"]
        assert [(w["hive_id"], w["host"], w["status"]) for w in workers] == [
            ("box1", box.address, "ready")
        ]
        assert len(box.serving_processes()) == 2  # the hive and its worker
        assert processes_with_in_argv(token) == []

        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0, log.read_text()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        leftovers = box.rbee_processes()
        for proc in leftovers:
            proc.kill()

    output = log.read_text()
    assert leftovers == [], output
    assert "stopping 1 worker(s)" in output
    assert "stopping hive box1 on" in output
    assert output.rstrip().endswith("stopped")
    assert local_processes_with(f"--port {port}") == []
    assert local_processes_with(queen) == []
    assert not processes.port_in_use("127.0.0.1", port)


def test_a_killed_rbee_up_has_its_remote_hive_stopped_by_the_next_one(
    box: Box, token: str, tmp_path: Path
) -> None:
    port, hive_port = free_port(), free_port()
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'[queen]\nport = {port}\n\n[[hive]]\nssh = "{box.target}"\nhive_id = "box1"\n'
        f'port = {hive_port}\nremote_command = "{remote_hive_command()}"\n'
    )
    env = {
        **rbee_env(box, f"http://127.0.0.1:{port}", token, tmp_path),
        "RBEE_CONFIG": str(config),
    }
    first_log, second_log = tmp_path / "first.out", tmp_path / "second.out"
    with first_log.open("w") as out:
        first = subprocess.Popen(
            [RBEE, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    second: subprocess.Popen[str] | None = None
    try:
        wait_for_output(first, first_log, READY_LINE, timeout_s=120)
        first.kill()  # no chance to clean: the queen here and the hive there stay
        first.wait()
        assert len(box.serving_processes()) == 1  # the hive

        with second_log.open("w") as out:
            second = subprocess.Popen(
                [RBEE, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
        output = wait_for_output(second, second_log, READY_LINE, timeout_s=120)
        assert f"stopped hive box1 on {box.target}, left by an earlier `rbee up`" in output
        assert "stopped queen-rbee (pid" in output
        second.send_signal(signal.SIGINT)
        assert second.wait(60) == 0, second_log.read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        leftovers = box.rbee_processes()
        for leftover in leftovers:
            leftover.kill()
    assert leftovers == []
    assert local_processes_with(f"--port {port}") == []
