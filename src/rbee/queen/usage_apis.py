"""Tokens served to API keys on the Anthropic Messages and OpenAI Responses paths.

Their answers count tokens as `input_tokens` and `output_tokens`, and their streams always carry
them (nothing to ask for on the key's behalf, nothing to drop): Anthropic's first event counts
the prompt and its `message_delta` what was made; a Response's last event counts both. The
stream passes on untouched; its total is recorded once, when it ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any


def tally(data: Any, counted: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(input, output) tokens, the largest of `counted` and what this answer or event says."""
    if not isinstance(data, dict):
        return counted
    for key in ("response", "message"):
        if isinstance(data.get(key), dict) and "usage" in data[key]:
            data = data[key]
    usage = data.get("usage")
    prompt, made = counted
    if isinstance(usage, dict):
        given, output = usage.get("input_tokens"), usage.get("output_tokens")
        prompt = max(prompt, given) if isinstance(given, int) else prompt
        made = max(made, output) if isinstance(output, int) else made
    return prompt, made


def whole_tokens(answer: bytes) -> int | None:
    try:
        prompt, made = tally(json.loads(answer))
    except ValueError:
        return None
    return prompt + made if prompt or made else None


async def metered_events(
    chunks: AsyncGenerator[bytes, None], record: Callable[[int], None]
) -> AsyncGenerator[bytes, None]:
    counted = (0, 0)
    pending = b""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
                pending += chunk
                events, _, pending = pending.rpartition(b"\n\n")
                for event in events.split(b"\n\n"):
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:") and b'"usage"' in line:
                            try:
                                counted = tally(json.loads(line[5:]), counted)
                            except ValueError:
                                continue
    finally:
        if counted != (0, 0):
            record(sum(counted))
