"""A cluster spread over machines for tests and benchmarks: a queen on one network namespace of
a test LAN (`rbee_testing.netns`), one hive on each of the others, real processes throughout.

The test process talks to every daemon over the LAN, as an operator's laptop would, with the
cluster token that a non-loopback daemon requires. Process output goes to files under `logs`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing import netns
from rbee_testing.processes import console_script, run_mark

# Each daemon has a machine to itself, so fixed ports cannot collide with anything.
QUEEN_PORT = 17833
HIVE_PORT = 17835
WORKER_PORTS = "18080-18099"


@dataclass
class LanCluster:
    lan: netns.Lan
    logs: Path
    token: str = field(default_factory=lambda: f"lan-{secrets.token_hex(16)}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def queen_url(self) -> str:
        return f"http://{self.lan.address('queen')}:{QUEEN_PORT}"

    def hive_id(self, box: str) -> str:
        """Unique per LAN: a hive finds its workers by id among all of this host's processes
        (every namespace shares one pid space), so two test LANs must not share hive ids."""
        return f"{self.lan.prefix}-{box}"

    def hive_url(self, box: str) -> str:
        return f"http://{self.lan.address(box)}:{HIVE_PORT}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.queen_url, headers=self.headers, timeout=timeout_s)

    # -- processes ---------------------------------------------------------------------------

    def _start(self, host: str, name: str, argv: Sequence[str], health: str) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        env = {"RBEE_TOKEN": self.token, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        # Worker settings pass through to the workers the hives start: the "machines" of a test
        # LAN share this host's cores, so workers must wait passively (tests set
        # RBEE_WORKER_WAIT_POLICY=passive); two spinning on the same cores stall for seconds.
        env.update({k: v for k, v in os.environ.items() if k.startswith("RBEE_WORKER_")})
        env.update(run_mark())  # so the test run can tell what it started
        self.procs[name] = self.lan.popen(
            host, argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.output(name)}")
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"{name} not healthy after 60s:\n{self.output(name)}")

    def output(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_queen(self, *flags: str) -> None:
        argv = [console_script("queen-rbee"), "--host", self.lan.address("queen")]
        argv += ["--port", str(QUEEN_PORT), *flags]
        self._start("queen", "queen", argv, f"{self.queen_url}/health")

    def start_hive(self, box: str, heartbeat_interval_s: float = 1.0, *flags: str) -> None:
        """A hive on `box` whose workers heartbeat every `heartbeat_interval_s`; `flags`: more
        of rbee-hive's (`--memory-limit 230MiB`)."""
        argv = [
            console_script("rbee-hive"),
            "--queen-url", self.queen_url,
            "--host", self.lan.address(box),
            "--port", str(HIVE_PORT),
            "--hive-id", self.hive_id(box),
            "--models-dir", str(self.logs / box / "models"),
            "--log-dir", str(self.logs / box / "logs"),
            "--worker-ports", WORKER_PORTS,
            "--heartbeat-interval", str(heartbeat_interval_s),
            *flags,
        ]  # fmt: skip
        self._start(box, box, argv, f"{self.hive_url(box)}/health")
        hive_id = self.hive_id(box)
        self.wait_for(lambda: any(h["id"] == hive_id and h["online"] for h in self.hives()), 30)

    # -- the queen's API -----------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.queen_url}{path}", headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.json()

    def hives(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get("/v1/hives")["hives"]
        return found

    def workers(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get("/v1/workers")["workers"]
        return found

    def run_job(self, body: dict[str, Any], timeout_s: float = 180) -> dict[str, Any]:
        with self.client(timeout_s) as client:
            created = client.post("/v1/jobs", json=body)
            created.raise_for_status()
            with connect_sse(client, "GET", created.json()["sse_url"]) as source:
                for event in source.iter_sse():
                    data: dict[str, Any] = json.loads(event.data)
                    if data["type"] in ("done", "error"):
                        return data
        raise AssertionError("job stream ended without a final event")

    def spawn_worker(self, box: str | None, model: str = DEFAULT_MODEL, slots: int = 1) -> str:
        hive_id = None if box is None else self.hive_id(box)
        body = {"operation": "worker_spawn", "model": model, "slots": slots, "hive_id": hive_id}
        event = self.run_job({k: v for k, v in body.items() if v is not None})
        if event["type"] != "done":
            raise RuntimeError(f"worker_spawn failed: {event}")
        worker_id: str = event["result"]["worker_id"]
        return worker_id

    def worker_processes(self, box: str) -> list[dict[str, Any]]:
        """The worker processes running on `box`, as its hive finds them."""
        response = httpx.get(f"{self.hive_url(box)}/v1/workers", headers=self.headers, timeout=10)
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["workers"]
        return found

    def worker_pid(self, box: str, worker_id: str) -> int:
        """The pid of a worker on `box`, as its hive reports it."""
        for process in self.worker_processes(box):
            if process["worker_id"] == worker_id:
                pid: int = process["pid"]
                return pid
        raise LookupError(f"hive {box} runs no worker {worker_id}")

    @staticmethod
    def wait_for(condition: Any, timeout_s: float, interval_s: float = 0.1) -> float:
        """Poll until `condition()` is true; returns the seconds it took."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"condition not met within {timeout_s}s")
            time.sleep(interval_s)
        return time.monotonic() - start
