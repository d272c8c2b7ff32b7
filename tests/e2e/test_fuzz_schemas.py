"""Fuzzing with schemathesis against each daemon's own OpenAPI schema, over real HTTP to real
processes (a queen, a hive reporting to it, a worker on a tiny random-weight model): no answer
is a 5xx, and every process is alive afterwards.

Bounded for two shared cores: a few examples per operation, no shrinking, a per-request
timeout, and generation capped by the tiny model's 64-token context.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from rbee_testing.gguf import write_tiny_gguf
from rbee_testing.processes import ServerProcess, console_script, free_port

pytestmark = pytest.mark.e2e

FUZZ = settings(
    max_examples=4,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is shown as found
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


@dataclass
class Daemons:
    queen: ServerProcess
    hive: ServerProcess
    worker: ServerProcess
    urls: dict[str, str]

    def all_alive(self) -> None:
        for name, proc in (("queen", self.queen), ("hive", self.hive), ("worker", self.worker)):
            assert proc.proc is not None
            assert proc.proc.poll() is None, f"{name} died:\n{proc.output()[-3000:]}"
            assert httpx.get(f"{self.urls[name]}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    tmp = tmp_path_factory.mktemp("fuzz")
    model = write_tiny_gguf(tmp / "tiny.gguf", context_length=64)
    queen_port, hive_port, worker_port = free_port(), free_port(), free_port()
    urls = {
        "queen": f"http://127.0.0.1:{queen_port}",
        "hive": f"http://127.0.0.1:{hive_port}",
        "worker": f"http://127.0.0.1:{worker_port}",
    }
    first = random.randrange(20000, 40000)
    queen = ServerProcess(
        [console_script("queen-rbee"), "--port", str(queen_port), "--data-dir", str(tmp / "q")],
        health_url=f"{urls['queen']}/health",
    )
    hive = ServerProcess(
        [
            console_script("rbee-hive"),
            *("--queen-url", urls["queen"], "--port", str(hive_port)),
            *("--hive-id", f"fuzz-{hive_port}", "--models-dir", str(tmp / "models")),
            *("--log-dir", str(tmp / "logs"), "--worker-ports", f"{first}-{first + 5}"),
        ],
        health_url=f"{urls['hive']}/health",
    )
    worker = ServerProcess(
        [
            console_script("llm-worker-rbee"),
            *("--model", str(model), "--model-id", "tiny", "--port", str(worker_port)),
            *("--queen-url", urls["queen"], "--ctx-size", "64", "--heartbeat-interval", "5"),
        ],
        health_url=f"{urls['worker']}/health",
    )
    with queen, hive, worker:
        yield Daemons(queen, hive, worker, urls)


def fuzz(daemons: Daemons, name: str) -> list[str]:
    """Every operation of the daemon's schema, a few generated requests each: the 5xx found.

    The operations are walked by hand (schemathesis's pytest plugin reaches into pytest
    internals that pytest 9 no longer has), each under Hypothesis with the bounds above."""
    schema = schemathesis.openapi.from_url(f"{daemons.urls[name]}/openapi.json", timeout=30)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @FUZZ
        def run(case: schemathesis.Case) -> None:
            # The schema's own URL gives the base URL the cases are sent to.
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.body!r:.200} → "
                    f"{response.status_code}: {response.text[:300]}"
                )

        run()
    assert operations >= 3, f"{name}'s schema has {operations} operations"
    return failures


@pytest.mark.parametrize("name", ["queen", "hive", "worker"])
def test_fuzzing_finds_no_server_error(daemons: Daemons, name: str) -> None:
    failures = fuzz(daemons, name)
    assert not failures, "\n".join(failures)
    daemons.all_alive()
