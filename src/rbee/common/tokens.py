"""The cluster token and the loopback rule, without web-framework imports (the CLI uses these,
and importing FastAPI would slow every `rbee` command)."""

from __future__ import annotations

import ipaddress


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
        "register workers or read prompts. Set RBEE_TOKEN (or --token-file), or bind to 127.0.0.1."
    )
