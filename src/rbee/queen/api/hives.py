"""Hive heartbeats in, the hive inventory out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from rbee.contracts.hives import HiveHeartbeat, HiveView
from rbee.contracts.workers import HeartbeatAck
from rbee.queen.state import QueenState, get_state

router = APIRouter()
# A hive heartbeat lists its devices and model ids: a few KiB even for a big catalog.
HIVE_HEARTBEAT_MAX_BYTES = 256 * 1024
State = Annotated[QueenState, Depends(get_state)]


@router.post("/v1/hive-heartbeat", max_body_size=HIVE_HEARTBEAT_MAX_BYTES)
async def hive_heartbeat(heartbeat: HiveHeartbeat, state: State) -> HeartbeatAck:
    state.metrics.heartbeats["hive"] += 1
    change = "registered" if state.hives.update(heartbeat) else "updated"
    hive = state.hives.get(heartbeat.hive.id)
    if hive is not None:
        state.spawner.reservations.seen([hive])
    view = hive.model_dump(mode="json") if hive else None
    state.bus.publish("hive", {"change": change, "hive_id": heartbeat.hive.id, "hive": view})
    return HeartbeatAck(status="ok", message=f"hive {heartbeat.hive.id} recorded")


@router.get("/v1/hives")
async def list_hives(state: State) -> dict[str, list[HiveView]]:
    return {"hives": sorted(state.hives.all(), key=lambda h: h.id)}
