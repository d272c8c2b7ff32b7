"""`rbee status --watch` against a real queen: changes appear as they happen, a lost queen is
said plainly, and the view comes back with it."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time

import httpx
import pytest

from rbee_testing.processes import ServerProcess, console_script, free_port

pytestmark = pytest.mark.e2e


def heartbeat(url: str, status: str) -> None:
    worker = {"id": "w-watch", "model_id": "m", "port": 9, "status": status, "version": "1"}
    httpx.post(f"{url}/v1/worker-heartbeat", json={"worker": worker}, timeout=5).raise_for_status()


class Lines:
    """Everything a process prints, line by line, readable with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(
            target=lambda: [self._lines.put(line) for line in stdout], daemon=True
        ).start()

    def wait_for(self, *needles: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"never printed {needles}:\n{''.join(self.seen)}"
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if all(n in line for n in needles):
                return line


def test_watch_follows_changes_and_a_lost_queen() -> None:
    queen_port = free_port()
    url = f"http://127.0.0.1:{queen_port}"
    queen_args = [console_script("queen-rbee"), "--port", str(queen_port)]
    with ServerProcess(queen_args, health_url=f"{url}/health") as queen:
        watcher = subprocess.Popen(
            [console_script("rbee"), "--queen-url", url, "status", "--watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            lines = Lines(watcher)
            lines.wait_for("0 worker(s)")  # includes the CLI's own start
            heartbeat(url, "ready")
            assert "m" in lines.wait_for("w-watch", "ready")
            heartbeat(url, "stopping")
            lines.wait_for("w-watch", "stopping")
            queen.stop()
            lines.wait_for("queen unreachable", "retrying")
            with ServerProcess(queen_args, health_url=f"{url}/health"):
                heartbeat(url, "ready")
                lines.wait_for("w-watch", "ready")
            # Ctrl-C while the watcher retries a queen that went away again: it ends (exit 130)
            # within seconds, by its own cancellation or, failing that, by the CLI's grace
            # deadline. The wait is generous only for a busy machine.
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(60) == 130
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
            assert watcher.stdout is not None
            watcher.stdout.close()
