"""The worker contract: what a worker tells the queen about itself."""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Literal

import httpx
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
)

_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,252})")
NonEmptyStr = Annotated[str, Field(min_length=1, max_length=256)]
Port = Annotated[int, Field(ge=1, le=65535)]
# A device a worker computes on: the CPU, NVIDIA GPU N (numbered as nvidia-smi does), the Apple GPU.
DEVICE_PATTERN = r"^(cpu|cuda|metal):(0|[1-9][0-9]{0,2})$"

# What a worker id may be: a hive names its workers HIVE-PORT; ids given on spawn match too.
WORKER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_device_id(value: str) -> str:
    if not re.match(DEVICE_PATTERN, value):
        raise ValueError(f"{value!r} is not a device; expected cpu:0, cuda:N or metal:0")
    return value


DeviceId = Annotated[str, AfterValidator(check_device_id)]
# How a worker stores its KV cache (llm-worker-rbee --kv-cache-type): auto is q8_0 for several
# slots, f16 for one; a model whose heads are not whole q8_0 blocks keeps f16 whatever is asked.
KvCacheType = Literal["auto", "q8_0", "f16"]
# Tokens of context per slot of a worker started without one (llm-worker-rbee --ctx-size), and
# of one whose model's memory is unknown; the queen picks each model's own otherwise
# (`rbee.common.model_memory.default_sizing`).
DEFAULT_CTX_SIZE = 2048

# A keep-alive as Ollama writes it: Go's duration syntax ("10m", "1h30m", "2.5s") or a number
# of seconds; a negative one keeps the model loaded for good.
_DURATION = re.compile(r"(-?)((?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|ms|s|m|h))+)")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: object) -> float:
    """Seconds from a keep-alive (`"10m"`, `"1h30m"`, `300`, `"300"`, `0`); `math.inf` for one
    that keeps the model loaded for good (any negative value, as Ollama). Raises ValueError
    naming what was given."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'a keep-alive is a duration such as "10m" or seconds, not {value!r}')
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            match = _DURATION.fullmatch(text)
            if match is None:
                shown = text if len(text) <= 40 else text[:40] + "…"
                raise ValueError(
                    f'{shown!r} is not a duration; use e.g. "30s", "10m", "1h", a number '
                    "of seconds, 0 (unload when idle) or -1 (keep loaded)"
                ) from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(match[2]))
            number = -seconds if match[1] else seconds
        value = number
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"a keep-alive must be a finite number of seconds, not {value!r}")
    return math.inf if value < 0 else float(value)


def keep_alive_wire(seconds: float) -> float | None:
    """How a keep-alive travels in JSON: seconds, or None for one that never ends (pinned)."""
    return None if math.isinf(seconds) else seconds


def _keep_alive_field(value: object) -> float | None:
    return None if value is None else keep_alive_wire(parse_keep_alive(value))


# A keep-alive field of a request or job: written as a duration or seconds, held as seconds;
# None (unset, or negative) = pinned, never unloaded for idleness.
KeepAliveField = Annotated[float | None, BeforeValidator(_keep_alive_field)]


def is_plain_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None


@lru_cache(maxsize=4096)
def http_url(scheme: str, host: str, port: int) -> str:
    """`scheme://host:port`, an IPv6 address in brackets, as httpx writes it (the router asks
    for a worker's URL on every request, hence the cache)."""
    return str(httpx.URL(scheme=scheme, host=host, port=port))


class WorkerStatus(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"


class WorkerPart(BaseModel):
    """One part of a worker split over several machines: a device it holds part of its model
    on, and the memory given to it there (issue 24)."""

    model_config = ConfigDict(frozen=True)

    hive_id: NonEmptyStr
    device: NonEmptyStr
    bytes: Annotated[int, Field(ge=0)]


class WorkerInfo(BaseModel):
    """One worker process serving one model. Field names follow the TEAM-270 seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: NonEmptyStr
    model_id: NonEmptyStr
    device: NonEmptyStr = "cpu:0"
    port: Port
    status: WorkerStatus
    implementation: NonEmptyStr = "llm-worker-rbee"
    version: NonEmptyStr
    host: NonEmptyStr = "127.0.0.1"
    scheme: Literal["http", "https"] = "http"  # https when the worker serves TLS
    hive_id: NonEmptyStr | None = None
    slots: Annotated[int, Field(ge=1)] = 1
    # Tokens of context per slot (--ctx-size); None from a worker that does not say.
    ctx_size: Annotated[int, Field(ge=1)] | None = None
    in_flight: Annotated[int, Field(ge=0)] = 0
    # Serves `/v1/embeddings` for its model, not chat and completions; the queen routes by it.
    embedding: bool = False
    # Also serves `/v1/rerank`: an embedding worker whose model pools by rank (a reranker).
    rerank: bool = False
    # How long it stays loaded once idle before the queen unloads it (--keep-alive); None:
    # pinned, never unloaded for idleness. Carried here so that a restarted queen knows it.
    keep_alive_s: Annotated[float, Field(ge=0)] | None = None
    # A split worker's parts, on its own hive and on the helpers lending it devices; empty for
    # a worker on one device.
    parts: list[WorkerPart] = Field(default_factory=list)
    # Its process id on its hive's machine: what the hive's stop takes, so that stopping it
    # needs no look through the hive's processes first. None from a worker that does not say.
    pid: Annotated[int, Field(ge=1)] | None = None

    @field_validator("host")
    @classmethod
    def _plain_host(cls, host: str) -> str:
        """A host name or an IP address, nothing more: the queen builds URLs from it."""
        if not is_plain_host(host):
            raise ValueError("must be a host name or an IP address (no port, scheme or path)")
        return host

    @property
    def url(self) -> str:
        return http_url(self.scheme, self.host, self.port)

    @property
    def load(self) -> float:
        return self.in_flight / self.slots


def utc_now() -> datetime:
    return datetime.now(UTC)


# The furthest ahead of the receiver's clock a sent time is taken as it is. Nothing decides by
# it (the queen judges liveness by its own clock at receipt), so a later one, or one that UTC
# cannot hold (9999-12-31T23:59:59-05:00), is replaced by the receiver's time instead of being
# refused: a machine whose clock is off keeps serving.
CLOCK_AHEAD_LIMIT = timedelta(minutes=5)


def plausible_time(sent: datetime) -> datetime:
    """The sent time in UTC, or the receiver's time if the sent one is implausible."""
    now = utc_now()
    try:
        utc = sent.astimezone(UTC)
    except OverflowError:
        return now
    return now if utc - now > CLOCK_AHEAD_LIMIT else utc


# A time from the wire: with its offset, in UTC once received, never far in the future.
WireTime = Annotated[AwareDatetime, AfterValidator(plausible_time)]


class WorkerHeartbeat(BaseModel):
    """Sent by a worker straight to the queen: at start, on every status change, every interval."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    worker: WorkerInfo
    timestamp: WireTime = Field(default_factory=utc_now)

    @field_serializer("timestamp")
    def _rfc3339_utc(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class HeartbeatAck(BaseModel):
    status: Literal["ok", "error"] = "ok"
    message: str = ""


class WorkerView(WorkerInfo):
    """A worker as the queen reports it: the worker's own fields plus the queen's judgement."""

    online: bool
    available: bool
    last_seen_s: float
    timestamp: str
