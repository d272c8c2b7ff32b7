"""Spawn, list and stop worker processes."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from rbee.contracts.hive_api import SpawnRequest, SpawnResponse, WorkerProcessList, WorkerStopped
from rbee.hive.state import HiveState, get_state

router = APIRouter()
State = Annotated[HiveState, Depends(get_state)]


@router.post("/v1/workers/spawn", status_code=201)
async def spawn(request: SpawnRequest, state: State) -> SpawnResponse:
    devices = await asyncio.to_thread(state.devices.devices)
    problem = state.devices.problem(request.device, devices)
    usable = [d.id for d in devices if d.problem is None]
    try:
        return await state.supervisor.spawn(request, problem, usable)
    finally:
        state.changed.set()  # the worker holds memory now (or gave it back): tell the queen


@router.get("/v1/workers")
async def list_workers(state: State) -> WorkerProcessList:
    return WorkerProcessList(workers=await asyncio.to_thread(state.supervisor.processes))


@router.post("/v1/workers/{pid}/stop")
async def stop(pid: int, state: State) -> WorkerStopped:
    return await state.supervisor.stop(pid)
