"""`POST /v1/rerank` (also `/v1/reranking`, as llama.cpp's server names it) on a worker of a
reranker model: a query and documents in, each document's relevance to the query out, best
first (Jina's and Cohere's rerank API, which llama.cpp's server speaks).

A reranker is a model whose GGUF file pools by rank (llama.cpp's pooling type `rank`, with a
classifier head), run by llama.cpp as an embedding model started with `--reranking`. The
worker checks the request (so a bad one gets a clear 400 naming its field, never a silent
drop), then passes it to llama.cpp holding one of its slots, as embeddings do, and answers
with the worker's model id.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rbee.common.errors import BadRequest, RbeeError, Unavailable, Unsupported
from rbee.worker.api.passthrough import Relaying
from rbee.worker.engines.base import EngineError
from rbee.worker.runtime import WorkerRuntime

router = APIRouter()
PATHS = ("/v1/rerank", "/v1/reranking")
LLAMA_PATH = "/v1/rerank"
# At most this many documents per request (Cohere's limit): each is one pass of the model.
MAX_DOCUMENTS = 1000
FIELDS = frozenset({"model", "query", "documents", "top_n", "return_documents"})


def not_reranker(model: str) -> BadRequest:
    return BadRequest(
        f"model {model!r} is not a reranker: POST /v1/rerank needs a model whose GGUF file "
        "pools by rank (a reranker such as bge-reranker or jina-reranker; llama.cpp's pooling "
        "type `rank`)",
        code="model_not_reranker",
        param="model",
    )


def check_rerank(body: dict[str, Any]) -> tuple[str, list[str], int | None, bool]:
    """The query, the documents, `top_n` and `return_documents` of a rerank request."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise Unsupported(
            unknown[0],
            f"{', '.join(unknown)}: not supported by rerank here (it takes "
            f"{', '.join(sorted(FIELDS))})",
        )
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise BadRequest("`query` is required and must be a non-empty string", param="query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise BadRequest(
            "`documents` is required and must be a non-empty list of strings", param="documents"
        )
    if len(documents) > MAX_DOCUMENTS:
        raise BadRequest(
            f"{len(documents)} documents is too many: at most {MAX_DOCUMENTS} per request",
            code="too_many_documents",
            param="documents",
        )
    for i, document in enumerate(documents):
        if not isinstance(document, str) or not document:
            raise BadRequest(f"documents[{i}] must be a non-empty string", param=f"documents[{i}]")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise BadRequest("`top_n` must be a positive integer", param="top_n")
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise BadRequest("`return_documents` must be true or false", param="return_documents")
    return query, documents, top_n, return_documents


def ranked(
    answer: dict[str, Any], model: str, documents: list[str], return_documents: bool
) -> dict[str, Any]:
    """llama.cpp's answer, named by the worker's model id, with each document's text if asked
    for (as Jina and Cohere give it: `document.text`)."""
    results = answer.get("results")
    if not isinstance(results, list):
        raise Unavailable("the worker's engine gave no rerank results", code="engine_unavailable")
    if return_documents:
        for result in results:
            index = result.get("index") if isinstance(result, dict) else None
            if isinstance(index, int) and 0 <= index < len(documents):
                result["document"] = {"text": documents[index]}
    return {**answer, "model": model, "results": results}


def refused(status: int, content: bytes, ctx_size: int | None) -> RbeeError:
    """llama.cpp's refusal in rbee's error shape (its context one: the worker's --ctx-size)."""
    try:
        error = json.loads(content).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or content[:200].decode(errors="replace"))
    if error.get("type") == "exceed_context_size_error":
        return BadRequest(
            f"the query with one of the documents is {error.get('n_prompt_tokens', 'too many')} "
            f"tokens, more than this worker's context of {ctx_size or error.get('n_ctx')} tokens "
            "(--ctx-size); shorten the documents",
            code="context_length_exceeded",
            param="documents",
        )
    if 400 <= status < 500:
        return BadRequest(message)
    return Unavailable(f"the worker's engine failed: {message}", code="engine_unavailable")


async def rerank(runtime: WorkerRuntime, raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required and must be a non-empty string", param="model")
    runtime.check_model(model)
    if not runtime.identity.rerank:
        raise not_reranker(model)
    _, documents, _, return_documents = check_rerank(body)
    send = {k: v for k, v in body.items() if k != "return_documents"}
    lease = await runtime.acquire()

    async def work(engine: Any) -> tuple[int, bytes]:
        if not isinstance(engine, Relaying):
            raise Unavailable("this worker's engine cannot rerank", code="engine_unavailable")
        answer = await engine.relay(LLAMA_PATH, json.dumps(send).encode())
        try:
            return answer.status, await answer.read()
        finally:
            await answer.close()

    try:
        status, content = await runtime.run(lease, work)
    except EngineError as exc:
        raise Unavailable(str(exc), code="engine_unavailable") from None
    if status != 200:
        raise refused(status, content, runtime.identity.ctx_size)
    try:
        answer = json.loads(content)
    except ValueError:
        raise Unavailable(
            "the worker's engine answered no JSON", code="engine_unavailable"
        ) from None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if isinstance(usage, dict) and isinstance(tokens := usage.get("prompt_tokens"), int):
        runtime.metrics.prompt_tokens.inc(tokens)
    return ranked(answer, runtime.model_id, documents, return_documents)


async def endpoint(http: Request) -> Response:
    runtime: WorkerRuntime = http.app.state.worker
    try:
        return JSONResponse(await rerank(runtime, await http.body()))
    except RbeeError as exc:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


for _path in PATHS:
    router.add_api_route(_path, endpoint, methods=["POST"], response_model=None)
