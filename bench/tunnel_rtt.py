"""What rbee's RPC tunnel adds to one round trip (issue 24): small request/answer exchanges, as
llama.cpp's RPC client makes several of per token and remote part, straight to an echo server and
through both ends of the tunnel (`rbee.common.tunnel`: `TunnelClient` -> `TunnelServer` -> the
server, each end a process of its own, as the worker and the helper's RPC part are).

    .venv/bin/python bench/tunnel_rtt.py [--count 2000] [--size 64] [--busy 0,2] [--loop-busy 1]

`--busy N`: N processes spinning meanwhile (as llama.cpp's OpenMP threads do after each graph
computation unless told to wait passively), to show what a relay's wake-up costs when every core
is taken. `--loop-busy MS`: the last two columns go through a second near end whose process
also runs Python for MS of every 5 ms, as the worker's event loop does while it forwards a
stream (the relay threads need the interpreter's lock after each kernel copy). Prints the median
and 90th percentile round trip in microseconds, direct and through the tunnel, for each load.
Run it under `flock /tmp/rbee-bench.lock`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rbee.common.tunnel import TunnelClient, TunnelServer

TOKEN = "tunnel-rtt-bench"
NAME = "rtt"


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def echo_server(sock: socket.socket) -> None:
    """Answers every read with its bytes, one connection at a time (as ggml-rpc-server does)."""
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)


def _serve_async(start: Callable[[], Any], ready: Any) -> None:
    async def run() -> None:
        port = await start()
        ready.send(port)
        await asyncio.Event().wait()

    asyncio.run(run())


def tunnel_server(target: int, ready: Any) -> None:
    server = TunnelServer(token=TOKEN, name=NAME, target_port=target)
    _serve_async(lambda: server.start("127.0.0.1", 0), ready)


def tunnel_client(far: int, loop_busy_ms: float, ready: Any) -> None:
    """The near end; `loop_busy_ms`: a thread beside it runs Python for that long in every
    5 ms, as a worker's event loop does while it forwards each token of a stream."""
    if loop_busy_ms:
        threading.Thread(target=python_work, args=(loop_busy_ms,), daemon=True).start()
    client = TunnelClient("127.0.0.1", far, NAME, TOKEN)
    _serve_async(client.start, ready)


def python_work(busy_ms: float) -> None:
    while True:
        until = time.perf_counter() + busy_ms / 1000
        while time.perf_counter() < until:
            pass
        time.sleep(max(0.0, 0.005 - busy_ms / 1000))


def spin() -> None:
    while True:
        pass


def round_trips(port: int, count: int, size: int) -> list[float]:
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for n in range(count + 50):
            began = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < size:
                got += len(sock.recv(1 << 16))
            if n >= 50:  # the first few warm up the path
                times.append((time.perf_counter() - began) * 1e6)
    return times


def _process(target: Callable[..., None], *args: Any) -> multiprocessing.Process:
    proc = multiprocessing.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _port_from(target: Callable[..., None], *args: Any) -> tuple[multiprocessing.Process, int]:
    here, there = multiprocessing.Pipe()
    proc = _process(target, *args, there)
    return proc, int(here.recv())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="round trips per figure")
    parser.add_argument("--size", type=int, default=64, help="bytes each way per round trip")
    parser.add_argument("--busy", default="0,2", help="spinning processes meanwhile, per run")
    parser.add_argument(
        "--loop-busy",
        type=float,
        default=1.0,
        help="ms of Python in every 5 ms beside a second near end (as a worker's loop)",
    )
    args = parser.parse_args()
    sock = _listen()
    procs = [_process(echo_server, sock)]
    echo_port = sock.getsockname()[1]
    server, far = _port_from(tunnel_server, echo_port)
    client, near = _port_from(tunnel_client, far, 0.0)
    loaded, near_loaded = _port_from(tunnel_client, far, args.loop_busy)
    procs += [server, client, loaded]
    print(f"round trip of {args.size} bytes each way, {args.count} times, microseconds:")
    print(
        f"{'busy':>5} {'direct p50':>11} {'p90':>7} {'tunnel p50':>11} {'p90':>7} {'added p50':>10}"
        f" {'loop-busy p50':>14} {'p90':>7}"
    )
    try:
        for busy in (int(b) for b in args.busy.split(",")):
            spinners = [_process(spin) for _ in range(busy)]
            try:
                time.sleep(0.2)
                direct = round_trips(echo_port, args.count, args.size)
                tunnel = round_trips(near, args.count, args.size)
                beside = round_trips(near_loaded, args.count, args.size)
            finally:
                for proc in spinners:
                    proc.kill()
            d50, t50 = statistics.median(direct), statistics.median(tunnel)
            d90 = statistics.quantiles(direct, n=10)[-1]
            t90 = statistics.quantiles(tunnel, n=10)[-1]
            b50, b90 = statistics.median(beside), statistics.quantiles(beside, n=10)[-1]
            print(
                f"{busy:>5} {d50:>11.0f} {d90:>7.0f} {t50:>11.0f} {t90:>7.0f} {t50 - d50:>10.0f}"
                f" {b50:>14.0f} {b90:>7.0f}"
            )
            sys.stdout.flush()
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    main()
