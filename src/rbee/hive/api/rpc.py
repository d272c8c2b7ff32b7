"""Start, list and stop the RPC servers this hive lends to split workers (`rbee.hive.rpc`)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request

from rbee.contracts.rpc import RpcServerInfo, RpcServerList, RpcServerRequest, RpcServerStopped
from rbee.hive.rpc import RpcServers
from rbee.hive.state import HiveState, get_state

router = APIRouter()
State = Annotated[HiveState, Depends(get_state)]


def servers(app: FastAPI) -> RpcServers:
    """The hive's RPC servers, made on first use from its settings."""
    found: RpcServers | None = getattr(app.state, "rpc_servers", None)
    if found is None:
        found = RpcServers(app.state.hive.settings)
        app.state.rpc_servers = found
        app.state.hive.rpc_servers = found  # its memory counts against --memory-limit
    return found


@router.post("/v1/rpc-servers", status_code=201, response_model=RpcServerInfo)
async def start(request: RpcServerRequest, http: Request, state: State) -> RpcServerInfo:
    workers = await asyncio.to_thread(state.supervisor.processes)
    try:
        return await servers(http.app).start(request, {w.port for w in workers})
    finally:
        state.changed.set()  # it holds memory now: the queen learns it at once


@router.get("/v1/rpc-servers")
async def list_servers(http: Request) -> RpcServerList:
    return RpcServerList(rpc_servers=await asyncio.to_thread(servers(http.app).listed))


@router.post("/v1/rpc-servers/{key}/stop")
async def stop(key: str, http: Request, state: State) -> RpcServerStopped:
    try:
        return await servers(http.app).stop(key)
    finally:
        state.changed.set()
