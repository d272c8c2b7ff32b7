"""A real Prometheus, told only the queen's discovery URL, scrapes the whole cluster."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_testing.processes import ServerProcess, free_port

from .conftest import Cluster

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")

# The configuration the repository ships and the README shows, pointed at this cluster.
SHIPPED_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "prometheus.yml"


def up_by_job(prometheus_url: str) -> dict[str, list[dict[str, Any]]]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": "up"}, timeout=5)
    response.raise_for_status()
    found: dict[str, list[dict[str, Any]]] = {}
    for result in response.json()["data"]["result"]:
        found.setdefault(result["metric"]["job"], []).append(
            {**result["metric"], "up": result["value"][1]}
        )
    return found


@pytest.mark.skipif(PROMETHEUS is None, reason="needs the `prometheus` binary (Debian: prometheus)")
def test_prometheus_finds_and_scrapes_queen_hive_and_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    assert cluster.token is not None
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token)
    token_file.chmod(0o600)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        SHIPPED_CONFIG.read_text()
        .replace("QUEEN", cluster.queen_url.removeprefix("http://"))
        .replace("/etc/prometheus/rbee-token", str(token_file))
        .replace("15s", "1s")
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    worker = cluster.spawned[0]
    with ServerProcess(args, health_url=f"{url}/-/ready").start(timeout_s=60) as prometheus:
        deadline = time.monotonic() + 60
        while True:
            found = up_by_job(url)
            wanted = ("rbee-queen", "rbee-hive", "rbee-worker")
            if all(any(t["up"] == "1" for t in found.get(job, [])) for job in wanted):
                break
            assert time.monotonic() < deadline, f"{found}\n{prometheus.output()[-2000:]}"
            time.sleep(0.5)
    assert found["rbee-hive"][0]["hive"] == cluster.hive_id
    scraped_worker = found["rbee-worker"][0]
    assert scraped_worker["worker"] == worker["worker_id"]
    assert scraped_worker["hive"] == cluster.hive_id
    assert scraped_worker["model"]
    assert found["rbee-queen"][0]["instance"] == cluster.queen_url.removeprefix("http://")
