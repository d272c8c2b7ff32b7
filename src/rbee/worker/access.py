"""Who may call each worker route. A new route needs a line here (the route-walk test says so).

Inference reaches a worker through the queen, which holds the cluster token; API keys are
checked by the queen and never reach a worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from rbee.common.access import DOCS_ACCESS, Audience

PUBLIC, CLUSTER = Audience.PUBLIC, Audience.CLUSTER

WORKER_ACCESS: Mapping[str, Audience] = {
    **DOCS_ACCESS,
    "GET /health": PUBLIC,
    "GET /v1/models": CLUSTER,
    "POST /v1/chat/completions": CLUSTER,
    "POST /v1/completions": CLUSTER,
    "POST /v1/embeddings": CLUSTER,
    "POST /v1/messages": CLUSTER,
    "POST /v1/messages/count_tokens": CLUSTER,
    "POST /v1/responses": CLUSTER,
    "POST /v1/responses/input_tokens": CLUSTER,
    "POST /v1/rerank": CLUSTER,
    "POST /v1/reranking": CLUSTER,
    # Prometheus scrapes with the cluster token as its bearer token.
    "GET /metrics": CLUSTER,
}
