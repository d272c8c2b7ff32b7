"""The OpenAI API of the whole cluster: models, chat completions, completions, embeddings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response
from starlette.routing import Route

from rbee.common.errors import NotFound, quote
from rbee.queen.api import anthropic as anthropic_api
from rbee.queen.api import rerank as rerank_api
from rbee.queen.live import model_entries
from rbee.queen.state import QueenState, get_state

router = APIRouter()
State = Annotated[QueenState, Depends(get_state)]


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    """Models an online worker serves (`loaded`) and models a live hive could start
    (`available`); `rbee.embedding` says which answer `/v1/embeddings`."""
    return {"object": "list", "data": model_entries(state)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> dict[str, Any]:
    """One model, as in `/v1/models` (OpenAI's retrieve-model); 404 `model_not_found` in
    OpenAI's shape for a model no worker serves and no hive has."""
    for entry in model_entries(state):
        if entry.get("id") == model_id:
            return entry
    raise NotFound(
        f"The model {quote(model_id)} does not exist (GET /v1/models lists those that do)",
        code="model_not_found",
        param="model",
    )


# Path → whether it goes to embedding workers (rerank: a reranker's workers are embedding ones).
PROXIED_PATHS = {"/v1/chat/completions": False, "/v1/completions": False, "/v1/embeddings": True}
PROXIED_PATHS.update(dict.fromkeys(rerank_api.PATHS, True))


def proxy_routes() -> list[Route]:
    """The proxied endpoints, as plain Starlette routes rather than FastAPI ones: FastAPI solves
    each route's dependencies per request (the state getter even in a thread), which was an
    eighth of the queen's CPU per proxied request, and these routes need none of it. The body
    passes through unvalidated anyway. Credentials are checked by the gate (rbee.common.gate)
    before any route; errors still reach the app's handlers.

    `/v1/embeddings` is routed like chat, to the model's workers started for embeddings (one
    is started on a hive that has the model if there is none)."""

    def endpoint(path: str, embedding: bool) -> Callable[[Request], Awaitable[Response]]:
        async def forward(request: Request) -> Response:
            state: QueenState = request.app.state.queen
            if path in rerank_api.PATHS:
                await rerank_api.check(state, request)
            return await state.proxy.forward(request, path, embedding=embedding)

        return forward

    routes = [
        Route(path, endpoint(path, embedding), methods=["POST"])
        for path, embedding in PROXIED_PATHS.items()
    ]
    # Anthropic Messages and OpenAI Responses, routed the same way (rbee.queen.api.anthropic).
    for path in (*anthropic_api.MESSAGES_PATHS, *anthropic_api.RESPONSES_PATHS):
        routes.append(Route(path, anthropic_api.endpoint(path), methods=["POST"]))
    return routes
