"""llm-worker-rbee's one settings object: flags, `RBEE_WORKER_*` environment, and `RBEE_TOKEN`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import CliImplicitFlag, SettingsConfigDict

from rbee.common.cpus import format_cpu_set, parse_cpu_set
from rbee.common.settings import DaemonSettings, HttpUrl, Seconds
from rbee.common.sizes import ByteSizeOrZero
from rbee.contracts.workers import DEFAULT_CTX_SIZE, DeviceId, KeepAliveField, KvCacheType
from rbee.worker.engines.llama_process import default_binary


class WorkerSettings(DaemonSettings):
    model_config = SettingsConfigDict(
        env_prefix="RBEE_WORKER_", cli_kebab_case=True, cli_prog_name="llm-worker-rbee"
    )

    model: str = Field(
        min_length=1, description="path to a .gguf file, or the name of a bundled model"
    )
    port: int = Field(ge=1, le=65535, description="port to listen on")
    queen_url: HttpUrl = Field(
        min_length=1, description="where to send heartbeats, e.g. http://127.0.0.1:7833"
    )
    worker_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="this worker's id (default: made up, unique)",
    )
    model_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="the model name clients ask for (default: the bundled name or the file's stem)",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    advertise_host: str | None = Field(
        None, description="address the queen should use to reach this worker (default: --host)"
    )
    hive_id: str | None = Field(None, min_length=1, description="the hive that started this worker")
    device: DeviceId = Field(
        "cpu:0",
        description="device the model runs on: cpu:0, cuda:N (NVIDIA GPU N, as nvidia-smi numbers "
        "them) or metal:0",
    )
    gpu_layers: int | None = Field(
        None,
        ge=0,
        description="layers to offload to the GPU (default: all of them; fewer for a model too "
        "big for the card)",
    )
    slots: int = Field(1, ge=1, le=64, description="requests generated at the same time")
    queue_size: int = Field(
        8, ge=0, description="requests that may wait for a slot; more are answered 429"
    )
    embedding: CliImplicitFlag[bool] = Field(
        False,
        description="serve POST /v1/embeddings instead of chat and completions (a model whose "
        "file says it is an embedding model is served so without this flag)",
    )
    rerank: CliImplicitFlag[bool] = Field(
        False,
        description="serve POST /v1/rerank (llama-server --reranking; implies --embedding). A "
        "model whose file says it is a reranker (pooling type rank) is served so without this "
        "flag",
    )
    ctx_size: int = Field(DEFAULT_CTX_SIZE, ge=16, description="context window per slot, in tokens")
    kv_cache_type: KvCacheType = Field(
        "auto",
        description="how the KV cache stores each slot's context: q8_0 (half the memory of f16, "
        "so more slots fit; a few percent slower), f16, or auto: q8_0 with several slots, f16 "
        "with one",
    )
    prompt_cache: ByteSizeOrZero = Field(
        0,
        description="RAM where llama.cpp keeps prompts it served after their slot moved on, so "
        "a conversation that comes back is restored, not read again (e.g. 256MiB; whole MiB; "
        "0: none). The queen starts each worker with as much as its KV cache",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads (default: one per core this worker may run on)",
    )
    cpu_set: str | None = Field(
        None,
        description="cores this worker and its engine run on, e.g. 0-3 or 0,2 (default: any)",
    )
    wait_policy: Literal["active", "passive"] = Field(
        "active",
        description="how idle engine threads wait: active (fastest; for cores of its own) "
        "or passive (sleep; for cores shared with other busy work)",
    )
    llama_server: str = Field(
        default_factory=default_binary, description="llama.cpp's llama-server executable"
    )
    load_timeout: Seconds = Field(300.0, description="longest the model may take to load")
    stall_timeout: Seconds = Field(
        180.0,
        description="longest llama.cpp's server may leave the worker's check (every few "
        "seconds) unanswered before the worker counts it as hung and stops, so the queen "
        "sends its requests elsewhere",
    )
    heartbeat_interval: Seconds = Field(30.0, description="seconds between heartbeats to the queen")
    keep_alive: KeepAliveField = Field(
        None,
        description="how long this worker may stay idle before the queen unloads it (a "
        "duration such as 5m, or seconds; reported in its heartbeat); unset: pinned",
    )
    shutdown_grace: Seconds = Field(
        5.0, description="how long running requests may finish after SIGTERM"
    )
    rpc_tunnels: str | None = Field(
        None,
        description="a split worker's RPC servers on other hives, comma-separated, each "
        "rbee[+tls]://HOST:PORT/NAME (reached through rbee's tunnel with the cluster token)",
    )
    tensor_split: str | None = Field(
        None, description="a split worker's share of the model per device (llama.cpp's)"
    )
    parts: str | None = Field(
        None, description='a split worker\'s parts, as JSON: [{"hive_id", "device", "bytes"}]'
    )

    @field_validator("cpu_set")
    @classmethod
    def _cpu_set(cls, value: str | None) -> str | None:
        return None if value is None else format_cpu_set(parse_cpu_set(value))
