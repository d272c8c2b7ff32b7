"""`POST /v1/embeddings` on a worker started for it: one engine call per request, in a slot."""

from __future__ import annotations

import base64
import struct

from rbee.common.errors import BadRequest
from rbee.contracts.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from rbee.worker.capabilities import check_embedding
from rbee.worker.engines.base import Embeddings, Engine, PromptError
from rbee.worker.runtime import WorkerRuntime


def as_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector as little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embed(runtime: WorkerRuntime, request: EmbeddingRequest) -> EmbeddingList:
    if not runtime.identity.embedding:
        raise BadRequest(
            f"this worker serves {runtime.model_id!r} for chat and completions; embeddings need "
            "a worker started for them (llm-worker-rbee --embedding)",
            code="model_not_embedding",
            param="model",
        )

    if runtime.identity.rerank:
        # A reranker's pooled vector is its relevance score, not an embedding.
        raise BadRequest(
            f"this worker serves {runtime.model_id!r}, a reranker: it scores documents on "
            "POST /v1/rerank and makes no embeddings",
            code="model_not_embedding",
            param="model",
        )

    async def work(engine: Engine) -> Embeddings:
        return await engine.embed(check_embedding(request, engine.embedding_size))

    lease = await runtime.acquire()
    try:
        result = await runtime.run(lease, work)
    except PromptError as exc:
        raise BadRequest(exc.message, code=exc.code, param=exc.param) from None
    runtime.metrics.prompt_tokens.inc(result.prompt_tokens)
    runtime.metrics.embeddings.inc(len(result.vectors))
    data = [
        Embedding(
            index=i,
            embedding=as_base64(vector) if request.encoding_format == "base64" else vector,
        )
        for i, vector in enumerate(result.vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbeddingList(data=data, model=runtime.model_id, usage=usage)
