"""Long operations as jobs (the hive runs model downloads), with SSE progress."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from rbee.common.errors import BadRequest
from rbee.common.jobs import Job, Jobs, job_routes
from rbee.contracts.jobs import JobCreated, JobRequest, ModelDownloadJob
from rbee.hive.catalog import parse_source
from rbee.hive.state import HiveState, get_state

router = APIRouter()
State = Annotated[HiveState, Depends(get_state)]


@router.post("/v1/jobs", status_code=201)
async def create_job(request: Annotated[JobRequest, Body()], state: State) -> JobCreated:
    if not isinstance(request, ModelDownloadJob):
        raise BadRequest(
            f"a hive runs model_download jobs only, not {request.operation}; "
            "spawn workers with POST /v1/workers/spawn",
            code="unsupported_operation",
        )
    hub = parse_source(request.model)  # org/repo:file.gguf, or an http(s) URL of a .gguf
    downloader = state.downloader
    downloader.claim(hub)

    async def work(job: Job) -> dict[str, Any]:
        model = await downloader.download(hub, job.id, job.emit)
        state.changed.set()
        return model.model_dump()

    job = state.jobs.start("model_download", work)
    job.finalizers.append(lambda: downloader.release(hub))
    return JobCreated(job_id=job.id, sse_url=f"/v1/jobs/{job.id}/stream")


def _jobs(request: Request) -> Jobs:
    return get_state(request).jobs


router.include_router(job_routes(_jobs))
