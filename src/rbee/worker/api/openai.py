"""The OpenAI-style API of one worker: its model, chat completions, text completions and
embeddings (a worker started for embeddings answers only those)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from rbee.common.errors import BadRequest, Unavailable
from rbee.contracts.apis import served_apis
from rbee.contracts.embeddings import EmbeddingList, EmbeddingRequest
from rbee.contracts.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    ModelServing,
)
from rbee.worker.api import passthrough
from rbee.worker.capabilities import check_chat, check_completion
from rbee.worker.embeddings import embed
from rbee.worker.engines.base import (
    Engine,
    EngineError,
    Prepare,
    Prompt,
    PromptError,
    SamplingParams,
)
from rbee.worker.generation import Generation
from rbee.worker.responses import ChatAnswer, EventStream, TextAnswer, sampling_params
from rbee.worker.runtime import WorkerRuntime, get_runtime
from rbee.worker.structured import plan_chat, tool_choice

router = APIRouter()
T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
Runtime = Annotated[WorkerRuntime, Depends(get_runtime)]


@router.get("/v1/models")
async def list_models(runtime: Runtime) -> ModelList:
    embedding = runtime.identity.embedding
    serving = ModelServing(
        state="loaded",
        embedding=embedding,
        workers=1,
        embedding_workers=int(embedding),
        apis=served_apis(chat=not embedding, embedding=embedding),
    )
    return ModelList(
        data=[ModelCard(id=runtime.model_id, created=runtime.started_at, rbee=serving)]
    )


def _generating(runtime: WorkerRuntime) -> None:
    if runtime.identity.embedding:
        raise BadRequest(
            f"this worker serves {runtime.model_id!r} for embeddings only (POST /v1/embeddings)",
            code="model_not_chat",
            param="model",
        )


async def _start(
    runtime: WorkerRuntime,
    prepare: Prepare,
    params: SamplingParams,
    schema_from: str = "response_format",
) -> Generation:
    """`schema_from`: the request field the JSON schema was made from, named if it is refused."""

    async def checked(engine: Engine) -> Prompt:
        engine.check(params)
        return await prepare(engine)

    lease = await runtime.acquire()
    try:
        return await runtime.start(lease, checked, params)
    except PromptError as exc:
        param = schema_from if exc.code == "invalid_schema" else exc.param
        raise BadRequest(exc.message, code=exc.code, param=param) from None
    except EngineError as exc:
        # Nothing was generated: a client (or the queen) may try again, here or elsewhere.
        raise Unavailable(str(exc), code="engine_unavailable") from None


async def _unless_client_leaves(http: Request, generation: Generation, whole: Awaitable[T]) -> T:
    """A whole answer, but stop generating if the client goes away meanwhile: nobody would read
    it, and the slot is better given to the next request."""
    task = asyncio.ensure_future(whole)
    while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
        if await http.is_disconnected():
            generation.cancel()
            break
    return await task


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: ChatCompletionRequest, runtime: Runtime, http: Request
) -> ChatCompletion | EventStream | Response:
    return await answer_chat(request, runtime, http)


async def answer_chat(
    request: ChatCompletionRequest, runtime: WorkerRuntime, http: Request, *, native: bool = True
) -> ChatCompletion | EventStream | Response:
    """`native`: tools may go to the model's own chat template, where it knows them (llama.cpp
    then formats and parses the calls); otherwise, and always with `native` False, they use the
    grammar-and-system-message fallback (`rbee.worker.structured`)."""
    runtime.check_model(request.model)
    _generating(runtime)
    check_chat(request)
    tools = bool(request.tools) and tool_choice(request) != "none"
    if tools and native and passthrough.tool_method(runtime) == passthrough.NATIVE:
        headers = {passthrough.TOOL_CALLS_HEADER: passthrough.NATIVE}
        raw = await http.body()
        return await passthrough.relay(
            runtime, passthrough.CHAT, raw, passthrough.CHAT, stream=request.stream, headers=headers
        )
    plan = plan_chat(request)

    async def prepare(engine: Engine) -> Prompt:
        return await engine.prepare_chat(plan.messages)

    schema_from = "tools" if plan.tools else "response_format"
    generation = await _start(runtime, prepare, sampling_params(request, plan), schema_from)
    answer = ChatAnswer(runtime.model_id, generation, plan, logprobs=bool(request.logprobs))
    if request.stream:
        stream = EventStream(answer.chunks(request.include_usage_in_stream))
        if tools:
            stream.headers[passthrough.TOOL_CALLS_HEADER] = passthrough.GRAMMAR
        return stream
    whole = await _unless_client_leaves(http, generation, answer.whole())
    if tools and native:
        # Said in a header as the native answer says it (the fallback's callers say it themselves).
        return JSONResponse(
            whole.model_dump(mode="json", exclude_none=False),
            headers={passthrough.TOOL_CALLS_HEADER: passthrough.GRAMMAR},
        )
    return whole


@router.post("/v1/completions", response_model=None)
async def completions(
    request: CompletionRequest, runtime: Runtime, http: Request
) -> Completion | EventStream:
    runtime.check_model(request.model)
    _generating(runtime)
    check_completion(request)
    text = request.prompt_text()

    async def prepare(engine: Engine) -> Prompt:
        return await engine.prepare_text(text)

    generation = await _start(runtime, prepare, sampling_params(request))
    answer = TextAnswer(runtime.model_id, generation, logprobs=request.logprobs is not None)
    if request.stream:
        return EventStream(answer.chunks(request.include_usage_in_stream))
    return await _unless_client_leaves(http, generation, answer.whole())


@router.post("/v1/embeddings")
async def embeddings(request: EmbeddingRequest, runtime: Runtime) -> EmbeddingList:
    runtime.check_model(request.model)
    return await embed(runtime, request)
