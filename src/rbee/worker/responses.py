"""OpenAI answers built from a running generation: whole, or as SSE chunks ending in [DONE]."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Send

from rbee.common.errors import RbeeError, Unavailable
from rbee.contracts.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkDelta,
    Completion,
    CompletionRequest,
    FinishReason,
    FunctionCallDelta,
    PromptTokensDetails,
    TextChoice,
    TextLogprobs,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from rbee.worker.capabilities import check_logit_bias
from rbee.worker.engines.base import Outcome, SamplingParams, Scored
from rbee.worker.generation import Generation
from rbee.worker.structured import ChatPlan, read_tool_answer

# Unset sampling fields get llama.cpp's usual defaults (as llama-cpp-python's own server does),
# which suit small local models better than OpenAI's pure temperature 1.0.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"  # an SSE comment: clients skip it
PING_AFTER_S = 15.0


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest, plan: ChatPlan | None = None
) -> SamplingParams:
    if isinstance(request, ChatCompletionRequest):
        limit = request.token_limit()
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        limit, logprobs = request.max_tokens, request.logprobs
    return SamplingParams(
        max_tokens=limit,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=tuple(request.stop_list()),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        json_schema=plan.json_schema if plan else None,
        logprobs=logprobs,
        logit_bias=check_logit_bias(request.logit_bias),
    )


def _text(token: bytes) -> str:
    return token.decode("utf-8", "replace")


def token_logprobs(scored: list[Scored]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            token=_text(s.token),
            logprob=s.logprob,
            bytes=list(s.token),
            top_logprobs=[
                TopLogprob(token=_text(c.token), logprob=c.logprob, bytes=list(c.token))
                for c in s.top
            ],
        )
        for s in scored
    ]


def text_logprobs(scored: list[Scored], offset: int = 0) -> TextLogprobs:
    """The legacy completions' form: parallel lists, offsets in characters of the answer."""
    offsets = []
    for s in scored:
        offsets.append(offset)
        offset += len(_text(s.token))
    return TextLogprobs(
        tokens=[_text(s.token) for s in scored],
        token_logprobs=[s.logprob for s in scored],
        top_logprobs=[{_text(c.token): c.logprob for c in s.top} for s in scored],
        text_offset=offsets,
    )


def usage_of(outcome: Outcome) -> Usage:
    return Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=outcome.cached_tokens),
    )


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _json(model: ChatCompletionChunk | Completion) -> str:
    body: dict[str, Any] = model.model_dump(mode="json")
    for choice in body.get("choices", []):
        if "delta" in choice:
            # OpenAI leaves unset delta fields out rather than sending nulls.
            choice["delta"] = _without_nulls(choice["delta"])
    if body.get("usage") is None:
        body.pop("usage", None)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _event(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"


def _error_event(exc: RbeeError) -> bytes:
    return _event(json.dumps(exc.body(), separators=(",", ":")))


def _cut_short() -> RbeeError:
    return Unavailable(
        "the worker shut down before the answer was complete", code="worker_stopping"
    )


class EventStream(StreamingResponse):
    """Server-sent events, each given whole and encoded: one socket write per event, nothing
    else per token. After PING_AFTER_S without an event (a long prompt, a slow model) a comment
    goes out, so proxies between here and the client keep the connection. A client that goes
    away cancels the stream (Starlette listens for the disconnect), which cancels its
    generation; on shutdown the runtime cuts what runs past the grace period."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], ping_after_s: float = PING_AFTER_S) -> None:
        super().__init__(events, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self._ping_after_s = ping_after_s
        self._last_sent = 0.0

    async def _keep_alive(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._last_sent + self._ping_after_s - loop.time())
            if loop.time() - self._last_sent >= self._ping_after_s:
                self._last_sent = loop.time()
                await send({"type": "http.response.body", "body": PING, "more_body": True})

    async def stream_response(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        self._last_sent = loop.time()
        pinger = loop.create_task(self._keep_alive(send), name="sse-keep-alive")
        try:
            async for event in self.body_iterator:
                self._last_sent = loop.time()
                await send({"type": "http.response.body", "body": event, "more_body": True})
        finally:
            pinger.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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

    def __init__(
        self,
        model: str,
        generation: Generation,
        plan: ChatPlan | None = None,
        logprobs: bool = False,
    ) -> None:
        super().__init__(model, generation)
        self.tools = plan is not None and plan.tools
        self.logprobs = logprobs

    def _scores(self, scored: list[Scored]) -> ChoiceLogprobs | None:
        return ChoiceLogprobs(content=token_logprobs(scored)) if self.logprobs else None

    def _named(self, exc: RbeeError) -> RbeeError:
        """A refused JSON schema made from the tools is the tools' fault, not response_format's."""
        if self.tools and exc.code == "invalid_schema":
            exc.param = "tools"
        return exc

    async def whole(self) -> ChatCompletion:
        try:
            text, scored = await self.generation.whole()
        except RbeeError as exc:
            raise self._named(exc) from None
        outcome = self._outcome()
        finish: FinishReason = outcome.finish_reason
        message = AssistantMessage(content=text)
        if self.tools:
            answer = read_tool_answer(text)
            message = AssistantMessage(content=answer.content, tool_calls=answer.tool_calls or None)
            if answer.tool_calls:
                finish = "tool_calls"
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(message=message, finish_reason=finish, logprobs=self._scores(scored))
            ],
            usage=usage_of(outcome),
        )

    def _chunk(
        self,
        delta: ChunkDelta,
        finish: Any = None,
        usage: Usage | None = None,
        logprobs: ChoiceLogprobs | None = None,
    ) -> ChatCompletionChunk:
        choices = (
            [] if usage else [ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]
        )
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def content_event(self) -> Callable[[str], bytes]:
        """The per-token event as a template: only the text is encoded per token.

        Same bytes as `_event(_json(self._chunk(ChunkDelta(content=...))))` (a test holds them
        equal), without building and dumping a model for every token."""
        marker = "\u0000rbee\u0000"
        whole = _event(_json(self._chunk(ChunkDelta(content=marker))))
        head, tail = whole.split(json.dumps(marker, ensure_ascii=False).encode(), 1)
        return lambda piece: head + json.dumps(piece, ensure_ascii=False).encode() + tail

    async def _content(self) -> AsyncIterator[bytes]:
        content_event = self.content_event()
        async for text, scored in self.generation.pieces():
            if self.logprobs:
                chunk = self._chunk(ChunkDelta(content=text), logprobs=self._scores(list(scored)))
                yield _event(_json(chunk))
            else:
                yield content_event(text)

    async def _tool_calls(self) -> tuple[list[bytes], bool]:
        """The envelope is only known once complete, so it is read whole and then sent as
        OpenAI streams tool calls: per call, its id and name, then its arguments."""
        texts: list[str] = []
        scored: list[Scored] = []
        async for text, scores in self.generation.pieces():
            texts.append(text)
            scored.extend(scores)
        answer = read_tool_answer("".join(texts))
        logprobs = self._scores(scored)
        chunks = []
        if answer.content is not None:
            chunks.append(
                _event(_json(self._chunk(ChunkDelta(content=answer.content), logprobs=logprobs)))
            )
        for index, call in enumerate(answer.tool_calls):
            opening = ToolCallDelta(
                index=index,
                id=call.id,
                type="function",
                function=FunctionCallDelta(name=call.function.name, arguments=""),
            )
            chunks.append(
                _event(_json(self._chunk(ChunkDelta(tool_calls=[opening]), logprobs=logprobs)))
            )
            logprobs = None
            arguments = ToolCallDelta(
                index=index, function=FunctionCallDelta(arguments=call.function.arguments)
            )
            chunks.append(_event(_json(self._chunk(ChunkDelta(tool_calls=[arguments])))))
        return chunks, bool(answer.tool_calls)

    async def chunks(self, include_usage: bool) -> AsyncIterator[bytes]:
        yield _event(_json(self._chunk(ChunkDelta(role="assistant", content=""))))
        called = False
        try:
            if self.tools:
                chunks, called = await self._tool_calls()
                for chunk in chunks:
                    yield chunk
            else:
                async for chunk in self._content():
                    yield chunk
        except RbeeError as exc:
            yield _error_event(self._named(exc))
            return
        outcome = self._outcome()
        if outcome.cancelled:
            yield _error_event(_cut_short())
            return
        finish = "tool_calls" if called else outcome.finish_reason
        yield _event(_json(self._chunk(ChunkDelta(), finish=finish)))
        if include_usage:
            yield _event(_json(self._chunk(ChunkDelta(), usage=usage_of(outcome))))
        yield DONE


class TextAnswer(_Answer):
    def __init__(self, model: str, generation: Generation, logprobs: bool = False) -> None:
        super().__init__(model, generation)
        self.logprobs = logprobs

    async def whole(self) -> Completion:
        text, scored = await self.generation.whole()
        outcome = self._outcome()
        logprobs = text_logprobs(scored) if self.logprobs else None
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[TextChoice(text=text, finish_reason=outcome.finish_reason, logprobs=logprobs)],
            usage=usage_of(outcome),
        )

    def _chunk(
        self, text: str, finish: Any = None, logprobs: TextLogprobs | None = None
    ) -> Completion:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[TextChoice(text=text, finish_reason=finish, logprobs=logprobs)],
        )

    async def chunks(self, include_usage: bool) -> AsyncIterator[bytes]:
        offset = 0
        try:
            async for text, scored in self.generation.pieces():
                logprobs = text_logprobs(list(scored), offset) if self.logprobs else None
                offset += len(text)
                yield _event(_json(self._chunk(text, logprobs=logprobs)))
        except RbeeError as exc:
            yield _error_event(exc)
            return
        outcome = self._outcome()
        if outcome.cancelled:
            yield _error_event(_cut_short())
            return
        yield _event(_json(self._chunk("", finish=outcome.finish_reason)))
        if include_usage:
            usage = usage_of(outcome)
            last = Completion(
                id=self.id, created=self.created, model=self.model, choices=[], usage=usage
            )
            yield _event(_json(last))
        yield DONE
