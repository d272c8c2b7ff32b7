"""API keys for inference-only callers: create, list, revoke (operator only, see access.py)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from rbee.contracts.keys import KeyCreate, KeyList, KeyRevoked
from rbee.queen.state import QueenState, get_state

router = APIRouter()
State = Annotated[QueenState, Depends(get_state)]


@router.post("/v1/keys", status_code=201)
async def create_key(request: KeyCreate, state: State) -> JSONResponse:
    created = await asyncio.to_thread(state.keys.create, request.name, request.expires_days)
    return JSONResponse(created.model_dump(mode="json"), status_code=201)


@router.get("/v1/keys")
async def list_keys(state: State) -> KeyList:
    return KeyList(keys=await asyncio.to_thread(state.keys.list))


@router.delete("/v1/keys/{name}")
async def revoke_key(name: str, state: State) -> KeyRevoked:
    await asyncio.to_thread(state.keys.revoke, name)
    return KeyRevoked(revoked=name)
