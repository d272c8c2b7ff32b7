"""Ollama's API as its clients send it (`/api/chat`, `/api/generate`, `/api/embed`, `/api/show`).

Field names and shapes are Ollama's own (docs/api.md of ollama/ollama): `options` holds the
sampling settings (`num_predict`, `temperature`...), `format` is "json" or a JSON schema, a tool
call's `arguments` is an object, not a JSON text as in OpenAI. Unknown top-level fields pass, as
Ollama's server ignores them; what rbee cannot honour is refused when translated
(`rbee.queen.ollama`), never dropped.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

ModelName = Annotated[StrictStr, Field(min_length=1)]
# "json" (any JSON value, an object in practice), a JSON schema, or "" / absent for free text.
Format = StrictStr | dict[str, Any] | None
KeepAlive = StrictStr | int | float | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: ModelName


class OllamaFunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | None = None
    images: list[Any] | None = None
    # A thinking model's reasoning of an earlier turn: history only, not sent back to it.
    thinking: StrictStr | None = None
    tool_calls: list[OllamaToolCall] | None = None
    # A tool result names the tool it comes from.
    tool_name: StrictStr | None = None


class _Generating(_Request):
    stream: StrictBool | None = None  # absent means streamed, as in Ollama
    options: dict[str, Any] | None = None
    format: Format = None
    keep_alive: KeepAlive = None
    think: StrictBool | StrictStr | None = None
    logprobs: StrictBool | None = None


class OllamaChatRequest(_Generating):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Generating):
    prompt: StrictStr | None = None
    suffix: StrictStr | None = None
    system: StrictStr | None = None
    template: StrictStr | None = None
    context: list[int] | None = None
    raw: StrictBool | None = None
    images: list[Any] | None = None


class OllamaEmbedRequest(_Request):
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]
    truncate: StrictBool | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


class OllamaEmbeddingsRequest(_Request):
    """The older `/api/embeddings`: one text in `prompt`, one vector out in `embedding`."""

    prompt: StrictStr
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # Older clients send `name`.
    model: StrictStr | None = None
    name: StrictStr | None = None
    verbose: StrictBool | None = None

    def model_name(self) -> str | None:
        return self.model or self.name or None
