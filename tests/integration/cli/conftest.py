"""An in-process fake queen, served to the real `rbee` command tree through httpx's ASGI
transport: each test scripts what the queen knows and says, then reads what `rbee` printed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from typer.testing import CliRunner, Result

from rbee.cli.main import build_app
from rbee.clients.queen import QueenClient


def worker_json(worker_id: str = "w-1", **overrides: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": worker_id,
        "model_id": "smollm2-135m-instruct",
        "device": "cpu:0",
        "port": 8080,
        "status": "ready",
        "implementation": "llm-worker-rbee",
        "version": "0.1.0",
        "host": "127.0.0.1",
        "hive_id": "hive-a",
        "slots": 2,
        "in_flight": 1,
        "online": True,
        "available": True,
        "last_seen_s": 3.2,
        "timestamp": "2025-01-01T00:00:00Z",
    }
    return {**view, **overrides}


def hive_json(hive_id: str = "hive-a", **overrides: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": hive_id,
        "url": "http://127.0.0.1:7835",
        "version": "0.1.0",
        "devices": [
            {
                "id": "cpu:0",
                "kind": "cpu",
                "name": "CPU",
                "cores": 2,
                "memory_total_bytes": 8_000_000_000,
                "memory_free_bytes": 4_000_000_000,
            }
        ],
        "models": ["smollm2-135m-instruct"],
        "online": True,
        "last_seen_s": 1.5,
        "timestamp": "2025-01-01T00:00:00Z",
    }
    return {**view, **overrides}


def model_json(model_id: str, state: str = "loaded", workers: int = 1) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "rbee",
        "rbee": {"state": state, "workers": workers, "hives": ["hive-a"]},
    }


def sse(events: list[Any]) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event)
            yield f"data: {data}\n\n".encode()

    return body()


def error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class FakeQueen:
    workers: list[dict[str, Any]] = field(default_factory=list)
    hives: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    answer: list[str] = field(default_factory=lambda: ["The capital", " of France", " is Paris."])
    # What each job operation streams back; the last event should be `done` or `error`.
    job_events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    token: str | None = None
    stream_error: str | None = None  # sent as an error event after the answer's pieces
    jobs: list[dict[str, Any]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    chats: list[dict[str, Any]] = field(default_factory=list)
    model_events: list[dict[str, Any]] = field(default_factory=list)

    # Test files cannot import from conftest (importlib mode), so the builders live here.
    def add_worker(self, worker_id: str = "w-1", **overrides: Any) -> dict[str, Any]:
        self.workers.append(worker_json(worker_id, **overrides))
        return self.workers[-1]

    def add_hive(self, hive_id: str = "hive-a", **overrides: Any) -> dict[str, Any]:
        self.hives.append(hive_json(hive_id, **overrides))
        return self.hives[-1]

    def add_model(self, model_id: str, state: str = "loaded", workers: int = 1) -> None:
        self.models.append(model_json(model_id, state, workers))

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def check_token(request: Request, call_next: Any) -> Any:
            given = request.headers.get("authorization")
            if self.token and request.url.path != "/health" and given != f"Bearer {self.token}":
                return error(401, "missing or wrong bearer token", "invalid_token")
            return await call_next(request)

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok", "version": "0.1.0"}

        @app.get("/v1/workers")
        async def workers() -> dict[str, Any]:
            return {"workers": self.workers}

        @app.get("/v1/workers/{worker_id}")
        async def worker(worker_id: str) -> Any:
            for view in self.workers:
                if view["id"] == worker_id:
                    return view
            return error(404, f"no worker {worker_id!r}", "worker_not_found")

        @app.get("/v1/hives")
        async def hives() -> dict[str, Any]:
            return {"hives": self.hives}

        @app.get("/v1/model-events")
        async def model_events() -> dict[str, Any]:
            return {"events": self.model_events}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": self.models}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.chats.append(body)
            if body["model"] not in {m["id"] for m in self.models if m["rbee"]["workers"]}:
                return error(404, f"model {body['model']!r} not found", "model_not_found")
            if not body.get("stream"):
                message = {"role": "assistant", "content": "".join(self.answer)}
                return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
            chunks: list[Any] = [
                {"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in self.answer
            ]
            if self.stream_error:
                chunks.append({"error": {"message": self.stream_error, "code": "upstream_error"}})
            return StreamingResponse(sse([*chunks, "[DONE]"]), media_type="text/event-stream")

        @app.post("/v1/jobs", status_code=201)
        async def create_job(request: Request) -> dict[str, str]:
            self.jobs.append(await request.json())
            job_id = f"job-{len(self.jobs)}"
            return {"job_id": job_id, "sse_url": f"/v1/jobs/{job_id}/stream"}

        @app.get("/v1/jobs/{job_id}/stream")
        async def stream(job_id: str) -> StreamingResponse:
            operation = self.jobs[int(job_id.split("-")[1]) - 1]["operation"]
            events = self.job_events.get(operation, [{"type": "done", "result": {}}])
            return StreamingResponse(sse(events), media_type="text/event-stream")

        @app.delete("/v1/jobs/{job_id}")
        async def cancel(job_id: str) -> dict[str, str]:
            self.cancelled.append(job_id)
            return {"job_id": job_id, "status": "cancelled"}

        return app


Invoke = Callable[..., Result]


@pytest.fixture
def queen() -> FakeQueen:
    return FakeQueen()


def invoker(transport: Callable[[], httpx.AsyncBaseTransport]) -> Invoke:
    def make_client(url: str, token: str | None) -> QueenClient:
        return QueenClient(url, token=token, transport=transport())

    app = build_app(make_client)
    # Wide enough that tables do not wrap; no colour codes in what the tests read.
    # An empty state directory: no cluster that `rbee up` runs on this machine is found.
    state = "/nonexistent/rbee-test-state"
    runner = CliRunner(
        env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "RBEE_STATE_DIR": state}
    )

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(app, list(args), env=env)

    return invoke


@pytest.fixture
def rbee(queen: FakeQueen) -> Invoke:
    """Run `rbee ARGS…` against the fake queen."""
    return invoker(lambda: httpx.ASGITransport(app=queen.app()))


@pytest.fixture
def rbee_no_queen() -> Invoke:
    """Run `rbee ARGS…` where nothing listens at the queen's address."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    return invoker(lambda: httpx.MockTransport(refuse))


@pytest.fixture
def rbee_on() -> Callable[[Callable[[], httpx.AsyncBaseTransport]], Invoke]:
    """Run `rbee ARGS…` against any transport (e.g. the real queen app)."""
    return invoker
