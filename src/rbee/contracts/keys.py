"""API keys on the wire: create one, list them (never with their secret), revoke one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

KeyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: KeyName
    expires_days: Annotated[int, Field(ge=1, le=36500)] | None = None


class ApiKeyInfo(BaseModel):
    """One key as `rbee key list` shows it. The secret is stored only as a hash."""

    name: str
    created: datetime
    expires: datetime | None = None
    last_used: datetime | None = None
    requests: int = 0
    tokens: int = 0


class KeyCreated(ApiKeyInfo):
    key: str  # the secret: shown once, in this answer, and never again


class KeyList(BaseModel):
    keys: list[ApiKeyInfo]


class KeyRevoked(BaseModel):
    revoked: str
