"""The hive client's SSE reading."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rbee.clients.hive import parse_sse


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_sse_events_are_split_on_blank_lines() -> None:
    stream = lines(
        ": ping",
        "event: progress",
        "id: 0",
        'data: {"a":1}',
        "",
        "data: x",
        "data: y",
        "",
        "data:z",
    )
    assert [e async for e in parse_sse(stream)] == [
        ("progress", '{"a":1}'),
        ("message", "x\ny"),
        ("message", "z"),
    ]
