"""The worker's OpenAI answers in Ollama's shapes: pure translations, no I/O.

The worker's answer, always asked for as a stream, becomes Ollama's NDJSON lines (with Ollama's
counts and durations on the `done` line), or, for `"stream": false`, those lines combined into
one answer. An error in the worker's stream keeps the HTTP status it would have had.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from rbee.common.errors import quote


def timestamp(when: datetime) -> str:
    """RFC 3339 in UTC, as Ollama's `created_at` and `expires_at`."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


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
