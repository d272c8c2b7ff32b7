"""The APIs the worker passes through to llama.cpp's server: Anthropic Messages
(`/v1/messages`, `/v1/messages/count_tokens`) and OpenAI Responses (`/v1/responses`,
`/v1/responses/input_tokens`), and chat completions with tools on a model whose chat template
knows them.

llama.cpp serves these with the model's own Jinja chat template (`--jinja`), which formats tool
calls as the model was trained to and parses them back. The worker sends the request on as it
is, holding one of its slots while llama.cpp answers (so admission, 429 and the slot count
stay the worker's), times it and counts its tokens in the worker's metrics, names its model by
the worker's model id, and relays its stream event for event. Closing the connection (the
client left) stops llama.cpp generating.

Two things llama.cpp would drop without a word are handled here instead: tools on a model
whose template knows none go through the worker's own chat completions and their
grammar-and-system-message fallback (`rbee.worker.translate`), and a Responses `text.format`
becomes the `response_format` llama.cpp does honour. `x-rbee-tool-calls` says which method a
request with tools got: `native` or `grammar`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol, runtime_checkable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from rbee.common import anthropic
from rbee.common.errors import BadRequest, NotFound, RbeeError, Unavailable
from rbee.contracts.openai import ChatCompletion, ChatCompletionRequest
from rbee.worker.engines.base import EngineError, FinishReason, Outcome
from rbee.worker.engines.llama_server import Relayed
from rbee.worker.generation import Lease
from rbee.worker.responses import EventStream
from rbee.worker.runtime import WorkerRuntime
from rbee.worker.translate.anthropic_messages import (
    chat_from_messages,
    check_messages,
    message_events,
    message_from_chat,
)
from rbee.worker.translate.common import tools_asked
from rbee.worker.translate.openai_responses import (
    chat_from_responses,
    check_responses,
    response_events,
    response_from_chat,
    responses_format,
)

log = logging.getLogger("rbee.worker")
router = APIRouter()
TOOL_CALLS_HEADER = "x-rbee-tool-calls"
NATIVE, GRAMMAR = "native", "grammar"
# The paths served, each with the path that counts its tokens.
MESSAGES, RESPONSES, CHAT = "/v1/messages", "/v1/responses", "/v1/chat/completions"
COUNTING = {"/v1/messages/count_tokens": MESSAGES, "/v1/responses/input_tokens": RESPONSES}


@runtime_checkable
class Relaying(Protocol):
    """An engine that can pass a request of llama.cpp's own APIs through (llama.cpp's)."""

    @property
    def native_tools(self) -> bool: ...

    async def relay(self, path: str, body: bytes) -> Relayed: ...


def tool_method(runtime: WorkerRuntime) -> str:
    """How this worker's tool calls are made: in the model's own format, or by grammar."""
    engines = runtime.engines
    if engines and isinstance(engines[0], Relaying) and engines[0].native_tools:
        return NATIVE
    return GRAMMAR


def _failed(api: str, exc: RbeeError) -> Response:
    if api == MESSAGES:
        return anthropic.error_response(exc)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def _check(runtime: WorkerRuntime, body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required and must be a non-empty string", param="model")
    runtime.check_model(model)
    if runtime.identity.embedding:
        raise BadRequest(
            f"this worker serves {runtime.model_id!r} for embeddings only (POST /v1/embeddings)",
            code="model_not_chat",
            param="model",
        )


def _engine(runtime: WorkerRuntime, path: str) -> Relaying:
    if runtime.pool is None or not runtime.engines:
        raise Unavailable("the model is still loading", code="model_loading")
    engine = runtime.engines[0]
    if not isinstance(engine, Relaying):
        raise NotFound(f"this worker's engine does not serve {path}", code="not_found")
    return engine


async def serve(http: Request, path: str) -> Response:
    api = COUNTING.get(path, path)
    runtime: WorkerRuntime = http.app.state.worker
    try:
        raw = await http.body()
        body = _body(raw)
        _check(runtime, body)
        if api == RESPONSES:
            check_responses(body)
        if api == MESSAGES:
            check_messages(body)
        engine = _engine(runtime, path)
        tools = tools_asked(body)
        if tools and not engine.native_tools and path not in COUNTING:
            return await _by_grammar(runtime, http, api, body)
        if api == RESPONSES and (fmt := responses_format(body)) is not None:
            # llama.cpp's Responses API ignores `text.format`; its `response_format` it honours.
            raw = json.dumps({**body, "response_format": fmt}).encode()
        headers = {TOOL_CALLS_HEADER: NATIVE} if tools else {}
        if path in COUNTING:
            return await _count(runtime, engine, path, raw, api)
        return await relay(
            runtime, path, raw, api, stream=body.get("stream") is True, headers=headers
        )
    except RbeeError as exc:
        return _failed(api, exc)


async def _count(
    runtime: WorkerRuntime, engine: Relaying, path: str, raw: bytes, api: str
) -> Response:
    """Counting tokens takes no slot: llama.cpp only tokenizes."""
    try:
        answer = await engine.relay(path, raw)
    except EngineError as exc:
        raise Unavailable(str(exc), code="engine_unavailable") from None
    try:
        content = await answer.read()
    except EngineError as exc:
        raise Unavailable(str(exc), code="engine_unavailable") from None
    finally:
        await answer.close()
    return _whole(answer, content, api, runtime.model_id)


def _whole(answer: Relayed, content: bytes, api: str, model: str) -> Response:
    if answer.status != 200:
        if api == MESSAGES:
            content = anthropic.reshape(answer.status, content)
        return Response(content, answer.status, media_type="application/json")
    return Response(_named(content, model), 200, media_type=answer.content_type)


def _named(content: bytes, model: str) -> bytes:
    """llama.cpp names its model by its file; the worker's clients know it by its id."""
    if b'"model"' not in content:
        return content
    try:
        data = json.loads(content)
    except ValueError:
        return content
    if not isinstance(data, dict):
        return content
    _rename(data, model)
    return json.dumps(data, ensure_ascii=False).encode()


def _rename(data: dict[str, Any], model: str) -> None:
    if "model" in data:
        data["model"] = model
    for key in ("message", "response"):  # a stream's first and last events carry it there
        if isinstance(inner := data.get(key), dict) and "model" in inner:
            inner["model"] = model


def _named_event(event: bytes, model: str) -> bytes:
    if b'"model"' not in event:
        return event
    lines = event.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: "):
            lines[i] = b"data: " + _named(line[6:], model)
    return b"\n".join(lines)


def _usage(data: Any) -> tuple[int, int] | None:
    """(prompt, generated) tokens of an answer or its last event, in any of the three APIs."""
    if not isinstance(data, dict):
        return None
    for key in ("response", "message"):
        if isinstance(data.get(key), dict) and "usage" in data[key]:
            data = data[key]
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("input_tokens", usage.get("prompt_tokens"))
    generated = usage.get("output_tokens", usage.get("completion_tokens"))
    if isinstance(prompt, int) and isinstance(generated, int):
        return prompt, generated
    return None


def _cut(data: Any) -> bool:
    """The answer (or its last event) says it stopped at its token limit."""
    if not isinstance(data, dict):
        return False
    inner = data.get("response") or data.get("message") or data
    inner = inner if isinstance(inner, dict) else data
    delta = data.get("delta")
    delta = delta if isinstance(delta, dict) else {}
    choices = data.get("choices") or [{}]
    first = choices[0] if isinstance(choices, list) and choices else {}
    return (
        "max_tokens" in (delta.get("stop_reason"), inner.get("stop_reason"))
        or inner.get("status") == "incomplete"
        or (isinstance(first, dict) and first.get("finish_reason") == "length")
    )


async def relay(
    runtime: WorkerRuntime,
    path: str,
    raw: bytes,
    api: str,
    *,
    stream: bool,
    headers: dict[str, str],
) -> Response:
    """Pass one generating request through to llama.cpp, holding a slot until its end."""
    lease = await runtime.acquire()
    engine = lease.engine
    if not isinstance(engine, Relaying):
        lease.release()
        raise NotFound(f"this worker's engine does not serve {path}", code="not_found")
    try:
        answer = await engine.relay(path, raw)
    except BaseException as exc:
        lease.release()
        if lease.timer is not None:
            lease.timer.ended(None)
        if isinstance(exc, EngineError):
            raise Unavailable(str(exc), code="engine_unavailable") from None
        raise
    if answer.status != 200 or not stream:
        try:
            content = await answer.read()
        except EngineError as exc:
            raise Unavailable(str(exc), code="engine_unavailable") from None
        finally:
            await answer.close()
            lease.release()
        if lease.timer is not None:
            outcome = None
            if answer.status == 200:
                lease.timer.piece()
                outcome = _outcome(content)
            lease.timer.ended(outcome)
        response = _whole(answer, content, api, runtime.model_id)
        response.headers.update(headers)
        return response
    return _streamed(_events(runtime, lease, answer, api), headers)


def _streamed(events: AsyncIterator[bytes], headers: dict[str, str]) -> EventStream:
    response = EventStream(events)
    response.headers.update(headers)
    return response


def _outcome(content: bytes) -> Outcome | None:
    try:
        data = json.loads(content)
    except ValueError:
        return None
    counted = _usage(data)
    if counted is None:
        return None
    return Outcome(counted[0], counted[1], "length" if _cut(data) else "stop")


async def _events(
    runtime: WorkerRuntime, lease: Lease, answer: Relayed, api: str
) -> AsyncIterator[bytes]:
    timer = lease.timer
    prompt = generated = 0
    cut = ended = False
    try:
        async for event in answer.events():
            if timer is not None and b"delta" in event:
                timer.piece()
            if b'"usage"' in event:
                # Anthropic's first event counts the prompt, its message_delta what was made;
                # the others' last event counts both.
                for line in event.split(b"\n"):
                    if line.startswith(b"data: ") and (data := _load(line[6:])) is not None:
                        prompt, generated = _tally(data, prompt, generated)
                        cut = cut or _cut(data)
            yield _named_event(event, runtime.model_id)
        ended = True
    except EngineError as exc:
        log.warning("llama.cpp broke off a relayed answer: %s", exc)
        message = f"the worker's engine broke off the answer: {exc}"
        if api == MESSAGES:
            yield anthropic.sse_error(503, message)
        else:
            body = Unavailable(message, code="engine_unavailable").body()
            yield f"data: {json.dumps(body)}\n\n".encode()
    finally:
        await answer.close()
        lease.release()
        if timer is not None:
            finish: FinishReason = "length" if cut else "stop"
            timer.ended(Outcome(prompt, generated, finish, cancelled=not ended))


def _tally(data: Any, prompt: int, generated: int) -> tuple[int, int]:
    if not isinstance(data, dict):
        return prompt, generated
    for key in ("response", "message"):
        if isinstance(data.get(key), dict) and "usage" in data[key]:
            data = data[key]
    usage = data.get("usage")
    if isinstance(usage, dict):
        given = usage.get("input_tokens", usage.get("prompt_tokens"))
        made = usage.get("output_tokens", usage.get("completion_tokens"))
        prompt = given if isinstance(given, int) and given > prompt else prompt
        generated = made if isinstance(made, int) and made > generated else generated
    return prompt, generated


def _load(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


async def _by_grammar(
    runtime: WorkerRuntime, http: Request, api: str, body: dict[str, Any]
) -> Response:
    """Tools on a model whose template knows none: the worker's own chat completions, whose
    tool calls use the grammar fallback, answered in the API's shape."""
    from rbee.worker.api.openai import answer_chat  # the chat route's own code

    chat = chat_from_messages(body) if api == MESSAGES else chat_from_responses(body)
    try:
        request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}", code="validation_error") from None
    completion = await answer_chat(request, runtime, http, native=False)
    assert isinstance(completion, ChatCompletion)
    headers = {TOOL_CALLS_HEADER: GRAMMAR}
    if api == MESSAGES:
        answer = message_from_chat(completion)
        events: Iterator[bytes] = message_events(answer) if body.get("stream") is True else iter(())
    else:
        answer = response_from_chat(completion, body)
        events = response_events(answer) if body.get("stream") is True else iter(())
    if body.get("stream") is True:

        async def stream() -> AsyncIterator[bytes]:
            for event in events:
                yield event

        return _streamed(stream(), headers)
    return JSONResponse(answer, headers=headers)


def _route(path: str) -> Any:
    async def endpoint(http: Request) -> Response:
        return await serve(http, path)

    endpoint.__name__ = path.strip("/").replace("/", "_")
    return endpoint


for _path in (MESSAGES, *COUNTING, RESPONSES):
    router.add_api_route(_path, _route(_path), methods=["POST"], response_model=None)
