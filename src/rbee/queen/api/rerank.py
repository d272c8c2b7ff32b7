"""`POST /v1/rerank` (and `/v1/reranking`) through the queen: routed by model like
`/v1/embeddings`, to the model's embedding workers, which for a reranker model (its GGUF pools
by rank) serve reranking (llama.cpp's `--reranking`). A model whose workers say it is no
reranker is refused here with a 400 naming why; a worker started for it says so itself."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.requests import Request

from rbee.common.errors import BadRequest, quote
from rbee.contracts.workers import WorkerInfo
from rbee.queen.state import QueenState

PATHS = ("/v1/rerank", "/v1/reranking")


def not_a_reranker(model: str, workers: Iterable[WorkerInfo]) -> BadRequest | None:
    """The refusal of a rerank request for a model served only by workers that do not rerank.
    A model's file decides whether it is a reranker, so one worker that says so settles it."""
    known = list(workers)
    if not known or any(w.rerank for w in known):
        return None
    return BadRequest(
        f"model {quote(model)} is not a reranker: POST /v1/rerank needs a model whose GGUF file "
        "pools by rank (a reranker such as bge-reranker or jina-reranker)",
        code="model_not_reranker",
        param="model",
    )


async def check(state: QueenState, request: Request) -> None:
    """Refuses a rerank request for a model known not to be a reranker; anything else (a bad
    body included) is the proxy's to answer."""
    try:
        model = json.loads(await request.body()).get("model")
    except (ValueError, AttributeError):
        return
    if isinstance(model, str) and model:
        refusal = not_a_reranker(model, state.registry.find_workers_by_model(model))
        if refusal is not None:
            raise refusal
