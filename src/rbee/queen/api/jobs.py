"""The queen's jobs API: cluster operations with SSE progress."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse

from rbee.common.jobs import Job, Jobs, job_routes
from rbee.contracts.jobs import (
    JobCreated,
    JobRequest,
    ModelDeleteJob,
    ModelDownloadJob,
    ModelListJob,
    ModelLoadJob,
    ModelUnloadJob,
    WorkerSpawnJob,
    WorkerStopJob,
)
from rbee.queen.state import QueenState, get_state

router = APIRouter()
State = Annotated[QueenState, Depends(get_state)]


def _jobs(request: Request) -> Jobs:
    return get_state(request).jobs


def _work(state: QueenState, request: JobRequest) -> Callable[[Job], Awaitable[dict[str, Any]]]:
    ops = state.operations
    match request:
        case WorkerSpawnJob():
            return lambda job: ops.worker_spawn(job, request)
        case WorkerStopJob():
            return lambda job: ops.worker_stop(job, request)
        case ModelDownloadJob():
            return lambda job: ops.model_download(job, request)
        case ModelListJob():
            return lambda job: ops.model_list(job, request)
        case ModelDeleteJob():
            return lambda job: ops.model_delete(job, request)
        case ModelLoadJob():
            return lambda job: ops.model_load(job, request)
        case ModelUnloadJob():
            return lambda job: ops.model_unload(job, request)


@router.post("/v1/jobs", status_code=201)
async def create_job(request: Annotated[JobRequest, Body()], state: State) -> JSONResponse:
    state.operations.check(request)  # a model nobody knows: 404 now, and no job
    job = state.jobs.start(request.operation, _work(state, request))
    created = JobCreated(job_id=job.id, sse_url=f"/v1/jobs/{job.id}/stream")
    return JSONResponse(created.model_dump(), status_code=201)


router.include_router(job_routes(_jobs))
