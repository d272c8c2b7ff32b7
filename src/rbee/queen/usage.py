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
