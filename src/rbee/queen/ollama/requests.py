"""Ollama's requests as the OpenAI ones the queen routes: pure translations, no I/O.

A request (`/api/chat`, `/api/generate`, `/api/embed`) becomes the OpenAI body the queen routes
like any other (`Proxy.forward`), always asking for a stream: a whole answer is the stream's
lines combined (`rbee.queen.ollama.answers`).

`options`: what a worker honours is translated (`num_predict`, `temperature`, `top_p`, `seed`,
`stop`, `presence_penalty`, `frequency_penalty`); a sampling option it cannot change is refused
with 400 unless it asks for what the worker does anyway (llama.cpp's defaults, e.g. `top_k` 40);
options about how Ollama loads a model (`num_ctx`, `num_gpu`, `num_thread`...) are rbee's
hives' business, so they are not applied, and the answer says so in its
`x-rbee-ignored-options` header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rbee.common.errors import BadRequest, quote
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
ROLES = ("system", "user", "assistant", "tool")


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
