"""Every route of every daemon has a decided audience, and each kind of caller reaches exactly
the routes its audience allows. A new route without a decision fails here, saying what to add.

Each request goes straight into the app (the real gate, routes and handlers); only the status
of the answer's start is read, so endless streams (SSE) end the check at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI

from rbee.common.access import Audience, endpoints, undecided_routes
from rbee.hive.access import HIVE_ACCESS
from rbee.hive.app import create_app as create_hive
from rbee.hive.settings import HiveSettings
from rbee.queen.access import QUEEN_ACCESS
from rbee.queen.app import create_app as create_queen
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee.worker.access import WORKER_ACCESS
from rbee.worker.app import create_app as create_worker
from rbee.worker.settings import WorkerSettings
from rbee_testing.fake_engine import FakeEngine

TOKEN = "cluster-s3cret"


@dataclass
class Daemon:
    name: str
    app: FastAPI
    table: Mapping[str, Audience]
    table_file: str
    api_key: str  # a live key on the queen; elsewhere a key-shaped secret the daemon cannot know


def _queen(tmp_path: Path) -> Daemon:
    app = create_queen(QueenSettings(token=TOKEN, data_dir=tmp_path / "queen"))
    state: QueenState = app.state.queen
    key = state.keys.create("walker").key
    return Daemon("queen", app, QUEEN_ACCESS, "QUEEN_ACCESS in src/rbee/queen/access.py", key)


def _hive(tmp_path: Path) -> Daemon:
    settings = HiveSettings(
        queen_url="http://127.0.0.1:9",
        token=TOKEN,
        models_dir=tmp_path / "models",
        log_dir=tmp_path / "logs",
    )
    app = create_hive(settings)
    return Daemon("hive", app, HIVE_ACCESS, "HIVE_ACCESS in src/rbee/hive/access.py", "rbee_sk_x")


def _worker(tmp_path: Path) -> Daemon:
    settings = WorkerSettings(model="fake", port=9, queen_url="http://127.0.0.1:9", token=TOKEN)
    app = create_worker(settings, engine_factory=FakeEngine)
    return Daemon(
        "worker", app, WORKER_ACCESS, "WORKER_ACCESS in src/rbee/worker/access.py", "rbee_sk_x"
    )


DAEMONS = {"queen": _queen, "hive": _hive, "worker": _worker}


async def status_of(app: FastAPI, method: str, path: str, bearer: str | None) -> int:
    """The status an app answers a request with (body `{}` as JSON for POST/DELETE)."""
    body = b"{}" if method == "POST" else b""
    headers = [(b"host", b"127.0.0.1:9"), (b"content-type", b"application/json")]
    if bearer is not None:
        headers.append((b"authorization", f"Bearer {bearer}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 9),
    }
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    delivered = False

    async def receive() -> dict[str, object]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays; the check ends at the first answer
        raise AssertionError("unreachable")

    async def send(message: Mapping[str, object]) -> None:
        if message["type"] == "http.response.start" and not started.done():
            started.set_result(int(message["status"]))  # type: ignore[call-overload]

    task = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    try:
        return await asyncio.wait_for(asyncio.shield(started), 20)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def concrete(path: str) -> str:
    """A request path for a route template: each parameter becomes `1`."""
    out, depth = [], 0
    for char in path:
        if char == "{":
            depth += 1
            out.append("1")
        elif char == "}":
            depth -= 1
        elif depth == 0:
            out.append(char)
    return "".join(out)


@pytest.mark.parametrize("name", DAEMONS)
def test_every_route_has_a_decided_audience(name: str, tmp_path: Path) -> None:
    daemon = DAEMONS[name](tmp_path)
    missing = undecided_routes(daemon.app, daemon.table)
    assert not missing, (
        f"{daemon.name} routes with no decided audience: {missing}. Add each to "
        f"{daemon.table_file} as PUBLIC (anyone), INFERENCE (API keys and the cluster token) "
        "or CLUSTER (the cluster token only)."
    )
    stale = set(daemon.table) - {e.key for e in endpoints(daemon.app)}
    # FastAPI's pages are absent when a token is set; anything else listed must exist.
    assert stale <= {"GET /openapi.json", "GET /docs", "GET /docs/oauth2-redirect", "GET /redoc"}


@pytest.mark.parametrize("name", DAEMONS)
async def test_each_caller_reaches_exactly_what_its_audience_allows(
    name: str, tmp_path: Path
) -> None:
    daemon = DAEMONS[name](tmp_path)
    seen = []
    for endpoint in endpoints(daemon.app):
        key, method = endpoint.key, endpoint.method
        audience = daemon.table[key]
        path = concrete(endpoint.path)
        nobody = await status_of(daemon.app, method, path, None)
        wrong = await status_of(daemon.app, method, path, "not-the-token")
        api_key = await status_of(daemon.app, method, path, daemon.api_key)
        cluster = await status_of(daemon.app, method, path, TOKEN)
        got = (nobody, wrong, api_key, cluster)
        if audience is Audience.PUBLIC:
            assert not {401, 403} & set(got), (key, got)
        else:
            assert (nobody, wrong) == (401, 401), (key, got)
            assert cluster not in (401, 403), (key, got)
            if name != "queen":
                assert api_key == 401, (key, got)  # only the queen knows API keys
            elif audience is Audience.INFERENCE:
                assert api_key not in (401, 403), (key, got)
            else:
                assert api_key == 403, (key, got)
        seen.append(key)
    assert len(seen) >= 4  # the walk did walk


def test_an_api_key_reaches_only_inference_on_the_queen() -> None:
    inference = {k for k, a in QUEEN_ACCESS.items() if a is Audience.INFERENCE}
    assert inference == {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/embeddings",
        "GET /v1/models",
        "GET /v1/models/{model_id:path}",  # OpenAI's retrieve-model (issue 27)
        # Anthropic Messages and OpenAI Responses (issue 25)
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "POST /v1/responses",
        "POST /v1/responses/input_tokens",
        "POST /v1/rerank",  # a reranker model's workers (issue 25)
        "POST /v1/reranking",
        # Ollama's API (issue 25)
        "GET /api/tags",
        "GET /api/ps",
        "GET /api/version",
        "POST /api/show",
        "POST /api/chat",
        "POST /api/generate",
        "POST /api/embed",
        "POST /api/embeddings",
    }
