"""Who may call what. Every route of every daemon has a decided audience, written in that
daemon's access table ("METHOD /path" → Audience); the decision itself is one pure function.

A route missing from its table is treated as CLUSTER (the safest choice) and makes the
route-walk test in tests/integration/test_access_routes.py fail, naming the line to add.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount


class Audience(StrEnum):
    PUBLIC = "public"  # anyone, with or without a credential (health checks)
    INFERENCE = "inference"  # API keys and the cluster token
    CLUSTER = "cluster"  # the cluster token only: hives, workers and the operator


class Caller(StrEnum):
    NOBODY = "nobody"  # no credential, or one that matches nothing
    API_KEY = "api_key"
    CLUSTER = "cluster"  # holds the cluster token


# FastAPI's own pages: served only while no cluster token is set (see auth.openapi_url).
DOCS_ACCESS: Mapping[str, Audience] = {
    "GET /openapi.json": Audience.PUBLIC,
    "GET /docs": Audience.PUBLIC,
    "GET /docs/oauth2-redirect": Audience.PUBLIC,
    "GET /redoc": Audience.PUBLIC,
}

UNDECIDED = Audience.CLUSTER


def decide(audience: Audience, caller: Caller, *, token_set: bool) -> int | None:
    """None when the caller may go on, else the status to answer (401 or 403).

    Without a cluster token a daemon has no credentials to check: it trusts whoever reaches
    it, which the loopback bind, the Host check and the Origin check keep to local programs.
    """
    if not token_set or audience is Audience.PUBLIC or caller is Caller.CLUSTER:
        return None
    if caller is Caller.NOBODY:
        return 401
    return None if audience is Audience.INFERENCE else 403


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # the route's template, e.g. /v1/workers/{worker_id}
    regex: re.Pattern[str] | None  # None for a path without parameters

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


def endpoints(app: FastAPI) -> list[Endpoint]:
    """Every method and path the app answers, included routers flattened (HEAD goes with GET)."""
    found = []
    for route in iter_route_contexts(app.routes):
        path, methods = route.path, route.methods
        if isinstance(route.original_route, Mount):  # a sub-app (static files): all of it
            found.append(Endpoint("GET", f"{path}/{{path:path}}", route.path_regex))
            continue
        if path is None or not methods:
            continue
        regex = route.path_regex if route.param_convertors else None
        found += [Endpoint(m, path, regex) for m in sorted(methods) if m != "HEAD"]
    return found


def undecided_routes(app: FastAPI, table: Mapping[str, Audience]) -> list[str]:
    return [e.key for e in endpoints(app) if e.key not in table]
