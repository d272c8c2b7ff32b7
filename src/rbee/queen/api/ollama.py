"""Ollama's API on the queen (`/api/...`), for the tools that speak only it: Open WebUI,
Continue, Home Assistant, the `ollama` client libraries.

Thin: each request is translated to OpenAI's (`rbee.queen.ollama`) and sent through the queen's
one routing path (`Proxy.forward`: admission queue, on-demand start, failover, metrics, API key
usage), then the answer is translated back. Errors leave in Ollama's shape, `{"error": "..."}`.
Credentials are the OpenAI API's (an API key or the cluster token as the bearer token).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rbee import __version__
from rbee.common.disconnect import CLIENT_CLOSED_REQUEST, ClientGone, unless_client_leaves
from rbee.common.errors import BadRequest, NotFound, RbeeError, quote
from rbee.contracts.errors import read_error
from rbee.contracts.hives import ModelFootprint
from rbee.contracts.ollama import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
)
from rbee.contracts.workers import parse_keep_alive
from rbee.queen.live import model_entries
from rbee.queen.loading import body_of
from rbee.queen.ollama.answers import (
    StreamError,
    Translation,
    combine,
    embed_answer,
    loaded_answer,
    ndjson,
    sse_events,
)
from rbee.queen.ollama.models import ps_entry, show_answer, tag_entry
from rbee.queen.ollama.requests import (
    CHAT_PATH,
    EMBEDDINGS_PATH,
    IGNORED_HEADER,
    chat_body,
    embed_body,
    generate_body,
    load_only,
)
from rbee.queen.proxy import WORKER_HEADER
from rbee.queen.state import QueenState

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]
NDJSON = "application/x-ndjson"


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _ollama_errors(handler: Handler) -> Handler:
    """Errors in Ollama's shape, with the status rbee gives them."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except RbeeError as exc:
            return _error(exc.message, exc.status_code, exc.headers)

    return endpoint


async def _parse(request: Request, model: type[M]) -> M:
    try:
        payload = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadRequest(f"{where}: {first['msg']}") from None


def _state(request: Request) -> QueenState:
    state: QueenState = request.app.state.queen
    return state


def _headers(ignored: list[str], response: Response | None = None) -> dict[str, str]:
    headers = {IGNORED_HEADER: ",".join(ignored)} if ignored else {}
    if response is not None and (worker := response.headers.get(WORKER_HEADER)):
        headers[WORKER_HEADER] = worker
    return headers


class _Refused(RbeeError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status_code = status


def _refused(status: int, body: bytes) -> _Refused:
    """An error answer of the routing path, as Ollama's clients get it: an unknown model is 404."""
    message, code = read_error(status, body)
    return _Refused(message, 404 if code == "model_not_found" else status)


async def _lines(
    translation: Translation, chunks: AsyncIterator[bytes]
) -> AsyncIterator[dict[str, Any]]:
    async for data in sse_events(chunks):
        for line in translation.event(data, time.monotonic_ns()):
            yield line
    for line in translation.end(time.monotonic_ns()):
        yield line


async def _ndjson(lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for line in lines:
            yield ndjson(line)
    except StreamError as exc:  # the 200 is out: the error is the last line
        yield ndjson({"error": exc.message})


def _retype(response: Response, headers: dict[str, str]) -> None:
    """A worker's SSE answer, relayed as it is (its slot is freed however it ends), now NDJSON."""
    response.media_type = NDJSON
    kept = [(k, v) for k, v in response.raw_headers if k != b"content-type"]
    extra = [(k.encode(), v.encode()) for k, v in headers.items() if k != WORKER_HEADER]
    response.raw_headers = [*kept, (b"content-type", NDJSON.encode()), *extra]


async def _answer(
    request: Request,
    path: str,
    body: dict[str, Any],
    kind: Literal["chat", "generate"],
    stream: bool,
    ignored: list[str],
) -> Response:
    state, model = _state(request), str(body["model"])
    cold = state.proxy.cold(model, False)
    started = time.monotonic_ns()
    response = await state.proxy.forward(request, path, body=json.dumps(body).encode())
    headers = _headers(ignored, response)
    if response.status_code >= 400 or not isinstance(response, StreamingResponse):
        raise _refused(response.status_code, await body_of(response))
    translation = Translation(model, kind, started, cold)
    lines = _lines(translation, response.body_iterator)  # type: ignore[arg-type]  # bytes
    if stream:
        response.body_iterator = _ndjson(lines)
        _retype(response, headers)
        return response

    async def whole() -> list[dict[str, Any]]:
        return [line async for line in lines]

    try:
        collected = await unless_client_leaves(request.receive, whole())
    except StreamError as exc:
        return _error(exc.message, exc.status, headers)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(combine(collected), headers=headers)


async def _load(
    request: Request,
    model: str,
    keep_alive: str | float | None,
    kind: Literal["chat", "generate"],
    stream: bool,
) -> Response:
    """Load the model (start a worker if none serves it), as Ollama's clients preload one; with
    keep_alive 0, let it unload as soon as it is idle."""
    state = _state(request)
    started = time.monotonic_ns()
    try:
        seconds = None if keep_alive is None else parse_keep_alive(keep_alive)
    except ValueError as exc:
        raise BadRequest(f"keep_alive: {exc}", param="keep_alive") from None
    lease = await state.proxy.lease(model)
    try:
        if seconds is not None:
            state.router.tracker.ask_keep_alive(lease.worker_id, seconds)
    finally:
        state.router.release(lease)
    took = time.monotonic_ns() - started
    answer = loaded_answer(model, kind, seconds == 0, took, datetime.now(UTC))
    if stream:
        return Response(ndjson(answer), media_type=NDJSON)
    return JSONResponse(answer)


@_ollama_errors
async def chat(request: Request) -> Response:
    asked = await _parse(request, OllamaChatRequest)
    stream = asked.stream is not False
    if load_only(asked):
        return await _load(request, asked.model, asked.keep_alive, "chat", stream)
    body, ignored = chat_body(asked)
    return await _answer(request, CHAT_PATH, body, "chat", stream, ignored)


@_ollama_errors
async def generate(request: Request) -> Response:
    asked = await _parse(request, OllamaGenerateRequest)
    stream = asked.stream is not False
    if load_only(asked):
        return await _load(request, asked.model, asked.keep_alive, "generate", stream)
    path, body, ignored = generate_body(asked)
    return await _answer(request, path, body, "generate", stream, ignored)


async def _embeddings(request: Request, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The worker's OpenAI embeddings answer, and how long it took (ns)."""
    started = time.monotonic_ns()
    response = await _state(request).proxy.forward(
        request, EMBEDDINGS_PATH, embedding=True, body=json.dumps(body).encode()
    )
    raw = await body_of(response)
    if response.status_code >= 400:
        raise _refused(response.status_code, raw)
    answer: dict[str, Any] = json.loads(raw)
    return answer, time.monotonic_ns() - started


@_ollama_errors
async def embed(request: Request) -> Response:
    asked = await _parse(request, OllamaEmbedRequest)
    body, ignored = embed_body(asked)
    answer, took = await _embeddings(request, body)
    return JSONResponse(embed_answer(asked.model, answer, took), headers=_headers(ignored))


@_ollama_errors
async def embeddings(request: Request) -> Response:
    """The older endpoint: one text, one vector."""
    asked = await _parse(request, OllamaEmbeddingsRequest)
    body: dict[str, Any] = {"model": asked.model, "input": asked.prompt}
    if asked.keep_alive is not None:
        body["keep_alive"] = asked.keep_alive
    answer, _ = await _embeddings(request, body)
    return JSONResponse({"embedding": answer["data"][0]["embedding"]})


def _footprints(state: QueenState) -> dict[str, ModelFootprint]:
    found: dict[str, ModelFootprint] = {}
    for hive in state.hives.online():
        for model, footprint in hive.footprints.items():
            found.setdefault(model, footprint)
    return found


@_ollama_errors
async def tags(request: Request) -> Response:
    """Every model a worker serves or an online hive could start."""
    state = _state(request)
    footprints = _footprints(state)
    models = [tag_entry(e["id"], footprints.get(e["id"])) for e in model_entries(state)]
    return JSONResponse({"models": models})


@_ollama_errors
async def ps(request: Request) -> Response:
    """The models loaded now (a worker serves them), and when they unload if left idle."""
    state = _state(request)
    footprints, now = _footprints(state), datetime.now(UTC)
    running = []
    for entry in model_entries(state):
        if entry["rbee"]["state"] != "loaded":
            continue
        model = entry["id"]
        workers = state.registry.find_workers_by_model(model)
        on_gpu = any(not w.device.startswith("cpu") for w in workers)
        running.append(ps_entry(model, footprints.get(model), entry["rbee"], on_gpu, now))
    return JSONResponse({"models": running})


@_ollama_errors
async def show(request: Request) -> Response:
    state = _state(request)
    asked = await _parse(request, OllamaShowRequest)
    model = asked.model_name()
    if model is None:
        raise BadRequest("model is required", param="model")
    if model not in {e["id"] for e in model_entries(state)}:
        raise NotFound(f"model {quote(model)} not found: no worker serves it and no hive has it")
    return JSONResponse(show_answer(model, _footprints(state).get(model)))


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


def routes() -> list[Route]:
    """Plain Starlette routes, as the OpenAI proxy's: no dependencies to solve per request."""
    return [
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
    ]
