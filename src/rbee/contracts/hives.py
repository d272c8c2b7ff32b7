"""The hive contract: what a hive tells the queen about its machine."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer

from rbee.contracts.workers import NonEmptyStr, utc_now


class Device(BaseModel):
    """A compute device of a machine: the CPU (`cpu:0`) or a GPU (`cuda:N`)."""

    model_config = ConfigDict(frozen=True)

    id: NonEmptyStr
    kind: Literal["cpu", "cuda"]
    name: str
    cores: Annotated[int, Field(ge=0)] | None = None
    memory_total_bytes: Annotated[int, Field(ge=0)]
    memory_free_bytes: Annotated[int, Field(ge=0)]


class HiveInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: NonEmptyStr
    url: NonEmptyStr
    version: NonEmptyStr


class HiveHeartbeat(BaseModel):
    """Posted by each hive to `POST /v1/hive-heartbeat` at start and every interval."""

    model_config = ConfigDict(frozen=True)

    hive: HiveInfo
    devices: list[Device] = Field(default_factory=list)
    models: list[str] = Field(
        default_factory=list, description="ids of the models in the hive's catalog"
    )
    timestamp: AwareDatetime = Field(default_factory=utc_now)

    @field_serializer("timestamp")
    def _rfc3339_utc(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class HiveView(BaseModel):
    """A hive as the queen reports it."""

    id: str
    url: str
    version: str
    devices: list[Device]
    models: list[str]
    online: bool
    last_seen_s: float
    timestamp: str
