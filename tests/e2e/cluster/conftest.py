"""A real cluster on loopback: queen-rbee, rbee-hive, and SmolLM2 workers started through them."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.processes import ServerProcess, console_script, free_port


@dataclass
class Cluster:
    queen_url: str
    hive_url: str
    hive_id: str
    queen: ServerProcess
    hive: ServerProcess

    def run_job(self, body: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        """Start a queen job and follow its SSE stream to the final event."""
        with httpx.Client(base_url=self.queen_url, timeout=timeout_s) as client:
            created = client.post("/v1/jobs", json=body)
            assert created.status_code == 201, created.text
            with connect_sse(client, "GET", created.json()["sse_url"]) as source:
                for event in source.iter_sse():
                    data: dict[str, Any] = json.loads(event.data)
                    if data["type"] in ("done", "error"):
                        return data
        raise AssertionError("job stream ended without a final event")

    def spawn_worker(self, model: str = DEFAULT_MODEL, **fields: Any) -> dict[str, Any]:
        job = {"operation": "worker_spawn", "model": model, "hive_id": self.hive_id, **fields}
        event = self.run_job(job)
        assert event["type"] == "done", event
        result: dict[str, Any] = event["result"]
        return result

    def workers(self, **params: str) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = httpx.get(
            f"{self.queen_url}/v1/workers", params=params
        ).json()["workers"]
        return listed

    def stop_all_workers(self) -> None:
        for worker in self.workers():
            self.run_job({"operation": "worker_stop", "worker_id": worker["id"]})


def start_cluster(
    tmp: Path, *queen_flags: str, hive_flags: tuple[str, ...] = ()
) -> Iterator[Cluster]:
    queen_port, hive_port = free_port(), free_port()
    first = random.randrange(20000, 40000)
    queen_url = f"http://127.0.0.1:{queen_port}"
    hive_url = f"http://127.0.0.1:{hive_port}"
    hive_id = f"e2e-hive-{hive_port}"
    queen = ServerProcess(
        [console_script("queen-rbee"), "--port", str(queen_port), *queen_flags],
        health_url=f"{queen_url}/health",
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
            *hive_flags,
        ],
        health_url=f"{hive_url}/health",
    )  # fmt: skip
    with queen, hive:
        cluster = Cluster(queen_url, hive_url, hive_id, queen, hive)
        deadline = time.monotonic() + 20
        while not any(
            h["id"] == hive_id for h in httpx.get(f"{queen_url}/v1/hives").json()["hives"]
        ):
            assert time.monotonic() < deadline, "the hive never reached the queen"
            time.sleep(0.1)
        try:
            yield cluster
        finally:
            cluster.stop_all_workers()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Queue of 2 per model, and two one-slot SmolLM2 workers started through the queen's jobs."""
    flags = ["--queue-size", "2", "--queue-timeout", "60", "--cooldown", "5"]
    for c in start_cluster(tmp_path_factory.mktemp("cluster"), *flags):
        c.spawn_worker(slots=1)
        c.spawn_worker(slots=1)
        yield c


@pytest.fixture(scope="session")
def apps_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """What applications talk to (issue 16): one chat worker and one embedding worker of the
    bundled model, started by jobs; shared by the openai-client and LangChain tests."""
    for c in start_cluster(tmp_path_factory.mktemp("apps")):
        c.spawn_worker()
        event = c.run_job(
            {
                "operation": "worker_spawn",
                "model": DEFAULT_MODEL,
                "hive_id": c.hive_id,
                "embedding": True,
            }
        )
        assert event["type"] == "done", event
        yield c
