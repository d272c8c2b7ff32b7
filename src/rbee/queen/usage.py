"""Tokens served to API keys, read from the answers as they pass through the queen.

Only requests made with an API key are metered, so the cluster's own traffic pays nothing. A
whole answer carries `usage`; a stream carries it in a last chunk only when the client asks
(`stream_options.include_usage`), so the queen asks for it on the key's behalf and drops that
chunk again when the client did not want it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any


def request_usage(raw: bytes) -> tuple[bytes, bool]:
    """The body to send on for a streamed request, and whether the client asked for usage."""
    payload: dict[str, Any] = json.loads(raw)  # already checked to be a JSON object
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return raw, True
    payload["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return json.dumps(payload).encode(), False


def _total(data: Any) -> int | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and total >= 0 else None


def total_tokens(whole_answer: bytes) -> int | None:
    """`usage.total_tokens` of a whole (non-streamed) answer, if it has one."""
    try:
        return _total(json.loads(whole_answer))
    except ValueError:
        return None


async def metered_stream(
    chunks: AsyncGenerator[bytes, None],
    *,
    keep_usage_chunk: bool,
    record: Callable[[int], None],
) -> AsyncIterator[bytes]:
    """An SSE answer passed on event by event, the total tokens of its usage chunk given to
    `record`, and that chunk dropped when the client did not ask for it."""
    async with aclosing(chunks):
        pending = b""
        async for chunk in chunks:
            pending += chunk
            events, _, pending = pending.rpartition(b"\n\n")
            if not events:
                continue
            out = []
            for event in events.split(b"\n\n"):
                if b'"usage"' in event and (total := _event_total(event)) is not None:
                    record(total)
                    if not keep_usage_chunk:
                        continue
                out.append(event + b"\n\n")
            if out:
                yield b"".join(out)
        if pending:
            yield pending


def _event_total(event: bytes) -> int | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return total_tokens(line[5:])
    return None


def _prompt_usage(data: Any) -> tuple[int, int] | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int) or prompt < 0:
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return prompt, cached if isinstance(cached, int) and 0 <= cached <= prompt else 0


def prompt_usage(answer: bytes) -> tuple[int, int] | None:
    """(prompt tokens, of them cached) from an answer's `usage`: a whole answer, or the JSON
    of one event (OpenAI's `prompt_tokens_details.cached_tokens`; 0 when not given)."""
    try:
        return _prompt_usage(json.loads(answer))
    except ValueError:
        return None


async def watched_stream(
    chunks: AsyncGenerator[bytes, None], record: Callable[[int, int], None]
) -> AsyncGenerator[bytes, None]:
    """An SSE answer passed on as it is; the prompt and cached tokens of its usage chunk (if
    one comes) given to `record`."""
    async with aclosing(chunks):
        pending = b""
        async for chunk in chunks:
            pending += chunk
            events, _, pending = pending.rpartition(b"\n\n")
            if b'"usage"' in events:
                for line in events.split(b"\n"):
                    found = prompt_usage(line[5:]) if line.startswith(b"data:") else None
                    if found is not None:
                        record(*found)
            yield chunk
