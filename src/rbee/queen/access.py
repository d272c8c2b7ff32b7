"""Who may call each queen route. A new route needs a line here (the route-walk test says so).

PUBLIC: anyone. INFERENCE: API keys and the cluster token. CLUSTER: the cluster token only
(hives, workers, the operator).
"""

from __future__ import annotations

from collections.abc import Mapping

from rbee.common.access import DOCS_ACCESS, Audience

PUBLIC, INFERENCE, CLUSTER = Audience.PUBLIC, Audience.INFERENCE, Audience.CLUSTER

QUEEN_ACCESS: Mapping[str, Audience] = {
    **DOCS_ACCESS,
    "GET /health": PUBLIC,
    # The dashboard's page and files hold no data; the page asks for the token its calls need.
    "GET /": PUBLIC,
    "GET /dashboard/{path:path}": PUBLIC,
    # The OpenAI API: what API keys are for.
    "GET /v1/models": INFERENCE,
    "GET /v1/models/{model_id:path}": INFERENCE,
    "POST /v1/chat/completions": INFERENCE,
    "POST /v1/completions": INFERENCE,
    "POST /v1/embeddings": INFERENCE,  # inference too, though issue 10 predates it
    "POST /v1/rerank": INFERENCE,  # a reranker model's workers (llama.cpp's --reranking)
    "POST /v1/reranking": INFERENCE,
    "POST /v1/messages": INFERENCE,  # Anthropic Messages
    "POST /v1/messages/count_tokens": INFERENCE,
    "POST /v1/responses": INFERENCE,  # OpenAI Responses
    "POST /v1/responses/input_tokens": INFERENCE,
    # Ollama's API (issue 25): inference, like the OpenAI API it is translated to.
    "GET /api/tags": INFERENCE,
    "GET /api/ps": INFERENCE,
    "GET /api/version": INFERENCE,
    "POST /api/show": INFERENCE,
    "POST /api/chat": INFERENCE,
    "POST /api/generate": INFERENCE,
    "POST /api/embed": INFERENCE,
    "POST /api/embeddings": INFERENCE,
    # The cluster's own traffic and the operator's controls.
    "POST /v1/worker-heartbeat": CLUSTER,
    "POST /v1/hive-heartbeat": CLUSTER,
    "GET /v1/workers": CLUSTER,
    "GET /v1/workers/{worker_id}": CLUSTER,
    "GET /v1/workers/{worker_id}/log": CLUSTER,
    "DELETE /v1/workers/{worker_id}": CLUSTER,
    "GET /v1/hives": CLUSTER,
    "GET /v1/heartbeats/stream": CLUSTER,
    "GET /v1/model-events": CLUSTER,
    "GET /v1/dashboard/history": CLUSTER,
    "POST /v1/jobs": CLUSTER,
    "GET /v1/jobs/{job_id}": CLUSTER,
    "GET /v1/jobs/{job_id}/stream": CLUSTER,
    "DELETE /v1/jobs/{job_id}": CLUSTER,
    "POST /v1/keys": CLUSTER,
    "GET /v1/keys": CLUSTER,
    "DELETE /v1/keys/{name}": CLUSTER,
    # Prometheus scrapes with the cluster token as its bearer token.
    "GET /metrics": CLUSTER,
    "GET /v1/metrics/targets": CLUSTER,
}
