"""Queen benchmarks: heartbeat ingestion over HTTP, and the cost of choosing a worker.

    .venv/bin/python bench/queen_bench.py [--workers 500] [--seconds 5] [--connections 32]

Targets (issue 2): at least 2,000 heartbeats/s; at most 50 µs per look-up with 10,000 workers
over 100 models. The heartbeat load comes from `wrk` (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import timeit
from pathlib import Path

import httpx

from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker
from rbee.queen.routing.policies import least_loaded
from rbee.queen.routing.router import Router
from rbee_testing.processes import ServerProcess, console_script, free_port


def heartbeat_body(i: int) -> bytes:
    info = WorkerInfo(
        id=f"sim-{i}",
        model_id=f"model-{i % 100}",
        port=8080 + i % 900,
        status=WorkerStatus.READY,
        version="bench",
    )
    return WorkerHeartbeat(worker=info).model_dump_json().encode()


WRK_SCRIPT = """
local bodies = {}
local n = 0
init = function(args)
  for line in io.lines(args[1]) do n = n + 1; bodies[n] = line end
end
local i = 0
request = function()
  i = i % n + 1
  return wrk.format("POST", "/v1/worker-heartbeat", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def heartbeat_throughput(workers: int, seconds: float, connections: int) -> float:
    """Drive the real queen process with `wrk` (a C load generator, so the client costs little
    of the two cores), each request a heartbeat from one of `workers` simulated workers."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("this benchmark needs wrk: apt-get install wrk")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    queen = [console_script("queen-rbee"), "--port", str(port)]
    with ServerProcess(queen, health_url=f"{url}/health"), tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp, "bodies.jsonl")
        bodies.write_text("\n".join(heartbeat_body(i).decode() for i in range(workers)) + "\n")
        script = Path(tmp, "heartbeat.lua")
        script.write_text(WRK_SCRIPT)
        result = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                str(script),
                url,
                "--",
                str(bodies),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        registered = len(httpx.get(f"{url}/v1/workers").json()["workers"])
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    if match is None or "Non-2xx" in result.stdout:
        raise SystemExit(f"wrk run failed:\n{result.stdout}{result.stderr}")
    print(f"{registered} simulated workers registered; wrk says:\n{result.stdout.strip()}")
    return float(match.group(1))


def lookup_cost_us(workers: int = 10_000, models: int = 100) -> float:
    """The router's choice of a worker for a request (without taking a lease on it)."""
    registry = WorkerRegistry()
    router = Router(registry, LoadTracker(5.0), least_loaded, AdmissionQueue(1, 1.0))
    for i in range(workers):
        info = WorkerInfo(
            id=f"w{i}",
            model_id=f"model-{i % models}",
            port=8080,
            status=WorkerStatus.READY if i % 5 else WorkerStatus.BUSY,
            version="bench",
            slots=4,
            in_flight=i % 4,
        )
        registry.update_worker(WorkerHeartbeat(worker=info))
    names = [f"model-{i % models}" for i in range(1000)]
    runs = 20
    total = timeit.timeit(
        lambda: [least_loaded(router.candidates(m), 0) for m in names], number=runs
    )
    return total / (runs * len(names)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=500, help="simulated workers")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32, help="concurrent HTTP connections")
    args = parser.parse_args()
    rate = heartbeat_throughput(args.workers, int(args.seconds), args.connections)
    print(f"heartbeat ingestion: {rate:,.0f} heartbeats/s (target >= 2,000)")
    cost = lookup_cost_us()
    print(f"worker choice, 10,000 workers / 100 models: {cost:.1f} us (target <= 50)")


if __name__ == "__main__":
    main()
