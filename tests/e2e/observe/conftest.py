"""A real cluster on loopback for the observability tests: queen-rbee and rbee-hive as processes,
SmolLM2 workers started through the queen's jobs, optionally with a cluster token."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.metrics import Samples, parse_samples
from rbee_testing.processes import ServerProcess, console_script, free_port

ARTIFACTS = Path(__file__).resolve().parents[3] / ".rbee-run" / "artifacts"


@dataclass
class Cluster:
    queen_url: str
    hive_url: str
    hive_id: str
    queen: ServerProcess
    hive: ServerProcess
    token: str | None = None
    spawned: list[dict[str, Any]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout_s: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.queen_url, headers=self.headers, timeout=timeout_s)

    def run_job(self, body: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        """Start a queen job and follow its SSE stream to the final event."""
        with self.client(timeout_s) as client:
            created = client.post("/v1/jobs", json=body)
            assert created.status_code == 201, created.text
            with connect_sse(client, "GET", created.json()["sse_url"]) as source:
                for event in source.iter_sse():
                    data: dict[str, Any] = json.loads(event.data)
                    if data["type"] in ("done", "error"):
                        return data
        raise AssertionError("job stream ended without a final event")

    def spawn_worker(self, model: str = DEFAULT_MODEL) -> dict[str, Any]:
        event = self.run_job({"operation": "worker_spawn", "model": model, "hive_id": self.hive_id})
        assert event["type"] == "done", event
        result: dict[str, Any] = event["result"]
        self.spawned.append(result)
        return result

    def stop_worker(self, worker_id: str) -> None:
        event = self.run_job({"operation": "worker_stop", "worker_id": worker_id})
        assert event["type"] == "done", event

    def workers(self) -> list[dict[str, Any]]:
        with self.client() as client:
            listed: list[dict[str, Any]] = client.get("/v1/workers").json()["workers"]
        return listed

    def scrape(self, url: str) -> Samples:
        response = httpx.get(f"{url}/metrics", headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        return parse_samples(response.text)


def start_cluster(tmp: Path, *queen_flags: str, token: str | None = None) -> Iterator[Cluster]:
    queen_port, hive_port = free_port(), free_port()
    first = random.randrange(20000, 40000)
    queen_url = f"http://127.0.0.1:{queen_port}"
    hive_url = f"http://127.0.0.1:{hive_port}"
    hive_id = f"obs-hive-{hive_port}"
    env = {"RBEE_TOKEN": token} if token else {}
    queen = ServerProcess(
        [console_script("queen-rbee"), "--port", str(queen_port), *queen_flags],
        health_url=f"{queen_url}/health",
        env=env,
    )
    hive = ServerProcess(
        [
            console_script("rbee-hive"),
            "--queen-url", queen_url,
            "--port", str(hive_port),
            "--hive-id", hive_id,
            "--models-dir", str(tmp / "models"),
            "--log-dir", str(tmp / "logs"),
            "--worker-ports", f"{first}-{first + 50}",
            "--heartbeat-interval", "1",
        ],
        health_url=f"{hive_url}/health",
        env=env,
    )  # fmt: skip
    with queen, hive:
        cluster = Cluster(queen_url, hive_url, hive_id, queen, hive, token)
        deadline = time.monotonic() + 20
        with cluster.client() as client:
            while not any(h["id"] == hive_id for h in client.get("/v1/hives").json()["hives"]):
                assert time.monotonic() < deadline, "the hive never reached the queen"
                time.sleep(0.1)
        try:
            yield cluster
        finally:
            for worker in cluster.workers():
                cluster.run_job({"operation": "worker_stop", "worker_id": worker["id"]})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A token-protected cluster with one SmolLM2 worker."""
    flags = ["--summary-interval", "1", "--stats-interval", "0.5"]
    tmp = tmp_path_factory.mktemp("observe")
    for c in start_cluster(tmp, *flags, token="e2e-observe-token"):
        c.spawn_worker()
        yield c
