"""Long operations as jobs: each runs as an asyncio task and tells its story as `JobEvent`s.

Every event is kept until the job is forgotten, so a client that connects to the stream late
still sees the whole story, ending with exactly one final event (`done` or `error`).
Finished jobs are forgotten `keep_s` seconds after they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from rbee.common.clock import Clock, monotonic
from rbee.common.errors import NotFound, RbeeError, quote
from rbee.contracts.jobs import JobEvent, JobInfo

log = logging.getLogger("rbee.jobs")
Status = Literal["running", "done", "error", "cancelled"]


class Job:
    def __init__(self, job_id: str, operation: str) -> None:
        self.id = job_id
        self.operation = operation
        self.status: Status = "running"
        self.events: list[JobEvent] = []
        self.ended_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.finalizers: list[Callable[[], None]] = []  # run once when the job ends
        self._wake = asyncio.Event()

    @property
    def info(self) -> JobInfo:
        last = self.events[-1] if self.events else None
        return JobInfo(
            job_id=self.id, operation=self.operation, status=self.status, last_event=last
        )

    def emit(self, event: JobEvent) -> None:
        if self.events and self.events[-1].final:
            return  # a job tells exactly one ending
        self.events.append(event)
        self._wake.set()
        self._wake = asyncio.Event()

    async def stream(self) -> AsyncIterator[JobEvent]:
        """Every event from the first, then new ones as they happen, up to the final one."""
        seen = 0
        while True:
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                yield event
                if event.final:
                    return
            await self._wake.wait()


def _cancelled() -> JobEvent:
    return JobEvent(type="error", message="cancelled", code="cancelled")


Work = Callable[[Job], Awaitable[dict[str, Any]]]


class Jobs:
    def __init__(self, *, clock: Clock = monotonic, keep_s: float = 600.0) -> None:
        self._jobs: dict[str, Job] = {}
        self._clock = clock
        self._keep_s = keep_s

    def start(self, operation: str, work: Work) -> Job:
        self._forget_old()
        job = Job(secrets.token_hex(8), operation)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, work), name=f"job-{job.id}")
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {quote(job_id)}", code="job_not_found")
        return job

    async def cancel(self, job_id: str) -> JobInfo:
        """Cancel a running job and wait until it has cleaned up; a finished one is left as is."""
        job = self.get(job_id)
        if job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        if job.status == "running":  # cancelled before its task ever ran
            self._end(job, "cancelled", _cancelled())
        return job.info

    async def close(self) -> None:
        for job_id, job in list(self._jobs.items()):
            if job.task is not None and not job.task.done():
                await self.cancel(job_id)

    async def _run(self, job: Job, work: Work) -> None:
        try:
            result = await work(job)
        except asyncio.CancelledError:
            self._end(job, "cancelled", _cancelled())
            raise
        except RbeeError as exc:
            details = exc.fields or None
            event = JobEvent(type="error", message=exc.message, code=exc.code, details=details)
            self._end(job, "error", event)
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.operation)
            self._end(job, "error", JobEvent(type="error", message=str(exc) or repr(exc)))
        else:
            self._end(job, "done", JobEvent(type="done", message="done", result=result))

    def _end(self, job: Job, status: Status, event: JobEvent) -> None:
        job.status = status
        job.ended_at = self._clock()
        job.emit(event)
        for finalize in job.finalizers:
            finalize()
        job.finalizers.clear()

    def _forget_old(self) -> None:
        now = self._clock()
        for job_id, job in list(self._jobs.items()):
            if job.ended_at is not None and now - job.ended_at > self._keep_s:
                del self._jobs[job_id]


def job_routes(get_jobs: Callable[[Request], Jobs]) -> APIRouter:
    """`GET /v1/jobs/{id}/stream` (SSE of JobEvents), `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}`."""
    router = APIRouter()
    # A default, not an Annotated alias: under `from __future__ import annotations` FastAPI
    # resolves annotations in module globals, where a local alias is invisible.
    jobs_dep = Depends(get_jobs)

    @router.get("/v1/jobs/{job_id}/stream")
    async def stream_job(job_id: str, jobs: Jobs = jobs_dep) -> EventSourceResponse:
        job = jobs.get(job_id)

        async def events() -> AsyncIterator[ServerSentEvent]:
            index = 0
            async for event in job.stream():
                yield ServerSentEvent(
                    data=event.model_dump_json(exclude_none=True), event=event.type, id=str(index)
                )
                index += 1

        return EventSourceResponse(events())

    @router.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, jobs: Jobs = jobs_dep) -> JobInfo:
        return jobs.get(job_id).info

    @router.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, jobs: Jobs = jobs_dep) -> JobInfo:
        return await jobs.cancel(job_id)

    return router
