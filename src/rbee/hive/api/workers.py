"""Spawn, list and stop worker processes."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse

from rbee.common.disconnect import CLIENT_CLOSED_REQUEST, ClientGone, unless_client_leaves
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse, WorkerProcessList, WorkerStopped
from rbee.hive.state import HiveState, get_state

router = APIRouter()
State = Annotated[HiveState, Depends(get_state)]


@router.post("/v1/workers/spawn", status_code=201, response_model=SpawnResponse)
async def spawn(request: SpawnRequest, http: Request, state: State) -> SpawnResponse | Response:
    # On the loop, as /metrics reads them: ~0.1 ms, where a thread's round trip cost a swap
    # a few ms on busy cores.
    devices = state.devices.devices()
    problem = state.devices.problem(request.device, devices)
    usable = [d.id for d in devices if d.problem is None]
    try:
        # A queen that stops waiting (its spawn timeout) gets no worker left running.
        return await unless_client_leaves(
            http.receive, state.supervisor.spawn(request, problem, usable)
        )
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        state.changed.set()  # the worker holds memory now (or gave it back): tell the queen


@router.get("/v1/workers")
async def list_workers(state: State) -> WorkerProcessList:
    return WorkerProcessList(workers=await asyncio.to_thread(state.supervisor.processes))


@router.post("/v1/workers/{pid}/stop")
async def stop(pid: int, state: State, worker_id: str | None = None) -> WorkerStopped:
    """`worker_id`: stop the process only if it is that worker (a caller that knew the pid from
    the worker itself, which may have exited since and its pid been reused)."""
    try:
        return await state.supervisor.stop(pid, worker_id)
    finally:
        # The worker's memory is free again: the queen learns it now, not at the next beat
        # (a model waiting for that room, evicting for it, would wait a whole interval).
        state.changed.set()


@router.get("/v1/workers/{worker_id}/log", response_class=PlainTextResponse)
async def worker_log(
    worker_id: str, state: State, lines: Annotated[int, Query(ge=1, le=100_000)] = 200
) -> PlainTextResponse:
    """The end of a worker's log (its output and its engine's), running or stopped."""
    text = await asyncio.to_thread(state.supervisor.log_tail, worker_id, lines)
    return PlainTextResponse(text)
