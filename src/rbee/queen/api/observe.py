"""What Prometheus reads from the queen: its own figures and where to find everyone else's."""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, Request

from rbee.contracts.events import ModelEvents
from rbee.contracts.metrics import ScrapeTarget
from rbee.queen.state import QueenState, get_state

router = APIRouter()
State = Annotated[QueenState, Depends(get_state)]


def _target(url: str, labels: dict[str, str]) -> ScrapeTarget:
    parsed = httpx.URL(url)
    if parsed.scheme == "https":
        labels["__scheme__"] = "https"
    return ScrapeTarget(targets=[parsed.netloc.decode("ascii")], labels=labels)


@router.get("/v1/metrics/targets")
async def metrics_targets(request: Request, state: State) -> list[ScrapeTarget]:
    """Prometheus's HTTP service discovery: the queen, every online hive and every online
    worker. The queen is listed at the address the caller used to reach it, which is the one
    Prometheus can reach."""
    own = f"{request.url.scheme}://{request.url.netloc}"
    targets = [_target(own, {"job": "rbee-queen"})]
    for hive in sorted(state.hives.online(), key=lambda h: h.id):
        targets.append(_target(hive.url, {"job": "rbee-hive", "hive": hive.id}))
    now = state.registry.now()
    records = [r for r in state.registry.records() if state.registry.is_fresh(r, now)]
    for record in sorted(records, key=lambda r: r.info.id):
        info = record.info
        labels = {
            "job": "rbee-worker",
            "hive": info.hive_id or "",
            "model": info.model_id,
            "worker": info.id,
            "device": info.device,
        }
        targets.append(_target(info.url, labels))
    return targets


@router.get("/v1/model-events")
async def model_events(state: State) -> ModelEvents:
    """The last model loads and unloads (up to 100, oldest first), with their reasons: why a
    model is no longer loaded (idle, evicted for another, unloaded by hand)."""
    return ModelEvents.model_validate({"events": state.bus.model_events()})
