"""Requests and answers of the hive's HTTP API (spawn, processes, catalog)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from rbee.contracts.hives import Device
from rbee.contracts.workers import (
    DEFAULT_CTX_SIZE,
    DeviceId,
    KeepAliveField,
    KvCacheType,
    NonEmptyStr,
    Port,
    WorkerPart,
)


class SpawnRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: NonEmptyStr
    device: DeviceId = "cpu:0"
    slots: Annotated[int, Field(ge=1, le=64)] = 1
    ctx_size: Annotated[int, Field(ge=16)] = DEFAULT_CTX_SIZE
    gpu_layers: Annotated[int, Field(ge=0)] | None = Field(
        None, description="layers to offload to a GPU device (default: all)"
    )
    worker_id: NonEmptyStr | None = None
    # Start it for `/v1/embeddings` (llm-worker-rbee --embedding).
    embedding: bool = False
    # Start it for `/v1/rerank` (llm-worker-rbee --rerank); a reranker is an embedding worker.
    rerank: bool = False
    cores: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None, description="CPU cores of its own (default: an even share of the free ones)"
    )
    kv_cache_type: KvCacheType = Field(
        "auto", description="how it stores its KV cache (llm-worker-rbee --kv-cache-type)"
    )
    prompt_cache_bytes: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="RAM for llama-server's copies of prompts it served (llm-worker-rbee "
        "--prompt-cache); unset: the worker's default, none",
    )
    keep_alive_s: KeepAliveField = Field(
        None,
        description="seconds it may stay idle before the queen unloads it (llm-worker-rbee "
        "--keep-alive); unset: pinned",
    )
    load_timeout_s: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="longest the model may take to load (the queen's deadline for its size); "
        "unset: the hive's --spawn-timeout",
    )
    rpc_tunnels: list[NonEmptyStr] = Field(
        default_factory=list,
        description="a split worker's RPC servers on helper hives (their `endpoint`s), in "
        "`tensor_split` order",
    )
    tensor_split: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=list,
        description="a split worker's share of the model per device: the RPC servers' first, "
        "then this hive's GPUs (llama.cpp's --tensor-split)",
    )
    parts: list[WorkerPart] = Field(
        default_factory=list, description="a split worker's parts, for its heartbeats"
    )


class SpawnResponse(BaseModel):
    worker_id: str
    pid: int
    port: Port
    url: str
    cpu_set: str | None = Field(None, description="the cores it runs on, e.g. 0-3")
    shared_cores: bool = Field(False, description="its cores are other workers' too")


class WorkerProcess(BaseModel):
    """A worker process found on the hive's machine by asking the operating system."""

    pid: int
    worker_id: str
    model: str
    port: int
    uptime_s: float
    memory_bytes: int = Field(description="resident memory, its engine process included")
    cpu_set: str | None = None


class WorkerProcessList(BaseModel):
    workers: list[WorkerProcess]


class CatalogModel(BaseModel):
    id: str
    name: str
    path: str
    size_bytes: int
    format: str
    source: str


class CatalogList(BaseModel):
    models: list[CatalogModel]


class Capabilities(BaseModel):
    """`GET /v1/capabilities`: what this hive's machine can compute with."""

    hive_id: str
    devices: list[Device]


class WorkerStopped(BaseModel):
    """`POST /v1/workers/{pid}/stop`: which signal ended the worker."""

    pid: int
    worker_id: str
    signal: Literal["SIGTERM", "SIGKILL"]
    exit_code: int | None = None
    # What it held (resident memory, its engine's included) when the hive stopped it: free
    # again now that it has exited. The queen counts it free until the hive's next heartbeat.
    memory_bytes: int | None = None


class ModelDeleted(BaseModel):
    """`DELETE /v1/models/{id}`: the catalog entry that was removed."""

    deleted: CatalogModel
