"""API keys for inference-only callers: create, list, revoke (operator only, see access.py).

Keys are checked only on a queen with a cluster token (a token-less queen lets every local
caller do everything), so creating one anywhere else is refused rather than handing out a key
that guards nothing."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from rbee.common.errors import Conflict
from rbee.contracts.keys import KeyCreate, KeyList, KeyRevoked
from rbee.queen.state import QueenState, get_state

router = APIRouter()
State = Annotated[QueenState, Depends(get_state)]
NO_TOKEN = (
    "this queen has no cluster token, so it checks no API keys: any caller that reaches it "
    "may do everything, and a key would guard nothing. Start the queen with RBEE_TOKEN "
    "(or --token-file) set, then create keys"
)


@router.post("/v1/keys", status_code=201)
async def create_key(request: KeyCreate, state: State) -> JSONResponse:
    if not state.settings.token:
        raise Conflict(NO_TOKEN, code="keys_not_checked")
    created = await asyncio.to_thread(state.keys.create, request.name, request.expires_days)
    return JSONResponse(created.model_dump(mode="json"), status_code=201)


@router.get("/v1/keys")
async def list_keys(state: State) -> KeyList:
    await state.keys.flush()  # the latest counts, taken on the loop and written in a thread
    return KeyList(keys=await asyncio.to_thread(state.keys.list))


@router.delete("/v1/keys/{name}")
async def revoke_key(name: str, state: State) -> KeyRevoked:
    await asyncio.to_thread(state.keys.revoke, name)
    return KeyRevoked(revoked=name)
