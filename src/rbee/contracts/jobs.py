"""The jobs API shared by queen and hive: long operations with SSE progress."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rbee.contracts.workers import DeviceId, KeepAliveField, KvCacheType, NonEmptyStr

CtxSize = Annotated[int, Field(ge=16, le=1 << 20)]


class ModelDownloadJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: Literal["model_download"]
    model: NonEmptyStr
    hive_id: NonEmptyStr | None = None


class WorkerSpawnJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: Literal["worker_spawn"]
    model: NonEmptyStr
    hive_id: NonEmptyStr | None = None
    device: DeviceId | None = None
    slots: Annotated[int, Field(ge=1, le=64)] | None = Field(
        None, description="requests served at once (default: 2 where memory allows, else 1)"
    )
    ctx_size: CtxSize | None = Field(
        None,
        description="tokens of context per slot (default: the model's trained context, up to "
        "8192 on a CPU and 32768 on a GPU, as far as the device's memory allows)",
    )
    # True: serve `/v1/embeddings`. Unset: as the model file says (embedding models embed).
    embedding: bool | None = None
    # True: serve `/v1/rerank` (llama.cpp's --reranking). Unset: as the model file says.
    rerank: bool | None = None
    cores: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None, description="CPU cores of its own (default: the hive's even share of its free ones)"
    )
    gpu_layers: Annotated[int, Field(ge=0)] | None = None
    kv_cache_type: KvCacheType = Field(
        "auto", description="how the worker stores its KV cache: auto, q8_0 or f16"
    )
    keep_alive: KeepAliveField = Field(
        None,
        description="how long it may stay idle before the queen unloads it: a duration such as "
        '"10m", or seconds; unset or negative: pinned (never unloaded for idleness)',
    )


class WorkerStopJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: Literal["worker_stop"]
    worker_id: NonEmptyStr


class ModelListJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: Literal["model_list"]
    hive_id: NonEmptyStr | None = None


class ModelDeleteJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: Literal["model_delete"]
    model: NonEmptyStr
    hive_id: NonEmptyStr | None = None


class ModelLoadJob(BaseModel):
    """Start a worker for a model where the queen would start one on demand (`rbee load`)."""

    model_config = ConfigDict(extra="forbid")

    operation: Literal["model_load"]
    model: NonEmptyStr
    hive_id: NonEmptyStr | None = None
    slots: Annotated[int, Field(ge=1, le=64)] | None = Field(
        None, description="requests served at once (default: the queen's for the model)"
    )
    ctx_size: CtxSize | None = Field(
        None, description="tokens of context per slot (default: the queen's for the model)"
    )
    keep_alive: KeepAliveField = Field(
        None,
        description="how long it may stay idle before the queen unloads it; unset or "
        "negative: pinned, as every worker started by hand",
    )


class ModelUnloadJob(BaseModel):
    """Stop a model's workers (`rbee unload`): no new request goes to them, those in flight
    finish (`now`: are cut, each client gets a 503 `worker_stopping`), then they stop."""

    model_config = ConfigDict(extra="forbid")

    operation: Literal["model_unload"]
    model: NonEmptyStr
    now: bool = False


JobRequest = Annotated[
    ModelDownloadJob
    | WorkerSpawnJob
    | WorkerStopJob
    | ModelListJob
    | ModelDeleteJob
    | ModelLoadJob
    | ModelUnloadJob,
    Field(discriminator="operation"),
]


class JobCreated(BaseModel):
    job_id: str
    sse_url: str


class JobEvent(BaseModel):
    """One SSE event of a job. `type` is `progress`, `log`, `done` (final) or `error` (final)."""

    type: Literal["progress", "log", "done", "error"]
    message: str = ""
    bytes_done: int | None = None
    bytes_total: int | None = None
    result: dict[str, Any] | None = None
    code: str | None = Field(None, description="why an `error` event ended the job, e.g. cancelled")
    details: dict[str, Any] | None = Field(
        None,
        description="an `error`'s fields for programs, as in the HTTP error body: e.g. "
        "needed_bytes and largest_free_bytes of insufficient_memory",
    )

    @property
    def final(self) -> bool:
        return self.type in ("done", "error")


class JobInfo(BaseModel):
    """Where a job stands; what `DELETE /v1/jobs/{id}` answers."""

    job_id: str
    operation: str
    status: Literal["running", "done", "error", "cancelled"]
    last_event: JobEvent | None = Field(None, description="the latest event, e.g. progress")
