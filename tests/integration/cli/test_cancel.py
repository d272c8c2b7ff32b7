"""Ctrl-C during a job: the job is cancelled on the queen, not just abandoned."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from rich.console import Console

from rbee.cli import jobs
from rbee.cli.context import CliError
from rbee.clients.queen import QueenClient
from rbee.contracts.jobs import ModelDownloadJob


async def test_cancelling_a_download_cancels_the_job_on_the_queen() -> None:
    first_event_sent = asyncio.Event()
    requests: list[str] = []

    async def endless_download() -> AsyncIterator[bytes]:
        event = {"type": "progress", "bytes_done": 1_000, "bytes_total": 10_000}
        yield f"data: {json.dumps(event)}\n\n".encode()
        first_event_sent.set()
        await asyncio.Event().wait()  # the download never finishes by itself
        yield b""  # pragma: no cover

    def queen(request: httpx.Request) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            return httpx.Response(201, json={"job_id": "j1", "sse_url": "/v1/jobs/j1/stream"})
        if request.method == "GET":
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=endless_download()
            )
        return httpx.Response(200, json={"job_id": "j1", "status": "cancelled"})

    async with QueenClient(transport=httpx.MockTransport(queen)) as client:
        request = ModelDownloadJob(operation="model_download", model="org/big")
        task = asyncio.create_task(
            jobs.download(client, request, "org/big", Console(file=io.StringIO()))
        )
        await first_event_sent.wait()
        task.cancel()  # what asyncio.run does with the main task on Ctrl-C
        with pytest.raises(CliError, match=r"download cancelled \(job j1\)") as raised:
            await task

    assert raised.value.exit_code == 130
    assert requests == ["POST /v1/jobs", "GET /v1/jobs/j1/stream", "DELETE /v1/jobs/j1"]
