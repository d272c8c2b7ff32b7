"""The OpenAI API of the whole cluster: models, chat completions, completions, embeddings."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from rbee.queen.live import model_entries
from rbee.queen.state import QueenState, get_state

router = APIRouter()
State = Annotated[QueenState, Depends(get_state)]


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    """Models an online worker serves (`loaded`) and models a live hive could start
    (`available`); `rbee.embedding` says which answer `/v1/embeddings`."""
    return {"object": "list", "data": model_entries(state)}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State) -> StreamingResponse:
    return await state.proxy.forward(request, "/v1/chat/completions")


@router.post("/v1/completions")
async def completions(request: Request, state: State) -> StreamingResponse:
    return await state.proxy.forward(request, "/v1/completions")


@router.post("/v1/embeddings")
async def embeddings(request: Request, state: State) -> StreamingResponse:
    """Routed like chat, to the model's workers started for embeddings (one is started on a
    hive that has the model if there is none)."""
    return await state.proxy.forward(request, "/v1/embeddings", embedding=True)
