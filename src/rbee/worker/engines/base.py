"""What the worker needs from a model runtime: per slot, an engine that generates one answer at
a time; behind them, optionally, a host that runs the model for all of them.

An engine is asynchronous and runs on the worker's event loop: its work happens elsewhere (in
llama.cpp's server), so waiting for it costs no thread, and each token goes from the engine's
socket to the client's without a hop between threads (each hop is a wake-up that a machine
busy decoding delays by milliseconds). The worker never runs two calls on one engine at once
(see `rbee.worker.slots`). With a host (llama.cpp's server), the engines are handles onto one
model that decodes the slots' requests together; without one (the fake test engine), each
engine stands alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


class EngineError(Exception):
    """A model that cannot be loaded or run; the message names the file and the reason."""


class PromptError(Exception):
    """A prompt the model cannot take; answered with 400 and this message."""

    def __init__(
        self, message: str, *, code: str = "invalid_prompt", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


# What the error of a prompt longer than the context says raises the limit.
RAISE_CONTEXT = (
    "A longer context per slot: --ctx-size on rbee up, rbee worker spawn or rbee load, or "
    'ctx_size in the cluster file ([[worker]], or [models."ID"] for workers started on demand).'
)


class PromptTooLong(PromptError):
    def __init__(self, prompt_tokens: int, context_size: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_size} tokens, but the prompt is "
            f"{prompt_tokens} tokens long. Please shorten the prompt. {RAISE_CONTEXT}",
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.context_size = context_size


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def as_json(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as chat templates (and llama.cpp's /apply-template) take them."""
    return [{"role": m.role, "content": m.content} for m in messages]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Generation is constrained (by llama.cpp's grammar) to JSON valid against this schema;
    # `{}` means any JSON object will do.
    json_schema: Mapping[str, Any] | None = None
    # None: no log-probabilities. N: the chosen token's, and the N most likely at each step.
    logprobs: int | None = None
    # Token id → bias added to its logit before sampling (-100 bans, +100 forces).
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """One token the model could have chosen: its bytes (maybe part of a character) and
    its log-probability under the model's distribution."""

    token: bytes
    logprob: float


@dataclass(frozen=True)
class Scored(Candidate):
    """A generated token with its log-probability and the most likely alternatives."""

    top: tuple[Candidate, ...] = ()


class Emit(Protocol):
    def __call__(self, text: str, scored: Sequence[Scored] = ()) -> None:
        """A new piece of text, with the scores of the tokens it completes (when asked for)."""
        ...


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class Prompt:
    """A prompt as the model reads it (a chat already through its template), plus stop strings
    the chat template asks for. The engine tokenizes it when it generates."""

    text: str
    stop: tuple[str, ...] = ()


@dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    cancelled: bool = False
    extra: dict[str, float] = field(default_factory=dict)
    # Of the prompt tokens, those the engine found in its KV cache (a prefix it had already
    # computed) rather than computed again.
    cached_tokens: int = 0


class Engine(Protocol):
    @property
    def context_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def embedding_size(self) -> int: ...

    async def prepare_chat(self, messages: Sequence[Message]) -> Prompt:
        """Apply the model's chat template; PromptError if the template refuses the messages."""
        ...

    async def prepare_text(self, text: str) -> Prompt:
        """A raw prompt; PromptError if it is empty."""
        ...

    def check(self, params: SamplingParams) -> None:
        """PromptError (with the request field at fault) for parameters this engine cannot
        honour, such as a token id it does not have or a schema its grammar cannot express."""
        ...

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        emit: Emit,
        cancelled: asyncio.Event,
        accepted: Callable[[], None],
    ) -> Outcome:
        """Generate, calling `accepted` once the prompt is taken (before any text) and `emit`
        with each new piece of text; checks `cancelled` every token. A prompt that does not fit
        raises PromptTooLong before `accepted`."""
        ...

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """Unit-length vectors, one per text, from an engine loaded for embeddings; PromptError
        for a text that is empty or too long."""
        ...

    async def close(self) -> None: ...


EngineFactory = Callable[[], Engine]
Prepare = Callable[[Engine], Awaitable[Prompt]]


class EngineHost(Protocol):
    """The process that runs the model for the worker's engines (started before them)."""

    async def start(self) -> None:
        """Load the model; EngineError says why it cannot be."""
        ...

    async def failure(self) -> str:
        """Returns only if the host stops on its own (say, its process died), with the reason;
        the worker then stops, since it can no longer serve."""
        ...

    async def close(self) -> None: ...
