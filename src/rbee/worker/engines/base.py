"""What the worker needs from a model runtime: one loaded model that generates one answer at a time.

An engine is blocking and single-threaded by contract; the worker runs each call in a thread of
its own and never calls one engine from two threads at once (see `rbee.worker.slots`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


class EngineError(Exception):
    """A model that cannot be loaded or run; the message names the file and the reason."""


class PromptError(Exception):
    """A prompt the model cannot take; answered with 400 and this message."""

    def __init__(self, message: str, *, code: str = "invalid_prompt") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class PromptTooLong(PromptError):
    def __init__(self, prompt_tokens: int, context_size: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_size} tokens, but the prompt is "
            f"{prompt_tokens} tokens long. Please shorten the prompt.",
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.context_size = context_size


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Prompt:
    """A prompt in the engine's tokens, plus stop strings the chat template asks for."""

    tokens: Sequence[int]
    stop: tuple[str, ...] = ()


@dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    cancelled: bool = False
    extra: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    @property
    def context_size(self) -> int: ...

    def prepare_chat(self, messages: Sequence[Message]) -> Prompt:
        """Apply the model's chat template and tokenize; PromptTooLong if it cannot fit."""
        ...

    def prepare_text(self, text: str) -> Prompt:
        """Tokenize a raw prompt; PromptTooLong if it cannot fit."""
        ...

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> Outcome:
        """Generate, calling `emit` with each new piece of text; checks `cancelled` every token."""
        ...

    def close(self) -> None: ...


EngineFactory = Callable[[], Engine]
