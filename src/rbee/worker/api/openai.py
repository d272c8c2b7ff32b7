"""The OpenAI-style API of one worker: its model, chat completions and text completions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from rbee.common.errors import BadRequest
from rbee.contracts.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from rbee.worker.engines.base import Engine, Message, Prompt, PromptError
from rbee.worker.generation import Generation
from rbee.worker.responses import (
    ChatAnswer,
    TextAnswer,
    sampling_params,
    sse_response,
)
from rbee.worker.runtime import WorkerRuntime, get_runtime

router = APIRouter()
T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
Runtime = Annotated[WorkerRuntime, Depends(get_runtime)]


@router.get("/v1/models")
async def list_models(runtime: Runtime) -> ModelList:
    return ModelList(data=[ModelCard(id=runtime.model_id, created=runtime.started_at)])


async def _start(
    runtime: WorkerRuntime,
    prepare: Callable[[Engine], Prompt],
    request: ChatCompletionRequest | CompletionRequest,
) -> Generation:
    runtime.check_model(request.model)
    params = sampling_params(request)
    lease = await runtime.acquire()
    try:
        return await runtime.start(lease, prepare, params)
    except PromptError as exc:
        raise BadRequest(exc.message, code=exc.code) from None


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
) -> ChatCompletion | EventSourceResponse:
    messages = [Message(role=m.role, content=m.text()) for m in request.messages]

    def prepare(engine: Engine) -> Prompt:
        return engine.prepare_chat(messages)

    generation = await _start(runtime, prepare, request)
    answer = ChatAnswer(runtime.model_id, generation)
    if request.stream:
        return sse_response(answer.chunks(request.include_usage_in_stream), runtime)
    return await _unless_client_leaves(http, generation, answer.whole())


@router.post("/v1/completions", response_model=None)
async def completions(
    request: CompletionRequest, runtime: Runtime, http: Request
) -> Completion | EventSourceResponse:
    text = request.prompt_text()

    def prepare(engine: Engine) -> Prompt:
        return engine.prepare_text(text)

    generation = await _start(runtime, prepare, request)
    answer = TextAnswer(runtime.model_id, generation)
    if request.stream:
        return sse_response(answer.chunks(request.include_usage_in_stream), runtime)
    return await _unless_client_leaves(http, generation, answer.whole())
