"""What the queen adds over going straight to a worker, next to nginx as a plain reverse proxy.

    .venv/bin/python bench/proxy_bench.py [--rounds 5] [--requests 200] [--seconds 2] [--clients 32]

Starts one worker whose engine costs nothing (`rbee_testing.fake_worker`, 32 slots), a queen
it heartbeats to, and nginx from Debian as a keep-alive reverse proxy of the same worker (when
`nginx` is installed). The same chat completion is sent straight to the worker, through nginx
and through the queen, whole and streamed (time to first byte), by 1 client and by `--clients`
clients. Each round measures every column once, in a rotating order, so noise on a shared
machine hits all columns alike.

Below each scenario: the CPU time per request of the process that handled it (for
direct, the worker; for nginx, its worker process; for the queen, the queen alone).

Targets (issue 13), queen over direct: at most +1.0 ms at p50 and +2.0 ms at p99 with one
client; at `--clients` clients at least 0.8x the requests/s and at most 2x the p99.

The client is raw asyncio on uvloop with httptools parsing the responses, one keep-alive
connection per client: cheap enough that nginx's known small overhead (a few tenths of a ms)
shows up as such.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import httpx
import psutil
import uvloop

from rbee_testing.processes import ServerProcess, console_script, free_port

MODEL = "bench-model"
SLOTS = 32


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    # The processes that handle its requests, whose CPU time is counted (direct: the worker).
    processes: tuple[psutil.Process, ...]

    def cpu_s(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes)


class Failed(Exception):
    """A response other than 200; the connection stays usable."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; times the first body byte
    and the end of each response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[float] | None = None
        self.first_byte = 0.0
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        if not self.first_byte:
            self.first_byte = time.perf_counter()
        self.body += body

    def on_message_complete(self) -> None:
        assert self.done is not None
        status = self.parser.get_status_code()
        if status != 200:
            self.done.set_exception(Failed(f"HTTP {status} {bytes(self.body[:160]).decode()}"))
        else:
            self.done.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def request(self, raw: bytes) -> tuple[float, float]:
        """Seconds to the first body byte and to the end of the response."""
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.first_byte = 0.0
        self.body.clear()
        start = time.perf_counter()
        self.transport.write(raw)
        end = await self.done
        return self.first_byte - start, end - start


def request_bytes(port: int, token: str, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "stream": stream,
        }
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def connect(port: int) -> Connection:
    _, protocol = await asyncio.get_running_loop().create_connection(Connection, "127.0.0.1", port)
    return protocol


@dataclass
class Samples:
    """Latencies in seconds (first byte for streamed requests) and the requests/s of each slice."""

    latencies: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answered: int = 0  # requests sent, failed ones included
    cpu_s: float = 0.0  # CPU time its processes spent in those slices

    def timed(self, stream: bool, times: tuple[float, float]) -> None:
        self.latencies.append(times[0] if stream else times[1])

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def rate(self) -> float:
        return sum(self.rates) / len(self.rates)


async def attempt(
    port: int, conn: Connection, raw: bytes, stream: bool, into: Samples
) -> Connection:
    """One request; a failure is counted (not timed), and a lost connection replaced."""
    try:
        into.timed(stream, await conn.request(raw))
    except Failed as exc:
        into.errors.append(str(exc))
    except ConnectionError as exc:
        into.errors.append(str(exc))
        return await connect(port)
    return conn


async def one_client(port: int, raw: bytes, requests: int, stream: bool, into: Samples) -> None:
    conn = await connect(port)
    try:
        for _ in range(requests):
            conn = await attempt(port, conn, raw, stream, into)
    finally:
        assert conn.transport is not None
        conn.transport.close()


async def many_clients(
    port: int, raw: bytes, clients: int, seconds: float, stream: bool, into: Samples
) -> None:
    conns = [await connect(port) for _ in range(clients)]
    done = 0

    async def loop(i: int, until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            conns[i] = await attempt(port, conns[i], raw, stream, into)
            done += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(loop(i, start + seconds) for i in range(clients)))
    finally:
        for conn in conns:
            assert conn.transport is not None
            conn.transport.close()
    into.rates.append(done / (time.perf_counter() - start))
    into.answered += done


NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream worker {{
        server 127.0.0.1:{worker_port};
        keepalive 64;
        # Under uvicorn's 5 s: reusing a connection the worker is closing would fail a request.
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


@contextlib.contextmanager
def cluster(token: str) -> Iterator[list[Target]]:
    """A queen, one fake-engine worker heartbeating to it, and nginx in front of the same worker."""
    env = {"RBEE_TOKEN": token}
    queen_port, worker_port = free_port(), free_port()
    queen_url = f"http://127.0.0.1:{queen_port}"
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rbee-proxy-bench-"))
        queen = stack.enter_context(
            ServerProcess(
                [console_script("queen-rbee"), "--port", str(queen_port)],
                health_url=f"{queen_url}/health",
                env=env,
            )
        )
        worker = stack.enter_context(
            ServerProcess(
                [
                    console_script("python"),
                    "-m",
                    "rbee_testing.fake_worker",
                    "--model",
                    "fake",
                    "--model-id",
                    MODEL,
                    "--port",
                    str(worker_port),
                    "--queen-url",
                    queen_url,
                    "--slots",
                    str(SLOTS),
                    "--queue-size",
                    str(4 * SLOTS),
                ],
                health_url=f"http://127.0.0.1:{worker_port}/health",
                env=env,
            )
        )
        wait_registered(queen_url, token)
        targets = [Target("direct", worker_port, (psutil.Process(worker.pid),))]
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if nginx is None:
            print("nginx is not installed (apt-get install nginx): no nginx column")
        else:
            nginx_port = free_port()
            conf = Path(tmp, "nginx.conf")
            conf.write_text(
                NGINX_CONF.format(
                    user="user root;" if os.geteuid() == 0 else "",
                    tmp=tmp,
                    worker_port=worker_port,
                    port=nginx_port,
                )
            )
            master = stack.enter_context(
                ServerProcess(
                    [nginx, "-e", f"{tmp}/error.log", "-p", tmp, "-c", str(conf)],
                    health_url=f"http://127.0.0.1:{nginx_port}/health",
                )
            )
            nginx_workers = tuple(psutil.Process(master.pid).children())
            targets.append(Target("nginx", nginx_port, nginx_workers))
        targets.append(Target("queen", queen_port, (psutil.Process(queen.pid),)))
        yield targets


def wait_registered(queen_url: str, token: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        reply = httpx.get(f"{queen_url}/v1/workers", params={"available": "true"}, headers=headers)
        if reply.status_code == 200 and reply.json()["workers"]:
            return
        time.sleep(0.1)
    raise TimeoutError("the worker never became available in the queen")


SCENARIOS = [  # (label, clients > 1, streamed)
    ("1 client, whole", False, False),
    ("1 client, first byte", False, True),
    ("N clients, whole", True, False),
    ("N clients, first byte", True, True),
]


async def measure(
    targets: list[Target], token: str, args: argparse.Namespace
) -> dict[tuple[str, str], Samples]:
    results = {(label, t.name): Samples() for label, _, _ in SCENARIOS for t in targets}
    raws = {(t.name, s): request_bytes(t.port, token, s) for t in targets for s in (False, True)}
    for t in targets:  # warm up connections, pools and caches
        await many_clients(t.port, raws[t.name, False], args.clients, 0.5, False, Samples())
        await one_client(t.port, raws[t.name, True], 50, True, Samples())
    for r in range(args.rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for label, many, stream in SCENARIOS:
            for t in order:
                into = results[label, t.name]
                raw = raws[t.name, stream]
                cpu = t.cpu_s()
                if many:
                    await many_clients(t.port, raw, args.clients, args.seconds, stream, into)
                else:
                    await one_client(t.port, raw, args.requests, stream, into)
                    into.answered += args.requests
                into.cpu_s += t.cpu_s() - cpu
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return results


def report(targets: list[Target], results: dict[tuple[str, str], Samples], clients: int) -> None:
    names = [t.name for t in targets]
    print()
    print(f"{'ms (added over direct)':34}" + "".join(f"{n:>20}" for n in names))
    for label, many, _ in SCENARIOS:
        shown = label.replace("N clients", f"{clients} clients")
        rows = [("p50", 0.50), ("p99", 0.99)]
        for stat, q in rows:
            base = results[label, "direct"].pct(q)
            cells = []
            for n in names:
                value = results[label, n].pct(q)
                extra = "" if n == "direct" else f" ({value - base:+.2f})"
                cells.append(f"{value:.2f}{extra}")
            print(f"{shown + ' ' + stat:34}" + "".join(f"{c:>20}" for c in cells))
        if many:
            base = results[label, "direct"].rate()
            cells = []
            for n in names:
                value = results[label, n].rate()
                extra = "" if n == "direct" else f" ({value / base:.2f}x)"
                cells.append(f"{value:.0f}{extra}")
            print(f"{shown + ' req/s':34}" + "".join(f"{c:>20}" for c in cells))
        cpu = [results[label, n].cpu_s * 1000 / max(1, results[label, n].answered) for n in names]
        print(f"{shown + ' CPU ms/req':34}" + "".join(f"{c:>20.2f}" for c in cpu))
    for n in names:
        errors = [e for label, _, _ in SCENARIOS for e in results[label, n].errors]
        if errors:
            print(f"{n}: {len(errors)} failed requests, e.g. {errors[0]}")
    print()
    checks = []
    for label, many, _ in SCENARIOS:
        direct, queen = results[label, "direct"], results[label, "queen"]
        if many:
            checks.append((f"{label}: req/s >= 0.8x direct", queen.rate() >= 0.8 * direct.rate()))
            checks.append((f"{label}: p99 <= 2x direct", queen.pct(0.99) <= 2 * direct.pct(0.99)))
        else:
            checks.append((f"{label}: +p50 <= 1.0 ms", queen.pct(0.5) - direct.pct(0.5) <= 1.0))
            checks.append((f"{label}: +p99 <= 2.0 ms", queen.pct(0.99) - direct.pct(0.99) <= 2.0))
    for text, ok in checks:
        print(
            f"  {'ok  ' if ok else 'MISS'} queen {text.replace('N clients', f'{clients} clients')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--requests", type=int, default=200, help="per round and column, 1 client")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="per round and column, N clients"
    )
    parser.add_argument("--clients", type=int, default=SLOTS, help="concurrent clients")
    args = parser.parse_args()
    token = secrets.token_urlsafe(16)
    with cluster(token) as targets:
        cpu = time.process_time()
        results = uvloop.run(measure(targets, token, args))
        cpu = time.process_time() - cpu
    report(targets, results, args.clients)
    sent = sum(r.answered for r in results.values())
    # Warm-up requests are not counted, so this slightly overstates the client's cost.
    print(f"  (the client itself: {cpu * 1000 / sent:.3f} ms of CPU per request)")


if __name__ == "__main__":
    main()
