"""FastAPI's own pages under a cluster token. Credentials are checked by `rbee.common.gate`."""

from __future__ import annotations


def openapi_url(token: str | None) -> str | None:
    """FastAPI serves `/openapi.json`, `/docs` and `/redoc` without any check: with a cluster
    token set they are switched off (no schema URL means no docs either)."""
    return None if token else "/openapi.json"
