"""The OpenAI API of the whole cluster: models, chat completions, completions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from rbee.queen.routing.router import SERVING
from rbee.queen.state import QueenState, get_state

router = APIRouter()
State = Annotated[QueenState, Depends(get_state)]


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    """Models an online worker serves (`loaded`) and models a live hive could start (`available`)."""
    now = state.registry.now()
    workers: dict[str, int] = {}
    for record in state.registry.records():
        if record.info.status in SERVING and state.registry.is_fresh(record, now):
            workers[record.info.model_id] = workers.get(record.info.model_id, 0) + 1
    hives: dict[str, list[str]] = {}
    for hive in state.hives.all():
        if hive.online:
            for model in hive.models:
                hives.setdefault(model, []).append(hive.id)
    data = [
        {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "rbee",
            "rbee": {
                "state": "loaded" if workers.get(model) else "available",
                "workers": workers.get(model, 0),
                "hives": sorted(hives.get(model, [])),
            },
        }
        for model in sorted(set(workers) | set(hives))
    ]
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State) -> StreamingResponse:
    return await state.proxy.forward(request, "/v1/chat/completions")


@router.post("/v1/completions")
async def completions(request: Request, state: State) -> StreamingResponse:
    return await state.proxy.forward(request, "/v1/completions")
