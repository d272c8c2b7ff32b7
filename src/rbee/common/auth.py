"""The cluster token: a bearer token checked in constant time, and the loopback rule."""

from __future__ import annotations

import ipaddress
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


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_open_bind(host: str, token: str | None) -> str | None:
    """The reason a daemon must not start, or None. Binding off-loopback needs a token."""
    if token or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host} without a token: anyone who can reach it could "
        "register workers or read prompts. Set RBEE_TOKEN (or --token), or bind to 127.0.0.1."
    )
