"""OpenAI answers built from a running generation: whole, or as SSE chunks ending in [DONE]."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse

from rbee.common.errors import RbeeError, Unavailable
from rbee.contracts.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    Completion,
    CompletionRequest,
    TextChoice,
    Usage,
)
from rbee.worker.engines.base import Outcome, SamplingParams
from rbee.worker.generation import Generation
from rbee.worker.runtime import WorkerRuntime

# Unset sampling fields get llama.cpp's usual defaults (as llama-cpp-python's own server does),
# which suit small local models better than OpenAI's pure temperature 1.0.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DONE = "[DONE]"


def sampling_params(request: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    limit = (
        request.token_limit() if isinstance(request, ChatCompletionRequest) else request.max_tokens
    )
    return SamplingParams(
        max_tokens=limit,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=tuple(request.stop_list()),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
    )


def usage_of(outcome: Outcome) -> Usage:
    return Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
    )


def _json(model: ChatCompletionChunk | Completion) -> str:
    body: dict[str, Any] = model.model_dump(mode="json")
    for choice in body.get("choices", []):
        if "delta" in choice:
            # OpenAI leaves unset delta fields out rather than sending nulls.
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if body.get("usage") is None:
        body.pop("usage", None)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _error_event(exc: RbeeError) -> str:
    return json.dumps(exc.body(), separators=(",", ":"))


def _cut_short() -> RbeeError:
    return Unavailable(
        "the worker shut down before the answer was complete", code="worker_stopping"
    )


def sse_response(chunks: AsyncIterator[str], runtime: WorkerRuntime) -> EventSourceResponse:
    # On shutdown a running stream gets the grace period to finish before it is cut.
    return EventSourceResponse(
        chunks, sep="\n", ping=15, shutdown_grace_period=runtime.shutdown_grace_s
    )


class _Answer:
    prefix = "cmpl"

    def __init__(self, model: str, generation: Generation) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.generation = generation

    def _outcome(self) -> Outcome:
        assert self.generation.outcome is not None, "read after the generation ended"
        return self.generation.outcome


class ChatAnswer(_Answer):
    prefix = "chatcmpl"

    async def whole(self) -> ChatCompletion:
        text = await self.generation.text()
        outcome = self._outcome()
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text), finish_reason=outcome.finish_reason
                )
            ],
            usage=usage_of(outcome),
        )

    def _chunk(
        self, delta: ChunkDelta, finish: Any = None, usage: Usage | None = None
    ) -> ChatCompletionChunk:
        choices = [] if usage else [ChatChunkChoice(delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def content_chunk(self) -> Callable[[str], str]:
        """The per-token chunk as a string template: only the text is encoded per token.

        Same JSON as `_json(self._chunk(ChunkDelta(content=...)))` (a test holds them equal),
        without building and dumping a model for every token."""
        marker = "\u0000rbee\u0000"
        whole = _json(self._chunk(ChunkDelta(content=marker)))
        head, tail = whole.split(json.dumps(marker, ensure_ascii=False), 1)
        return lambda piece: head + json.dumps(piece, ensure_ascii=False) + tail

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        yield _json(self._chunk(ChunkDelta(role="assistant", content="")))
        content_chunk = self.content_chunk()
        try:
            async for piece in self.generation.pieces():
                yield content_chunk(piece)
        except RbeeError as exc:
            yield _error_event(exc)
            return
        outcome = self._outcome()
        if outcome.cancelled:
            yield _error_event(_cut_short())
            return
        yield _json(self._chunk(ChunkDelta(), finish=outcome.finish_reason))
        if include_usage:
            yield _json(self._chunk(ChunkDelta(), usage=usage_of(outcome)))
        yield DONE


class TextAnswer(_Answer):
    async def whole(self) -> Completion:
        text = await self.generation.text()
        outcome = self._outcome()
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[TextChoice(text=text, finish_reason=outcome.finish_reason)],
            usage=usage_of(outcome),
        )

    def _chunk(self, text: str, finish: Any = None) -> Completion:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[TextChoice(text=text, finish_reason=finish)],
        )

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            async for piece in self.generation.pieces():
                yield _json(self._chunk(piece))
        except RbeeError as exc:
            yield _error_event(exc)
            return
        outcome = self._outcome()
        if outcome.cancelled:
            yield _error_event(_cut_short())
            return
        yield _json(self._chunk("", finish=outcome.finish_reason))
        if include_usage:
            usage = usage_of(outcome)
            yield _json(
                Completion(
                    id=self.id, created=self.created, model=self.model, choices=[], usage=usage
                )
            )
        yield DONE
