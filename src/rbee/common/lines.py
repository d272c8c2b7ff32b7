"""The lines of a child process's output, whatever their length.

asyncio's `readline` (and `async for` over a stream) raises once a line passes 64 KiB, and a
reader that stops draining a pipe blocks the process writing into it as soon as the pipe is
full: a request that made llama-server log a 3 MB line hung the worker. Reading in chunks and
keeping only the head of a long line never raises and never holds more than one chunk and one
line's head in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

CHUNK_BYTES = 64 * 1024
# What is kept of one line (for logs and error messages); the rest is read and dropped.
MAX_LINE_BYTES = 4096


def _ended(head: bytearray, dropped: int) -> str:
    line = head.decode(errors="replace").rstrip()
    return f"{line} …[{dropped} more bytes]" if dropped else line


async def read_lines(
    stream: asyncio.StreamReader, *, keep: int = MAX_LINE_BYTES
) -> AsyncIterator[str]:
    """Each line of `stream` until its end, decoded, at most `keep` bytes of it kept (a cut line
    says how much was dropped)."""
    head = bytearray()
    dropped = 0
    while chunk := await stream.read(CHUNK_BYTES):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            room = max(keep - len(head), 0)
            head += piece[:room]
            dropped += max(len(piece) - room, 0)
            if end < 0:
                break
            yield _ended(head, dropped)
            head.clear()
            dropped = 0
            start = end + 1
    if head or dropped:
        yield _ended(head, dropped)
