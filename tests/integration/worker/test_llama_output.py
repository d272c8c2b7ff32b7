"""The worker drains llama-server's output whatever it writes: a stand-in server (a shell
script) that writes a 3 MB line, as llama.cpp echoes a request's huge JSON-schema pattern."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from rbee.worker.engines.base import EngineError
from rbee.worker.engines.llama_process import LlamaServer, ServerConfig

# More than a pipe holds: a reader that stopped at 64 KiB leaves the writer blocked for good.
LONG_LINE_THEN_EXIT = """#!/bin/sh
head -c 3000000 /dev/zero | tr '\\0' x
echo
echo "error: the last words"
exit 3
"""


async def test_a_line_over_64_kib_is_drained_and_the_servers_last_words_are_reported(
    tmp_path: Path,
) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text(LONG_LINE_THEN_EXIT)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    config = ServerConfig(
        model=tmp_path / "model.gguf", ctx_size=512, slots=1, threads=1, binary=str(binary)
    )
    server = LlamaServer(config, load_timeout_s=30)
    try:
        async with asyncio.timeout(60):
            with pytest.raises(EngineError) as failed:
                await server.start()
    finally:
        await server.close()
    assert str(failed.value) == (
        "llama.cpp's server exited with code 3 while loading: error: the last words"
    )
