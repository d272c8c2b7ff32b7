"""The OpenAI wire format as rbee speaks it: requests in, completions and chunks out.

Requests keep unknown fields (`extra="allow"`) so that clients sending newer or vendor-specific
parameters are not refused, and so a router can pass them through; the fields rbee knows are
validated strictly (no "10" for an int, no 3.0 for `top_p`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError

# Request sizes no real request comes near, refused with 400 naming the field. llama.cpp turns
# a JSON schema into a grammar in time that grows faster than its size (64 KiB of schema took
# up to 30 s on two cores; 6 MB of tools held a slot for more than 5 minutes), and echoes it in
# its last event; every stop string is searched for after every token.
MAX_SCHEMA_BYTES = 64 * 1024  # JSON text of response_format's schema, or of all tools' together
MAX_TOOLS = 128  # functions offered in one request (OpenAI's own limit)
MAX_STOP_CHARS = 1000  # characters in one stop string (and at most 4 of them, as OpenAI)


def schema_bytes(schema: dict[str, Any] | None) -> int:
    if schema is None:
        return 0
    return len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode())


def _check_schema_bytes(size: int, what: str) -> None:
    if size > MAX_SCHEMA_BYTES:
        raise PydanticCustomError(
            "schema_too_large",
            "{what} {size} bytes of JSON; at most {limit} are accepted",
            {"what": what, "size": size, "limit": MAX_SCHEMA_BYTES},
        )


def _bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    _check_schema_bytes(schema_bytes(schema), "the JSON schema is")
    return schema


Temperature = Annotated[float, Field(ge=0.0, le=2.0, strict=True)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, strict=True)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, strict=True)]
MaxTokens = Annotated[StrictInt, Field(ge=1)]


def _bounded_stop(stop: str | list[str]) -> str | list[str]:
    longest = max(map(len, [stop] if isinstance(stop, str) else stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise PydanticCustomError(
            "stop_too_long",
            "a stop string of {length} characters; at most {limit} are accepted",
            {"length": longest, "limit": MAX_STOP_CHARS},
        )
    return stop


Stop = Annotated[
    StrictStr | Annotated[list[StrictStr], Field(max_length=4)], AfterValidator(_bounded_stop)
]


class ContentPart(BaseModel):
    """A part of a message's content. Only `text` parts can be read by a text model; the others
    (`image_url`, `input_audio`, `file`) are refused with 400 by the worker, naming the part."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr
    # A JSON text, as OpenAI sends it (not an object).
    arguments: StrictStr


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    # An assistant turn that called tools, and the tool results that answer it.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: StrictStr | None = None
    # A JSON Schema object; a function without one takes no arguments.
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    # Only function tools exist for a local model; other types are refused by the worker.
    type: StrictStr
    function: FunctionSpec | None = None


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: Annotated[dict[str, Any], AfterValidator(_bounded_schema)] | None = Field(
        None, alias="schema"
    )
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[StrictStr, Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: StrictInt | None = None
    stop: Stop | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Token id (as a string, as JSON keys are) → bias added to its logit.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # Choices per request; a worker makes one (n > 1 is refused with 400, naming `n`).
    n: Annotated[StrictInt, Field(ge=1)] = 1
    user: StrictStr | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _bounded_tools(tools: list[Tool]) -> list[Tool]:
    size = sum(schema_bytes(tool.function.parameters) for tool in tools if tool.function)
    _check_schema_bytes(size, "the tools' parameters are")
    return tools


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # Newer clients send this name for the same limit.
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    tools: (
        Annotated[list[Tool], Field(max_length=MAX_TOOLS), AfterValidator(_bounded_tools)] | None
    ) = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens


class CompletionRequest(_SamplingFields):
    # One prompt per request; a longer list is refused with 400, naming `prompt`.
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]
    echo: StrictBool = False
    # OpenAI's default for legacy completions is 16 tokens.
    max_tokens: MaxTokens | None = 16
    # The legacy form: how many most likely tokens to list at each position (0-5).
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens found in the KV cache, not computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    # None when the answer is tool calls only, as OpenAI sends it.
    content: str | None
    # Left out of the JSON when there are none, as OpenAI does.
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda calls: calls is None)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextLogprobs(BaseModel):
    """The legacy completions' logprobs: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: TextLogprobs | None = None


class Completion(BaseModel):
    """Both the whole answer of `/v1/completions` and each of its stream chunks (as OpenAI does)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelBackoff(BaseModel):
    """Starting a worker for the model on `hive_id` is on hold: its last starts failed, or
    their workers died soon after becoming ready."""

    hive_id: str
    failures: int  # in a row
    reason: str
    retry_in_s: float


class WorkerContext(BaseModel):
    """One worker of a model: the tokens of context each request may hold (prompt and answer)
    and how many requests it serves at once."""

    worker_id: str
    hive_id: str | None = None
    ctx_size: int | None = None  # None: a worker that does not say
    slots: int


class ModelServing(BaseModel):
    """rbee's own block in a model card: where the model stands in the cluster."""

    # `loading`: no worker serves it yet, one is being started (a request waits for it).
    state: Literal["loaded", "loading", "available"]
    # True when a worker serving it answers `/v1/embeddings` (started with --embedding or an
    # embedding model); chat and completions go to the other workers of the model.
    embedding: bool = False
    workers: int = 0
    embedding_workers: int = 0
    hives: list[str] = Field(default_factory=list)
    # The APIs it is served on (rbee.contracts.apis): `chat.completions`, `completions`,
    # `messages` (Anthropic), `responses` (OpenAI Responses), `embeddings`.
    apis: list[str] = Field(default_factory=list)
    # Hives where starting a worker for the model is on hold, and why; empty when none is.
    backoff: list[ModelBackoff] = Field(default_factory=list)
    # Keep-alive of its loaded workers: `pinned` when one is never unloaded for idleness;
    # otherwise the seconds until the last of them unloads if no request comes.
    pinned: bool = False
    keep_alive_left_s: float | None = None
    # Seconds since a request on it last ended (0 while one runs); None: not loaded.
    last_used_s_ago: float | None = None
    # Requests waiting in the queen's queue for a worker of it.
    queued: int = 0
    # Replicas: `workers` are loaded; the queen adds more while requests wait, up to
    # `max_replicas` (None: as many as fit), and keeps `min_replicas` however long they idle.
    max_replicas: int | None = None
    min_replicas: int = 0
    # Each serving worker's context and slots (rbee up/worker spawn/load --ctx-size, --slots).
    worker_contexts: list[WorkerContext] = Field(default_factory=list)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rbee"
    rbee: ModelServing | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
