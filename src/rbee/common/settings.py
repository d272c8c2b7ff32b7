"""Setting types every daemon shares, written once."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, AliasChoices, Field

Seconds = Annotated[float, Field(gt=0)]


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:7833")
    return value.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url)]


def token_field(description: str) -> Any:
    """The cluster token: `--token` or the shared `RBEE_TOKEN`, whatever the daemon's prefix."""
    return Field(
        None, validation_alias=AliasChoices("token", "RBEE_TOKEN"), description=description
    )
