"""Who may call each hive route. A new route needs a line here (the route-walk test says so).

Only the queen and the operator (the cluster token) drive a hive; API keys never reach it.
"""

from __future__ import annotations

from collections.abc import Mapping

from rbee.common.access import DOCS_ACCESS, Audience

PUBLIC, CLUSTER = Audience.PUBLIC, Audience.CLUSTER

HIVE_ACCESS: Mapping[str, Audience] = {
    **DOCS_ACCESS,
    "GET /health": PUBLIC,
    "GET /v1/capabilities": CLUSTER,
    "POST /v1/workers/spawn": CLUSTER,
    "GET /v1/workers": CLUSTER,
    "POST /v1/workers/{pid}/stop": CLUSTER,
    "GET /v1/workers/{worker_id}/log": CLUSTER,
    "GET /v1/models": CLUSTER,
    "DELETE /v1/models/{model_id:path}": CLUSTER,
    "POST /v1/jobs": CLUSTER,
    "GET /v1/jobs/{job_id}": CLUSTER,
    "GET /v1/jobs/{job_id}/stream": CLUSTER,
    "DELETE /v1/jobs/{job_id}": CLUSTER,
    "POST /v1/rpc-servers": CLUSTER,
    "GET /v1/rpc-servers": CLUSTER,
    "POST /v1/rpc-servers/{key}/stop": CLUSTER,
    # Prometheus scrapes with the cluster token as its bearer token.
    "GET /metrics": CLUSTER,
}
