"""The README's promise: `rbee up` gives a working cluster, and Ctrl-C takes it all away."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rbee.cli import processes
from rbee_testing.processes import free_port

from .conftest import RBEE, processes_mentioning

pytestmark = pytest.mark.e2e
READY_LINE = "Press Ctrl-C to stop everything."


def port_is_free(port: int) -> bool:
    """Nothing listens there and a new daemon could bind it (TIME_WAIT leftovers are fine)."""
    return not processes.port_in_use("127.0.0.1", port)


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


def test_rbee_up_serves_the_default_model_and_stops_everything_on_ctrl_c(
    rbee: Any, env: dict[str, str], reaper: list[str], tmp_path: Path
) -> None:
    port, hive_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    reaper.extend([f"--port {port}", f"--port {hive_port}", url])
    log = tmp_path / "up.out"
    args = ["up", "--port", str(port), "--hive-port", str(hive_port)]
    args += ["--hive-id", "e2e-hive", "--models-dir", str(tmp_path / "models")]
    with log.open("w") as out:
        up = subprocess.Popen(
            [RBEE, *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        banner = wait_for_output(up, log, READY_LINE, timeout_s=240)
        assert f"OpenAI base URL: {url}/v1" in banner
        assert f"curl {url}/v1/chat/completions" in banner
        assert f'OpenAI(base_url="{url}/v1"' in banner

        # --max-tokens only bounds how long a wrong answer takes to fail the test.
        answer = rbee(
            "--queen-url", url, "infer", "What is the capital of France?", "--max-tokens", "48"
        )
        status = rbee("--queen-url", url, "status", "--json")
        second = rbee(*args)

        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout, answer.stdout
        workers = json.loads(status.stdout)["workers"]
        assert [(w["status"], w["hive_id"], w["available"]) for w in workers] == [
            ("ready", "e2e-hive", True)
        ]
        assert second.returncode == 1
        assert f"is already running (pid {up.pid})" in second.stderr
        assert "down` or Ctrl-C" in second.stderr  # how to stop it
        assert processes_mentioning("llm-worker-rbee", url), "the worker should be running"

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, log.read_text()
    finally:
        if up.poll() is None:  # an assertion failed above: still stop the cluster cleanly
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()

    assert processes_mentioning(f"--port {port}") == []
    assert processes_mentioning(f"--port {hive_port}") == []
    assert processes_mentioning("llm-worker-rbee", url) == []
    assert port_is_free(port)
    assert port_is_free(hive_port)
    assert "stopping 1 worker(s)" in log.read_text()
    assert log.read_text().rstrip().endswith("stopped")
