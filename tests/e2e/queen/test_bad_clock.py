"""Issue 22, item 4, replayed against a real `queen-rbee`: one hive heartbeat dated
`9999-12-31T23:59:59-05:00` used to end the queen's offline-watch and cleanup loops for good;
from then on `/v1/hives`, `/v1/models`, `rbee status`, `rbee models` and requests for unknown
models answered 500, and dead workers were never removed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from rbee_testing.processes import ServerProcess, console_script, free_port

pytestmark = pytest.mark.e2e

BAD_TIME = "9999-12-31T23:59:59-05:00"
MODEL = "acme/tiny-GGUF:tiny.Q4_0.gguf"


@pytest.fixture
def queen_url() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [console_script("queen-rbee"), "--port", str(port), "--heartbeat-timeout", "1.5"]
    args += ["--cleanup-interval", "0.5"]
    with ServerProcess(args, health_url=f"{url}/health"):
        yield url


def rbee(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [console_script("rbee"), "--queen-url", url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_heartbeat_from_year_9999_leaves_the_queen_listing_and_cleaning_up(
    queen_url: str,
) -> None:
    hive = {"id": "h1", "url": "http://127.0.0.1:7835", "version": "1"}
    worker = {"id": "w1", "model_id": MODEL, "port": 8080, "status": "ready", "version": "1"}
    with httpx.Client(base_url=queen_url, timeout=10) as client:
        beat = {"hive": hive, "models": [MODEL], "timestamp": BAD_TIME}
        client.post("/v1/hive-heartbeat", json=beat).raise_for_status()
        client.post(
            "/v1/worker-heartbeat", json={"worker": worker, "timestamp": BAD_TIME}
        ).raise_for_status()

        # The worker falls silent: the cleanup loop, which ran over the bad hive meanwhile,
        # must still remove it.
        deadline = time.monotonic() + 60
        while "w1" in {w["id"] for w in client.get("/v1/workers").json()["workers"]}:
            assert time.monotonic() < deadline, "the silent worker was never removed"
            time.sleep(0.2)

        # The hive went offline meanwhile too; it comes back with the same clock.
        client.post("/v1/hive-heartbeat", json=beat).raise_for_status()
        hives = client.get("/v1/hives")
        assert hives.status_code == 200
        assert [h["id"] for h in hives.json()["hives"]] == ["h1"]
        models = client.get("/v1/models")
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == [MODEL]
        unknown = client.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert unknown.status_code == 404
        metrics = client.get("/metrics").text
        assert 'rbee_background_errors_total{loop="cleanup"} 0.0' in metrics

    status = rbee(queen_url, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "h1" in status.stdout
    listed = rbee(queen_url, "models")
    assert listed.returncode == 0, listed.stdout + listed.stderr
