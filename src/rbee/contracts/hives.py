"""The hive contract: what a hive tells the queen about its machine."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from rbee.contracts.workers import NonEmptyStr, WireTime, is_plain_host, utc_now


class Device(BaseModel):
    """A compute device of a machine: the CPU (`cpu:0`), an NVIDIA GPU (`cuda:N`) or an Apple
    GPU (`metal:0`, whose memory is the machine's own)."""

    model_config = ConfigDict(frozen=True)

    id: NonEmptyStr
    kind: Literal["cpu", "cuda", "metal"]
    name: str
    cores: Annotated[int, Field(ge=0)] | None = None
    memory_total_bytes: Annotated[int, Field(ge=0)]
    memory_free_bytes: Annotated[int, Field(ge=0)] = Field(
        description="what a new worker may take: the device's free memory, or, under the hive's "
        "--memory-limit, the limit less what rbee's workers there hold, if that is less"
    )
    memory_limit_bytes: Annotated[int, Field(ge=0)] | None = Field(
        None, description="the hive's --memory-limit for rbee's workers on this device"
    )
    rbee_used_bytes: Annotated[int, Field(ge=0)] | None = Field(
        None, description="what this hive's workers hold on this device (given with a limit)"
    )
    problem: str | None = Field(
        None, description="why no worker can run on this device (e.g. a build without CUDA)"
    )


class ModelFootprint(BaseModel):
    """What a model file says about the memory it needs, read from its GGUF header."""

    model_config = ConfigDict(frozen=True)

    weights_bytes: Annotated[int, Field(ge=0)]
    layers: Annotated[int, Field(ge=1)]
    kv_bytes_per_token: Annotated[int, Field(ge=0)] = Field(
        description="the K and V cache of one token across all layers, at f16"
    )
    vocab_size: Annotated[int, Field(ge=0)]
    head_count: Annotated[int, Field(ge=0)]
    kv_quantizable: bool = Field(
        default=False,
        description="every attention head is whole q8_0 blocks, so a worker with several "
        "slots stores its KV cache as q8_0 (about half of f16)",
    )
    context_length: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the context the model was trained for (GGUF <arch>.context_length)"
    )
    quantization: str | None = Field(
        None, description="how its weights are stored, e.g. Q4_K_M (GGUF general.file_type)"
    )
    embedding_length: Annotated[int, Field(ge=0)] = Field(
        0, description="the width of its hidden state (GGUF <arch>.embedding_length; 0: unknown)"
    )
    feed_forward_length: Annotated[int, Field(ge=0)] = Field(
        0,
        description="the width of its feed-forward layers, the widest if they differ (0: unknown)",
    )


class HiveInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: NonEmptyStr
    url: NonEmptyStr
    version: NonEmptyStr

    @field_validator("url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        """`http(s)://host:port` and nothing more: the queen sends spawn requests there."""
        problem = "must be an http:// or https:// URL of a host and port, e.g. http://box:7835"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  # parsed here: a bad port raises
        except ValueError:
            raise ValueError(problem) from None
        host = (parts.hostname or "").strip("[]")
        if (
            parts.scheme not in ("http", "https")
            or not is_plain_host(host)
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            raise ValueError(problem)
        return url.rstrip("/")


class HiveHeartbeat(BaseModel):
    """Posted by each hive to `POST /v1/hive-heartbeat` at start and every interval."""

    model_config = ConfigDict(frozen=True)

    hive: HiveInfo
    devices: list[Device] = Field(default_factory=list)
    models: list[str] = Field(
        default_factory=list, description="ids of the models in the hive's catalog"
    )
    footprints: dict[str, ModelFootprint] = Field(
        default_factory=dict, description="by model id, for the models whose header was readable"
    )
    workers: list[str] = Field(
        default_factory=list,
        description="ids of the hive's workers that had started when `devices` was read: the "
        "memory they take is in those figures",
    )
    timestamp: WireTime = Field(default_factory=utc_now)

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
    footprints: dict[str, ModelFootprint] = Field(default_factory=dict)
    workers: list[str] = Field(default_factory=list)
    online: bool
    last_seen_s: float
    timestamp: str
