"""Devices of this machine."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from rbee.contracts.hive_api import Capabilities
from rbee.hive.state import HiveState, get_state

router = APIRouter()
State = Annotated[HiveState, Depends(get_state)]


@router.get("/v1/capabilities")
async def capabilities(state: State) -> Capabilities:
    devices = await asyncio.to_thread(state.current_devices)
    return Capabilities(hive_id=state.settings.hive_id, devices=devices)
