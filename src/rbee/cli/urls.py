"""Checking a URL the user typed, as a usage error rather than a traceback."""

from __future__ import annotations

import httpx
import typer


def check_queen_url(value: str | None) -> str | None:
    """A bad --queen-url is a usage error, not a traceback from deep inside the HTTP client."""
    if value is None:
        return None
    try:
        url = httpx.URL(value)
        port = url.port  # parsed: out-of-range ports raise here
    except (httpx.InvalidURL, ValueError) as exc:
        raise typer.BadParameter(f"{value!r} is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise typer.BadParameter(f"{value!r} must look like http://HOST:PORT")
    if port is not None and not 0 < port < 65536:
        raise typer.BadParameter(f"{value!r} has no valid port")
    return value
