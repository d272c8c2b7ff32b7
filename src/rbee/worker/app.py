"""The worker's app factory: runtime, heartbeats and routes, built from settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from rbee import __version__
from rbee.common import model_memory
from rbee.common.bundled import BUNDLED_MODELS, bundled_model_path
from rbee.common.cpus import usable_cpus
from rbee.common.gate import install_gate
from rbee.common.gpu import gpu_layers_for, parse_device
from rbee.common.loops import supervise
from rbee.common.metrics import metrics_router
from rbee.common.serve import daemon_app
from rbee.contracts.workers import WorkerPart, WorkerStatus
from rbee.worker.access import WORKER_ACCESS
from rbee.worker.api import openai as openai_api
from rbee.worker.api import passthrough, rerank
from rbee.worker.engines.base import Engine, EngineError, EngineHost
from rbee.worker.engines.llama_process import LlamaServer, ServerConfig
from rbee.worker.engines.llama_server import LlamaServerEngine
from rbee.worker.heartbeat import Heartbeater, queen_session
from rbee.worker.runtime import WorkerRuntime
from rbee.worker.settings import WorkerSettings
from rbee.worker.split import SplitLlamaServer
from rbee.worker.state import Identity, WorkerStatusBoard

log = logging.getLogger("rbee.worker")

FINAL_HEARTBEAT_TIMEOUT_S = 2.0
MAX_HEALTH_WAIT_S = 10.0  # the longest `/health?wait=` holds its answer while the model loads


def resolve_model(ref: str) -> Path:
    """A bundled model's name or a path to a .gguf file → the file. EngineError if neither."""
    if ref in BUNDLED_MODELS:
        path = bundled_model_path(ref)
        if path is None:
            package = BUNDLED_MODELS[ref].package
            raise EngineError(f"bundled model {ref} is not installed (pip package {package})")
        return path
    return Path(ref).expanduser()


def default_model_id(ref: str) -> str:
    return ref if ref in BUNDLED_MODELS else Path(ref).stem


def default_threads() -> int:
    # One per core this process may run on: the hive gives each worker a set of its own, and
    # llama.cpp decodes all slots together, so the slots need no share each.
    return len(usable_cpus())


def identity_from(settings: WorkerSettings) -> Identity:
    return Identity(
        worker_id=settings.worker_id or f"worker-{uuid.uuid4().hex[:12]}",
        model_id=settings.model_id or default_model_id(settings.model),
        device=settings.device,
        host=settings.advertise_host or settings.host,
        port=settings.port,
        scheme=settings.scheme,
        hive_id=settings.hive_id,
        slots=settings.slots,
        embedding=settings.embedding or settings.rerank,
        rerank=settings.rerank,
        keep_alive_s=settings.keep_alive,
        ctx_size=settings.ctx_size,
        parts=tuple(WorkerPart.model_validate(p) for p in json.loads(settings.parts or "[]")),
    )


def kv_cache_type(settings: WorkerSettings) -> str:
    """How this worker stores its KV cache (`--kv-cache-type`; `auto` by the rule placement
    estimates with). main() has already set f16 for a model whose heads q8_0 cannot hold."""
    return model_memory.kv_cache_type(settings.kv_cache_type, settings.slots, quantizable=True)


def llama_server(settings: WorkerSettings, *, pooled: bool = True) -> LlamaServer:
    """`pooled`: the model file names how to pool token vectors into one embedding."""
    config = ServerConfig(
        model=resolve_model(settings.model),
        ctx_size=settings.ctx_size,
        slots=settings.slots,
        threads=settings.threads or default_threads(),
        passive_wait=settings.wait_policy == "passive",
        embedding=settings.embedding or settings.rerank,
        rerank=settings.rerank,
        kv_cache_type=kv_cache_type(settings),
        prompt_cache_mib=settings.prompt_cache >> 20,
        pooled=pooled,
        binary=settings.llama_server,
        gpu_layers=gpu_layers_for(parse_device(settings.device), settings.gpu_layers),
    )
    if settings.rpc_tunnels:
        # A split worker: part of the model on other hives' devices, through rbee's tunnels;
        # --gpu-layers: the layers they hold when its own device is a CPU (default: all).
        if settings.gpu_layers is not None:
            config = replace(config, gpu_layers=settings.gpu_layers)
        return SplitLlamaServer(
            config,
            tunnels=settings.rpc_tunnels.split(","),
            tensor_split=[float(s) for s in (settings.tensor_split or "").split(",") if s],
            token=settings.token or "",
            load_timeout_s=settings.load_timeout,
            stall_timeout_s=settings.stall_timeout,
        )
    return LlamaServer(
        config, load_timeout_s=settings.load_timeout, stall_timeout_s=settings.stall_timeout
    )


def create_app(
    settings: WorkerSettings,
    *,
    engine_factory: Callable[[], Engine] | None = None,
    engine_host: EngineHost | None = None,
    stop_process: Callable[[], None] | None = None,
) -> FastAPI:
    """`engine_factory` makes one engine per slot, handles onto `engine_host` if there is one;
    by default llama.cpp's server and its handles. Tests pass a fake engine."""
    if engine_factory is None:
        server = engine_host = llama_server(settings)

        def engine_factory() -> Engine:
            return LlamaServerEngine(server)

    board = WorkerStatusBoard(identity_from(settings))
    runtime = WorkerRuntime(
        board,
        engine_factory,
        queue_size=settings.queue_size,
        shutdown_grace_s=settings.shutdown_grace,
        stop_process=stop_process,
        engine_host=engine_host,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.bind_loop()
        async with queen_session() as session:
            heartbeat = Heartbeater(
                session,
                settings.queen_url,
                board.info,
                interval_s=settings.heartbeat_interval,
                token=settings.token,
            )
            runtime.heartbeat = heartbeat
            board.set_on_change(heartbeat.notify)
            # The load first: llama-server starts before the first heartbeat is made and sent.
            loading = asyncio.create_task(runtime.load(), name="load-model")
            beating = asyncio.create_task(
                supervise("heartbeat", heartbeat.run, runtime.loop_errors), name="heartbeat"
            )
            try:
                yield
            finally:
                await _shut_down(runtime, heartbeat, beating, loading)

    app = daemon_app("llm-worker-rbee", settings, lifespan)
    app.state.worker = runtime

    @app.get("/health", response_model=None)
    async def health(wait: Annotated[float, Query(ge=0, le=MAX_HEALTH_WAIT_S)] = 0) -> JSONResponse:
        """`wait`: while the model loads, answer once it is loaded (or failed), or after this
        many seconds: whoever waits for it (the hive starting it) hears at once, asking once."""
        if wait and board.status is WorkerStatus.STARTING:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await runtime.settled.wait()
        if runtime.load_error is not None:
            # Its engine died or hung: the worker is on its way out and says why.
            return JSONResponse(
                {"status": "unhealthy", "reason": runtime.load_error}, status_code=503
            )
        status = board.status
        if status is WorkerStatus.STARTING:
            return JSONResponse({"status": "loading"}, status_code=503)
        if status in (WorkerStatus.STOPPING, WorkerStatus.STOPPED):
            return JSONResponse({"status": status.value}, status_code=503)
        body: dict[str, Any] = {
            "status": "ok",
            "state": status.value,
            "worker_id": runtime.identity.worker_id,
            "model": runtime.model_id,
            "slots": runtime.identity.slots,
            "ctx_size": runtime.identity.ctx_size,
            "in_flight": board.in_flight,
            "waiting": runtime.pool.waiting if runtime.pool else 0,
            "version": __version__,
            "tool_calls": passthrough.tool_method(runtime),  # native (the template's) or grammar
        }
        return JSONResponse(body)

    app.include_router(openai_api.router)
    app.include_router(passthrough.router)  # Anthropic Messages, OpenAI Responses
    app.include_router(rerank.router)  # /v1/rerank, on a worker of a reranker model
    app.include_router(metrics_router(runtime.metrics.registry))
    install_gate(app, WORKER_ACCESS, token=settings.token, allowed_hosts=settings.allowed_host)
    return app


async def _shut_down(
    runtime: WorkerRuntime,
    heartbeat: Heartbeater,
    beating: asyncio.Task[None],
    loading: asyncio.Task[None],
) -> None:
    if not loading.done():
        # A model still loading is not waited for: the host's close stops it.
        loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    await runtime.finish()
    heartbeat.close()
    try:
        await asyncio.wait_for(beating, FINAL_HEARTBEAT_TIMEOUT_S)
    except TimeoutError:
        log.warning("the last heartbeat before shutdown did not finish in time")
    runtime.board.set_lifecycle(WorkerStatus.STOPPED)
    told = await heartbeat.send(runtime.board.info(), timeout_s=FINAL_HEARTBEAT_TIMEOUT_S)
    if runtime.load_error is None:
        # One line for a stop that was asked for; a failure is main()'s error line instead.
        log.info("stopped%s", " (the queen was told)" if told else "")
