"""What recording Prometheus figures costs the queen's request path (issue 11: at most +0.1 ms
at p50 over the same queen without them).

    .venv/bin/python bench/metrics_bench.py [--rounds 5] [--requests 200] [--seconds 2] [--clients 32]

Runs `proxy_bench`'s set-up (a fake-engine worker, nginx when installed, the queen) plus a second
queen in which each request's `RequestTrack` does nothing, fed the same worker's heartbeats. Both
queens are measured in the same interleaved rounds, so a busy machine slows both alike. Also
prints the in-process CPU cost of one request's recording calls.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import threading
import time
import timeit
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).parent))
import proxy_bench  # the sibling benchmark's client and set-up
from rbee_testing.processes import ServerProcess, console_script, free_port

# A queen whose per-request recording is switched off; everything else is the real daemon.
UNRECORDED_QUEEN = """
import sys
import rbee.queen.metrics as metrics

class Unrecorded(metrics.RequestTrack):
    def lease(self, worker_id): self.worker = worker_id
    def failover(self): pass
    def first_byte(self): pass
    def end(self, code): pass

metrics.QueenMetrics.track = lambda self, model: Unrecorded(self, model, None, 0.0)
from rbee.queen.main import main
main(sys.argv[1:])
"""


def recording_cost_us(n: int = 200_000) -> float:
    """CPU per request of the calls the proxy makes: lease, first byte, end."""
    from rbee.queen.hives import HiveRegistry
    from rbee.queen.metrics import QueenMetrics
    from rbee.queen.registry import WorkerRegistry
    from rbee.queen.routing.admission import AdmissionQueue
    from rbee.queen.routing.load import LoadTracker

    metrics = QueenMetrics(
        WorkerRegistry(), HiveRegistry(90), LoadTracker(10), AdmissionQueue(1, 1)
    )

    def one() -> None:
        track = metrics.track("m")
        track.streamed = True
        track.lease("w1")
        track.first_byte()
        track.end(200)

    return timeit.timeit(one, number=n) / n * 1e6


@contextlib.contextmanager
def second_queen(token: str, worker_heartbeat: dict[str, object]) -> Iterator[tuple[int, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [console_script("python"), "-c", UNRECORDED_QUEEN, "--port", str(port)]
    with ServerProcess(args, health_url=f"{url}/health", env={"RBEE_TOKEN": token}) as queen:
        headers = {"Authorization": f"Bearer {token}"}
        stop = threading.Event()

        def beat() -> None:  # the worker beats to the first queen; this one hears it from here
            while not stop.is_set():
                httpx.post(f"{url}/v1/worker-heartbeat", json=worker_heartbeat, headers=headers)
                stop.wait(5.0)

        beating = threading.Thread(target=beat, daemon=True)
        beating.start()
        try:
            proxy_bench.wait_registered(url, token)
            yield port, queen.pid
        finally:
            stop.set()
            beating.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=proxy_bench.SLOTS)
    args = parser.parse_args()
    print(f"recording calls: {recording_cost_us():.1f} us of CPU per request (in-process)")
    token = secrets.token_urlsafe(16)
    with proxy_bench.cluster(token) as targets:
        queen = next(t for t in targets if t.name == "queen")
        headers = {"Authorization": f"Bearer {token}"}
        listed = httpx.get(
            f"http://127.0.0.1:{queen.port}/v1/workers", headers=headers, timeout=10
        ).json()["workers"][0]
        info = {k: listed[k] for k in ("id", "model_id", "port", "host", "slots", "version")}
        heartbeat = {"worker": {**info, "status": "ready"}}
        with second_queen(token, heartbeat) as (port, pid):
            targets = [*targets, proxy_bench.Target("no-metrics", port, (psutil.Process(pid),))]
            started = time.monotonic()
            results = uvloop.run(proxy_bench.measure(targets, token, args))
            print(f"measured in {time.monotonic() - started:.0f} s")
    print()
    for label, many, _ in proxy_bench.SCENARIOS:
        if many:
            queen, bare = results[label, "queen"], results[label, "no-metrics"]
            cpu = [1000 * s.cpu_s / max(1, s.answered) for s in (queen, bare)]
            print(
                f"{label:26} req/s  queen {queen.rate():8.0f}  no-metrics {bare.rate():8.0f}   "
                f"CPU ms/request  queen {cpu[0]:.3f}  no-metrics {cpu[1]:.3f}"
            )
            continue
        with_m = results[label, "queen"].pct(0.5)
        without = results[label, "no-metrics"].pct(0.5)
        verdict = "ok  " if with_m - without <= 0.1 else "MISS"
        print(
            f"{label:26} p50 ms  queen {with_m:6.3f}  no-metrics {without:6.3f}  "
            f"added {with_m - without:+.3f}  {verdict}(target <= +0.1 ms)"
        )


if __name__ == "__main__":
    main()
