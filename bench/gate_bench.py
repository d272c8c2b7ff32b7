"""What the request gate (rbee.common.gate) costs per request, on the proxy's hot path.

Three runs of: an ASGI app answering at once, called directly and through the gate, for a
chat completion POST as each kind of caller sends it (no token on loopback, the cluster token,
an API key). Prints microseconds per request and the gate's share.

    .venv/bin/python bench/gate_bench.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from rbee.common.gate import Gate
from rbee.queen.access import QUEEN_ACCESS
from rbee.queen.api.openai import proxy_routes
from rbee.queen.keys import KeyStore

TOKEN = "bench-cluster-token"


async def answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def scope_for(bearer: str | None) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1:7833"),
        (b"user-agent", b"OpenAI/Python 1.0"),
        (b"accept", b"application/json"),
        (b"content-type", b"application/json"),
        (b"content-length", b"120"),
    ]
    if bearer:
        headers.append((b"authorization", f"Bearer {bearer}".encode()))
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "scheme": "http",
        "headers": headers,
    }


async def per_request_us(app: Any, scope: dict[str, Any], n: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    start = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - start) / n * 1e6


async def main(n: int) -> None:
    routes_of = FastAPI()
    routes_of.router.routes[:0] = proxy_routes()
    with tempfile.TemporaryDirectory() as data:
        keys = KeyStore(Path(data))
        key = keys.create("bench").key
        cases = {
            "no token (loopback)": (
                Gate(answer, routes_of=routes_of, table=QUEEN_ACCESS, token=None),
                None,
            ),
            "cluster token": (
                Gate(answer, routes_of=routes_of, table=QUEEN_ACCESS, token=TOKEN),
                TOKEN,
            ),
            "API key": (
                Gate(answer, routes_of=routes_of, table=QUEEN_ACCESS, token=TOKEN, keys=keys),
                key,
            ),
        }
        print(f"{n} requests per run, 3 runs; µs per request (median [min-max])")
        for name, (gate, bearer) in cases.items():
            scope = scope_for(bearer)
            bare, gated = [], []
            for _ in range(3):
                bare.append(await per_request_us(answer, scope, n))
                gated.append(await per_request_us(gate, scope, n))
            extra = [g - b for g, b in zip(gated, bare, strict=True)]
            print(
                f"  {name:20} app alone {statistics.median(bare):5.2f}  through the gate "
                f"{statistics.median(gated):5.2f}  gate {statistics.median(extra):5.2f} "
                f"[{min(extra):.2f}-{max(extra):.2f}]"
            )
        keys.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    asyncio.run(main(parser.parse_args().requests))
