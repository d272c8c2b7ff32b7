"""Following the queen's jobs on screen: log lines, a download progress bar, cancel on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from rbee.cli.context import CliError
from rbee.clients.queen import JobFailed, QueenClient, QueenError, QueenHTTPError
from rbee.contracts.jobs import JobRequest, ModelDownloadJob, WorkerSpawnJob
from rbee.contracts.workers import WorkerView
from rbee.hive.catalog import is_download_ref

READY_POLL_S = 0.25


async def run_job(
    client: QueenClient, request: JobRequest, console: Console | None
) -> dict[str, Any]:
    """Run a job to its end, echoing its log lines (unless `console` is None); Ctrl-C cancels
    the job on the queen too."""
    job = await client.create_job(request)
    try:
        async with contextlib.aclosing(client.job_events(job)) as events:
            async for event in events:
                if event.type in ("log", "progress") and event.message and console:
                    console.print(event.message, style="dim", markup=False, highlight=False)
                elif event.type == "error":
                    raise JobFailed(job.job_id, event.message or "the job failed")
                elif event.type == "done":
                    return event.result or {}
    except asyncio.CancelledError:
        await _cancel_quietly(client, job.job_id)
        raise CliError(f"cancelled job {job.job_id}", exit_code=130) from None
    raise JobFailed(job.job_id, f"job {job.job_id} ended without a result")  # pragma: no cover


def download_progress(console: Console) -> Progress:
    """A download's progress bar: bytes, speed, time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


async def download(
    client: QueenClient, request: JobRequest, ref: str, console: Console
) -> dict[str, Any]:
    """A download job with a progress bar: bytes, speed, time left."""
    job = await client.create_job(request)
    progress = download_progress(console)
    try:
        with progress:
            bar = progress.add_task(f"downloading {ref}", total=None)
            async with contextlib.aclosing(client.job_events(job)) as events:
                async for event in events:
                    if event.type == "progress" and event.bytes_done is not None:
                        progress.update(bar, completed=event.bytes_done, total=event.bytes_total)
                    elif event.type in ("log", "progress") and event.message:
                        progress.console.print(event.message, style="dim", markup=False)
                    elif event.type == "error":
                        raise JobFailed(job.job_id, event.message or "the download failed")
                    elif event.type == "done":
                        total = progress.tasks[0].total
                        if total is not None:
                            progress.update(bar, completed=total)
                        return event.result or {}
    except asyncio.CancelledError:
        await _cancel_quietly(client, job.job_id)
        raise CliError(f"download cancelled (job {job.job_id})", exit_code=130) from None
    raise JobFailed(job.job_id, f"job {job.job_id} ended without a result")  # pragma: no cover


async def _cancel_quietly(client: QueenClient, job_id: str) -> None:
    with contextlib.suppress(QueenError):
        await client.cancel_job(job_id)


async def pull_if_missing(
    client: QueenClient,
    model: str,
    hive_id: str | None,
    console: Console,
    timeout_s: float = 60.0,
) -> str:
    """The catalog id to start `model` as: as it is when a hive has it; a Hub file
    (`org/repo:file.gguf`) or an `https://…/file.gguf` URL that none has is downloaded first
    (onto `hive_id`, or the one hive), with a progress bar, and waited for until the queen
    lists it. Anything else is left for the spawn to refuse."""
    hives = [h for h in await client.hives() if h.online and hive_id in (None, h.id)]
    if any(model in h.models for h in hives) or not is_download_ref(model):
        return model
    console.print(f"{model} is not on {hive_id or 'any hive'} yet: downloading it", markup=False)
    target = hive_id or (hives[0].id if len(hives) == 1 else None)
    request = ModelDownloadJob(operation="model_download", model=model, hive_id=target)
    result = await download(client, request, model, console)
    model_id = str(result.get("id") or model)
    where = str(result.get("hive_id") or target or "")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not any(
        model_id in h.models for h in await client.hives() if h.online and where in ("", h.id)
    ):
        if loop.time() >= deadline:
            raise CliError(f"downloaded {model_id}, but no hive listed it within {timeout_s:.0f}s")
        await asyncio.sleep(READY_POLL_S)
    return model_id


async def spawn_worker(
    client: QueenClient, request: WorkerSpawnJob, console: Console | None
) -> str:
    """Start a worker through the queen; returns its id. An unknown model names the known ones."""
    try:
        result = await run_job(client, request, console)
    except JobFailed as exc:
        known = await client.models()
        if known and request.model not in {m.id for m in known}:
            names = ", ".join(m.id for m in known)
            raise CliError(
                f"unknown model {request.model!r} — the cluster knows: {names}; a model from "
                "the Hugging Face Hub starts as -m org/repo:file.gguf (downloaded first), or "
                "fetch one with `rbee model pull org/repo:file.gguf` or an https://…/file.gguf URL"
            ) from exc
        raise
    worker_id = result.get("worker_id")
    if not isinstance(worker_id, str):
        raise CliError("the queen started a worker but did not say which (no worker_id)")
    return worker_id


async def wait_until_ready(
    client: QueenClient, worker_ids: Collection[str], timeout_s: float
) -> list[WorkerView]:
    """Poll the registry until every worker is `ready`, or fail after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waiting = set(worker_ids)
    ready: dict[str, WorkerView] = {}
    while waiting:
        for worker_id in sorted(waiting):
            try:
                view = await client.worker(worker_id)
            except QueenHTTPError as exc:
                if exc.status != 404:  # 404: its first heartbeat has not arrived yet
                    raise
                continue
            if view.available:
                ready[worker_id] = view
        waiting -= set(ready)
        if not waiting:
            break
        if loop.time() >= deadline:
            raise CliError(
                f"worker(s) {', '.join(sorted(waiting))} not ready after {timeout_s:.0f}s — "
                "see `rbee worker list` and the hive's log"
            )
        await asyncio.sleep(READY_POLL_S)
    return [ready[w] for w in worker_ids]
