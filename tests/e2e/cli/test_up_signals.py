"""`rbee up | tee log`, then Ctrl-C (or the terminal closing): the output pipe is gone, and still
every process `rbee up` started is stopped."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee_testing.processes import free_port

from .conftest import RBEE
from .test_up import READY_LINE

pytestmark = pytest.mark.e2e


def read_until(fd: int, text: str, timeout_s: float) -> str:
    """What the pipe gave until `text` appeared (or the deadline passed)."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while text.encode() not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {text!r} from rbee up within {timeout_s}s:\n{seen.decode()}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"rbee up closed its output before {text!r}:\n{seen.decode()}"
            seen += chunk
    return seen.decode()


def alive(procs: list[psutil.Process]) -> list[str]:
    found = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {' '.join(proc.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return found


def wait_all_gone(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_a_closed_output_pipe_never_keeps_rbee_up_from_stopping_everything(
    sig: signal.Signals, env: dict[str, str], reaper: list[str], tmp_path: Path
) -> None:
    port, hive_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    reaper.extend([f"--port {port}", f"--port {hive_port}", url])
    args = ["up", "--port", str(port), "--hive-port", str(hive_port), "--hive-id", "sig-hive"]
    args += ["--models-dir", str(tmp_path / "models")]
    errors = tmp_path / "up.err"
    with errors.open("w") as err:
        up = subprocess.Popen([RBEE, *args], env=env, stdout=subprocess.PIPE, stderr=err)
    started: list[psutil.Process] = []
    try:
        assert up.stdout is not None
        read_until(up.stdout.fileno(), READY_LINE, timeout_s=300)
        # Everything it started: the queen, the hive, the worker and its llama-server.
        started = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for program in ("queen-rbee", "rbee-hive", "llm-worker-rbee", "llama-server"):
            assert program in names, names

        up.stdout.close()  # the reader is gone: `tee` stopped by the same Ctrl-C, `head -1`
        # The cluster does not depend on its audience: it still serves.
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200

        up.send_signal(sig)
        code = up.wait(180)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        leftovers = wait_all_gone(started, 60)
        for proc in started:  # never leave a cluster behind, whatever failed
            if alive([proc]):
                proc.kill()
    told = errors.read_text()
    assert leftovers == [], f"left running after rbee up:\n{leftovers}\n{told}"
    assert code == 0, told
    assert "standard output is closed" in told
    assert "stopping 1 worker(s)" in told
    assert told.rstrip().endswith("stopped")


def test_stdout_closed_after_the_first_line_keeps_the_cluster_until_ctrl_c(
    env: dict[str, str], reaper: list[str], tmp_path: Path, rbee: Any
) -> None:
    """`rbee up | head -1`: head leaves after one line; rbee up goes on serving, saying so on
    stderr (no silent exit 1), and Ctrl-C then stops it all and exits 0."""
    port, hive_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    reaper.extend([f"--port {port}", f"--port {hive_port}", url])
    args = ["up", "--port", str(port), "--hive-port", str(hive_port), "--hive-id", "head-hive"]
    args += ["--models-dir", str(tmp_path / "models")]
    errors = tmp_path / "up.err"
    with errors.open("w") as err:
        up = subprocess.Popen([RBEE, *args], env=env, stdout=subprocess.PIPE, stderr=err)
    started: list[psutil.Process] = []
    try:
        assert up.stdout is not None
        first = read_until(up.stdout.fileno(), "\n", timeout_s=120)
        assert "queen is up" in first
        up.stdout.close()  # what `head -1` does after its line
        deadline = time.monotonic() + 300
        while "rbee is up" not in errors.read_text():
            assert up.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, errors.read_text()
            time.sleep(0.5)
        started = psutil.Process(up.pid).children(recursive=True)
        status = rbee("--queen-url", url, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert '"ready"' in status.stdout
        up.send_signal(signal.SIGINT)
        code = up.wait(180)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        leftovers = wait_all_gone(started, 60)
        for proc in started:
            if alive([proc]):
                proc.kill()
    told = errors.read_text()
    assert leftovers == [], told
    assert code == 0, told
    assert "rbee: standard output is closed; messages go to standard error" in told
    assert told.rstrip().endswith("stopped")
