"""An engine that needs no model: it answers with a fixed reply, one word per token, at a set pace.

For tests and load experiments only; product code never builds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import Callable, Sequence

from rbee.worker.engines.base import (
    Embeddings,
    Emit,
    EngineError,
    Message,
    Outcome,
    Prompt,
    PromptError,
    PromptTooLong,
    SamplingParams,
)
from rbee.worker.engines.text import StopMatcher


class FakeEngine:
    def __init__(
        self,
        reply: str = "Paris is the capital of France.",
        *,
        token_delay_s: float = 0.0,
        context_size: int = 256,
        repeat: bool = False,
        fail_with: Exception | None = None,
        unreachable: bool = False,
    ) -> None:
        """`repeat` keeps cycling the reply until max_tokens (a long generation); `fail_with`
        is raised once generation began, `unreachable` fails every request before it begins,
        as an engine whose server does not answer."""
        self.words = [w if i == 0 else " " + w for i, w in enumerate(reply.split())]
        self.token_delay_s = token_delay_s
        self._context_size = context_size
        self.repeat = repeat
        self.fail_with = fail_with
        self.unreachable = unreachable
        self.generations = 0
        self.running = 0
        self.max_running = 0
        self.tokens_emitted = 0
        self.cancelled = 0
        self.closed = False

    @property
    def context_size(self) -> int:
        return self._context_size

    vocab_size = 0x10000
    embedding_size = 8

    def check(self, params: SamplingParams) -> None:
        for token in params.logit_bias:
            if not 0 <= token < self.vocab_size:
                raise PromptError(
                    f"no token {token}", code="invalid_logit_bias", param="logit_bias"
                )

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """The same text always gets the same unit vector, made from a hash of its words."""
        vectors = []
        for i, text in enumerate(texts):
            words = text.split()
            if not words:
                raise PromptError("the input is empty", code="empty_input", param=f"input[{i}]")
            raw = [b - 127.5 for b in hashlib.sha256(text.encode()).digest()[: self.embedding_size]]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return Embeddings(vectors, prompt_tokens=sum(len(t.split()) for t in texts))

    async def prepare_chat(self, messages: Sequence[Message]) -> Prompt:
        return Prompt(text=" ".join(f"<{m.role}> {m.content}" for m in messages))

    async def prepare_text(self, text: str) -> Prompt:
        if not text.split():
            raise PromptError("the prompt is empty", code="empty_prompt")
        return Prompt(text=text)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        emit: Emit,
        cancelled: asyncio.Event,
        accepted: Callable[[], None],
    ) -> Outcome:
        # One token per word, checked when generation starts, as llama.cpp does.
        prompt_tokens = len(prompt.text.split())
        if self.unreachable:
            raise EngineError("the fake engine's server is not answering")
        if prompt_tokens >= self._context_size:
            raise PromptTooLong(prompt_tokens, self._context_size)
        accepted()
        self.generations += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            return await self._generate(prompt_tokens, params, emit, cancelled)
        finally:
            self.running -= 1

    async def _generate(
        self,
        prompt_tokens: int,
        params: SamplingParams,
        emit: Emit,
        cancelled: asyncio.Event,
    ) -> Outcome:
        if self.fail_with is not None:
            raise self.fail_with
        room = self._context_size - prompt_tokens
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        stops = StopMatcher(params.stop)
        produced = 0
        while produced < limit:
            if not self.repeat and produced >= len(self.words):
                return Outcome(prompt_tokens, produced, "stop")
            # Waiting on the event (not sleeping) lets a cancel cut the wait short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancelled.wait(), self.token_delay_s)
            if cancelled.is_set():
                self.cancelled += 1
                return Outcome(prompt_tokens, produced, "stop", cancelled=True)
            word = self.words[produced % len(self.words)]
            produced += 1
            self.tokens_emitted += 1
            if text := stops.push(word):
                emit(text)
            if stops.stopped:
                return Outcome(prompt_tokens, produced, "stop")
        if tail := stops.flush():
            emit(tail)
        return Outcome(prompt_tokens, produced, "length")

    async def close(self) -> None:
        self.closed = True
