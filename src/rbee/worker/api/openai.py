"""The OpenAI-style API of one worker: its model, chat completions and text completions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends
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


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: ChatCompletionRequest, runtime: Runtime
) -> ChatCompletion | EventSourceResponse:
    messages = [Message(role=m.role, content=m.text()) for m in request.messages]

    def prepare(engine: Engine) -> Prompt:
        return engine.prepare_chat(messages)

    generation = await _start(runtime, prepare, request)
    answer = ChatAnswer(runtime.model_id, generation)
    if request.stream:
        return sse_response(answer.chunks(request.include_usage_in_stream), runtime)
    return await answer.whole()


@router.post("/v1/completions", response_model=None)
async def completions(
    request: CompletionRequest, runtime: Runtime
) -> Completion | EventSourceResponse:
    text = request.prompt_text()

    def prepare(engine: Engine) -> Prompt:
        return engine.prepare_text(text)

    generation = await _start(runtime, prepare, request)
    answer = TextAnswer(runtime.model_id, generation)
    if request.stream:
        return sse_response(answer.chunks(request.include_usage_in_stream), runtime)
    return await answer.whole()
