"""Ollama's API in terms of OpenAI's: pure translations both ways, no I/O.

A request (`/api/chat`, `/api/generate`, `/api/embed`) becomes the OpenAI body the queen routes
like any other (`Proxy.forward`); the worker's answer, always asked for as a stream, becomes
Ollama's NDJSON lines, or, for `"stream": false`, those lines combined into one answer.

`options`: what a worker honours is translated (`num_predict`, `temperature`, `top_p`, `seed`,
`stop`, `presence_penalty`, `frequency_penalty`); a sampling option it cannot change is refused
with 400 unless it asks for what the worker does anyway (llama.cpp's defaults, e.g. `top_k` 40);
options about how Ollama loads a model (`num_ctx`, `num_gpu`, `num_thread`...) are rbee's
hives' business, so they are not applied, and the answer says so in its
`x-rbee-ignored-options` header.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from rbee.common.errors import BadRequest, quote
from rbee.contracts.hives import ModelFootprint
from rbee.contracts.ollama import (
    OllamaChatRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaMessage,
)

IGNORED_HEADER = "x-rbee-ignored-options"
CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
)
# Ollama option → OpenAI field, for those a worker honours.
HONOURED = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# How Ollama loads a model and runs it; in rbee the hive and the worker's flags decide.
LOAD_TIME = frozenset(
    {
        "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "numa", "num_thread",
        "use_mmap", "use_mlock", "vocab_only", "logits_all", "embedding_only", "f16_kv",
        "num_keep",
    }
)  # fmt: skip
# Sampling a worker does not let a request change, at the value it always uses (llama.cpp's
# defaults): asking for exactly that is fine, anything else is refused.
FIXED_SAMPLING: Mapping[str, float] = {
    "top_k": 40,
    "min_p": 0.05,
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "repeat_penalty": 1.0,
    "repeat_last_n": 64,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
}
# A pinned model's `expires_at`, far in the future as Ollama shows a keep_alive of -1.
NEVER = datetime(2318, 1, 1, tzinfo=UTC)
ROLES = ("system", "user", "assistant", "tool")


def timestamp(when: datetime) -> str:
    """RFC 3339 in UTC, as Ollama's `created_at` and `expires_at`."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- requests --------------------------------------------------------------------------------


def sampling(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The OpenAI fields for Ollama's `options`, and the load-time options left to rbee."""
    fields: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in (options or {}).items():
        if value is None:
            continue
        if name == "num_predict":
            if isinstance(value, bool) or not isinstance(value, int) or value in (0,) or value < -2:
                raise BadRequest(
                    f"options.num_predict must be a positive number of tokens, or -1 (no limit), "
                    f"not {quote(value)}",
                    param="options.num_predict",
                )
            if value > 0:
                fields["max_tokens"] = value
        elif name in HONOURED:
            fields[HONOURED[name]] = value
        elif name in LOAD_TIME:
            ignored.append(name)
        elif name in FIXED_SAMPLING:
            fixed = FIXED_SAMPLING[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value != fixed:
                raise BadRequest(
                    f"options.{name}={quote(value)} is not supported: rbee's workers always "
                    f"sample with {name} {fixed} (leave it out, or send exactly that)",
                    param=f"options.{name}",
                )
        else:
            raise BadRequest(f"options.{name} is not supported", param=f"options.{name}")
    return fields, ignored


def response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's `format` as OpenAI's `response_format`."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise BadRequest(f'format must be "json" or a JSON schema, not {quote(fmt)}', param="format")


def _thinking(think: bool | str | None, model: str) -> None:
    if think not in (None, False):
        raise BadRequest(f"{quote(model)} does not support thinking", param="think")


def _common(
    request: OllamaChatRequest | OllamaGenerateRequest,
) -> tuple[dict[str, Any], list[str]]:
    _thinking(request.think, request.model)
    if request.logprobs:
        raise BadRequest("logprobs are not supported on Ollama's API here", param="logprobs")
    fields, ignored = sampling(request.options)
    body: dict[str, Any] = {
        "model": request.model,
        "stream": True,  # always: a whole answer is the stream's lines combined
        "stream_options": {"include_usage": True},
        **fields,
    }
    if request.keep_alive is not None:
        body["keep_alive"] = request.keep_alive
    return body, ignored


def openai_messages(messages: Sequence[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's chat history as OpenAI's. Tool calls get ids (Ollama's have none), and each
    tool result the id of the call it answers: the one of its tool's name, else the next."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, function name) of the last calls
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise BadRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, not {quote(message.role)}",
                param=f"messages[{i}].role",
            )
        if message.images:
            raise BadRequest(
                f"messages[{i}].images: images are not supported, this model reads text only",
                param=f"messages[{i}].images",
            )
        content = message.content or ""
        if message.role == "assistant" and message.tool_calls:
            ids = [f"call_{i}_{j}" for j in range(len(message.tool_calls))]
            calls = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": json.dumps(call.function.arguments),
                    },
                }
                for call_id, call in zip(ids, message.tool_calls, strict=True)
            ]
            unanswered = [
                (k, c.function.name) for k, c in zip(ids, message.tool_calls, strict=True)
            ]
            out.append({"role": "assistant", "content": content or None, "tool_calls": calls})
        elif message.role == "tool":
            given = (message.model_extra or {}).get("tool_call_id")
            call_id = given if isinstance(given, str) and given else _answered(message, unanswered)
            out.append({"role": "tool", "content": content, "tool_call_id": call_id or f"call_{i}"})
        else:
            out.append({"role": message.role, "content": content})
    return out


def _answered(message: OllamaMessage, unanswered: list[tuple[str, str]]) -> str | None:
    for k, (call_id, name) in enumerate(unanswered):
        if message.tool_name in (None, name):
            del unanswered[k]
            return call_id
    return None


def chat_body(request: OllamaChatRequest) -> tuple[dict[str, Any], list[str]]:
    """The OpenAI chat request for an Ollama one, and the options left to rbee."""
    if not request.messages:
        raise BadRequest("messages must hold at least one message", param="messages")
    body, ignored = _common(request)
    body["messages"] = openai_messages(request.messages)
    if (fmt := response_format(request.format)) is not None:
        body["response_format"] = fmt
    if request.tools:
        body["tools"] = request.tools
    return body, ignored


def generate_body(request: OllamaGenerateRequest) -> tuple[str, dict[str, Any], list[str]]:
    """(path, OpenAI body, options left to rbee) for `/api/generate`. The prompt goes through
    the model's chat template, as Ollama does, unless `raw`. An empty prompt only loads the
    model (Ollama's way to preload it): the caller checks `load_only` first."""
    refused = {
        "images": "images are not supported, this model reads text only",
        "suffix": "suffix (fill-in-the-middle) is not supported",
        "template": "template is not supported: workers use the model's own chat template",
        "context": "context is not supported: send the conversation to /api/chat instead",
    }
    for name, why in refused.items():
        if getattr(request, name):
            raise BadRequest(f"{name}: {why}", param=name)
    body, ignored = _common(request)
    prompt = request.prompt or ""
    if request.raw:
        if request.format not in (None, ""):
            raise BadRequest("format cannot be combined with raw", param="format")
        return COMPLETIONS_PATH, {**body, "prompt": prompt}, ignored
    messages = [{"role": "system", "content": request.system}] if request.system else []
    body["messages"] = [*messages, {"role": "user", "content": prompt}]
    if (fmt := response_format(request.format)) is not None:
        body["response_format"] = fmt
    return CHAT_PATH, body, ignored


def load_only(request: OllamaGenerateRequest | OllamaChatRequest) -> bool:
    """A request that only loads (or, with keep_alive 0, unloads) the model, as Ollama's
    clients preload one: no prompt, no messages."""
    if isinstance(request, OllamaChatRequest):
        return not request.messages
    return not request.prompt and not request.system


def embed_body(request: OllamaEmbedRequest) -> tuple[dict[str, Any], list[str]]:
    """Options mean nothing to an embedding but how the model is loaded: left to rbee."""
    body: dict[str, Any] = {
        "model": request.model,
        "input": request.input,
        "encoding_format": "float",
    }
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.keep_alive is not None:
        body["keep_alive"] = request.keep_alive
    return body, sorted(name for name, v in (request.options or {}).items() if v is not None)


# -- answers ---------------------------------------------------------------------------------


class StreamError(Exception):
    """The worker's answer was an error: `status` as the client should get it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def error_status(error: Mapping[str, Any], default: int = 500) -> int:
    """An OpenAI-shaped error's HTTP status, from its code and type (the status itself is lost
    once a stream has begun)."""
    code, kind = error.get("code"), error.get("type")
    if code in ("model_not_found", "not_found"):
        return 404
    statuses = {
        "invalid_request_error": 400,
        "authentication_error": 401,
        "permission_error": 403,
        "rate_limit_error": 429,
    }
    return statuses.get(str(kind), default)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON data of each SSE event, up to `[DONE]`; comments (`: loading`) are skipped."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *events, pending = pending.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            data = b"\n".join(
                line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if not data:
                continue
            if data == b"[DONE]":
                return
            parsed = json.loads(data)
            if isinstance(parsed, dict):
                yield parsed


@dataclass
class _Call:
    name: str = ""
    arguments: str = ""


@dataclass
class Translation:
    """One answer on its way from OpenAI chunks to Ollama's lines. Times are nanoseconds on
    one monotonic clock, given by the caller; `cold`: the model had to be loaded first, so the
    wait before the worker's first event is the load."""

    model: str
    kind: Literal["chat", "generate"]
    started_ns: int
    cold: bool = False
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    first_event_ns: int | None = None
    first_token_ns: int | None = None
    finish: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: dict[int, _Call] = field(default_factory=dict)

    def _line(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.model, "created_at": timestamp(self.now), **fields}

    def _text(self, text: str) -> dict[str, Any]:
        if self.kind == "chat":
            return self._line(message={"role": "assistant", "content": text}, done=False)
        return self._line(response=text, done=False)

    def event(self, data: Mapping[str, Any], now_ns: int) -> list[dict[str, Any]]:
        """Ollama's lines for one OpenAI chunk (none for most but the text's)."""
        if isinstance(error := data.get("error"), dict):
            raise StreamError(str(error.get("message", "the worker failed")), error_status(error))
        if self.first_event_ns is None:
            self.first_event_ns = now_ns
        if isinstance(usage := data.get("usage"), dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
        out = []
        for choice in data.get("choices") or ():
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                if self.first_token_ns is None:
                    self.first_token_ns = now_ns
                out.append(self._text(text))
            for call in (delta or {}).get("tool_calls") or ():
                if self.first_token_ns is None:
                    self.first_token_ns = now_ns
                into = self.calls.setdefault(int(call.get("index", 0)), _Call())
                function = call.get("function") or {}
                into.name += function.get("name") or ""
                into.arguments += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish = "length" if choice["finish_reason"] == "length" else "stop"
        return out

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls as Ollama shows them: arguments as an object."""
        calls = []
        for index, call in sorted(self.calls.items()):
            try:
                arguments = json.loads(call.arguments or "{}")
            except json.JSONDecodeError:
                raise StreamError(
                    f"the model called {quote(call.name)} with arguments that are not JSON: "
                    f"{quote(call.arguments)}",
                    502,
                ) from None
            calls.append({"function": {"index": index, "name": call.name, "arguments": arguments}})
        return calls

    def end(self, now_ns: int) -> list[dict[str, Any]]:
        """The last lines: the tool calls if any, then `done` with the counts and durations."""
        out = []
        if self.calls:
            message = {"role": "assistant", "content": "", "tool_calls": self.tool_calls()}
            out.append(self._line(message=message, done=False))
        first_event = self.first_event_ns or now_ns
        first_token = self.first_token_ns or now_ns
        load = first_event - self.started_ns if self.cold else 0
        done: dict[str, Any] = {"response": ""}
        if self.kind == "chat":
            done = {"message": {"role": "assistant", "content": ""}}
        out.append(
            self._line(
                **done,
                done=True,
                done_reason=self.finish,
                total_duration=now_ns - self.started_ns,
                load_duration=load,
                prompt_eval_count=self.prompt_tokens,
                prompt_eval_duration=max(0, first_token - self.started_ns - load),
                eval_count=self.completion_tokens,
                eval_duration=max(0, now_ns - first_token),
            )
        )
        return out


def combine(lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A whole answer (`"stream": false`) from its stream's lines: the text joined, the tool
    calls gathered, the figures of the last line."""
    if not lines:
        raise ValueError("an answer has at least its done line")
    whole = dict(lines[-1])
    if "message" in whole:
        calls = [c for line in lines for c in line["message"].get("tool_calls") or ()]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(line["message"].get("content") or "" for line in lines),
        }
        if calls:
            message["tool_calls"] = calls
        whole["message"] = message
    else:
        whole["response"] = "".join(line.get("response") or "" for line in lines)
    return whole


def ndjson(line: Mapping[str, Any]) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def loaded_answer(
    model: str, kind: Literal["chat", "generate"], unload: bool, took_ns: int, now: datetime
) -> dict[str, Any]:
    """The answer to a request that only loads (or unloads) its model."""
    answer: dict[str, Any] = {"model": model, "created_at": timestamp(now)}
    if kind == "chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    reason = "unload" if unload else "load"
    return {**answer, "done": True, "done_reason": reason, "total_duration": took_ns}


def embed_answer(model: str, openai: Mapping[str, Any], took_ns: int) -> dict[str, Any]:
    data = sorted(openai.get("data") or (), key=lambda item: int(item.get("index", 0)))
    usage = openai.get("usage") or {}
    return {
        "model": model,
        "embeddings": [item["embedding"] for item in data],
        "total_duration": took_ns,
        "load_duration": 0,
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
    }


# -- models ----------------------------------------------------------------------------------


def details() -> dict[str, Any]:
    """Ollama's `details`: rbee serves GGUF files and reads no more of them than it needs."""
    return {"format": "gguf", "family": "", "families": None, "parameter_size": "",
            "quantization_level": ""}  # fmt: skip


def size_of(footprint: ModelFootprint | None) -> int:
    return footprint.weights_bytes if footprint else 0


def tag_entry(model: str, footprint: ModelFootprint | None) -> dict[str, Any]:
    """A model of `/api/tags`: one a worker serves or a hive could start."""
    return {"name": model, "model": model, "size": size_of(footprint),
            "details": details()}  # fmt: skip


def ps_entry(
    model: str,
    footprint: ModelFootprint | None,
    serving: Mapping[str, Any],
    on_gpu: bool,
    now: datetime,
) -> dict[str, Any]:
    """A loaded model of `/api/ps`, from its `/v1/models` card's `rbee` block: when it unloads
    if nothing asks for it (never, for a pinned one or one kept by min_replicas)."""
    left = serving.get("keep_alive_left_s")
    expires = NEVER if left is None or math.isinf(left) else now + timedelta(seconds=left)
    size = size_of(footprint)
    return {
        "name": model,
        "model": model,
        "size": size,
        "size_vram": size if on_gpu else 0,
        "expires_at": timestamp(expires),
        "details": details(),
    }


def show_answer(model: str, footprint: ModelFootprint | None) -> dict[str, Any]:
    """`/api/show`: rbee serves any model for chat (tools included: the model's own template
    or a grammar) and, on workers started for them, embeddings."""
    info: dict[str, Any] = {"general.architecture": "", "general.name": model}
    if footprint is not None:
        info.update(
            {
                "general.block_count": footprint.layers,
                "general.vocab_size": footprint.vocab_size,
                "general.head_count": footprint.head_count,
                "general.weights_bytes": footprint.weights_bytes,
            }
        )
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(),
        "model_info": info,
        "capabilities": ["completion", "tools", "embedding"],
    }
