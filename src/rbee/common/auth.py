"""The cluster token checked on requests: a bearer token compared in constant time."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request

from rbee.common.errors import Unauthorized


def bearer_guard(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that lets a request through only with `Authorization: Bearer <token>`."""
    expected = token.encode() if token else None

    async def guard(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), expected
        ):
            raise Unauthorized("missing or wrong bearer token (set RBEE_TOKEN or pass --token)")

    return guard


def openapi_url(token: str | None) -> str | None:
    """FastAPI serves `/openapi.json`, `/docs` and `/redoc` without any check: with a cluster
    token set they are switched off (no schema URL means no docs either)."""
    return None if token else "/openapi.json"
