"""Reading a child's output line by line survives lines of any length."""

from __future__ import annotations

import asyncio

from rbee.common.lines import MAX_LINE_BYTES, read_lines


async def lines_of(data: bytes, keep: int = MAX_LINE_BYTES) -> list[str]:
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    return [line async for line in read_lines(stream, keep=keep)]


async def test_a_line_over_64_kib_is_cut_to_its_head_and_the_next_lines_still_arrive() -> None:
    huge = b"x" * (3 * 1024 * 1024)
    lines = await lines_of(b"before\n" + huge + b"\nafter\n")
    assert lines[0] == "before"
    assert lines[1] == "x" * MAX_LINE_BYTES + f" …[{len(huge) - MAX_LINE_BYTES} more bytes]"
    assert lines[2] == "after"
    assert len(lines) == 3


async def test_lines_split_across_reads_and_a_last_line_without_newline_come_whole() -> None:
    stream = asyncio.StreamReader()

    async def feed() -> None:
        for piece in (b"ab", b"c\nde", b"f\r\n", b"\n", b"tail"):
            stream.feed_data(piece)
            await asyncio.sleep(0)
        stream.feed_eof()

    feeding = asyncio.ensure_future(feed())
    assert [line async for line in read_lines(stream, keep=2)] == [
        "ab …[1 more bytes]",
        "de …[2 more bytes]",
        "",
        "ta …[2 more bytes]",
    ]
    await feeding
