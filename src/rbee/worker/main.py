"""`llm-worker-rbee`: the daemon's entry point."""

from __future__ import annotations

import math
import os
import sys

from rbee.common.cpus import parse_cpu_set
from rbee.common.serve import fail, parse_settings, serve
from rbee.common.tokens import refuse_open_bind
from rbee.worker.app import create_app, llama_server, resolve_model
from rbee.worker.device import prepare_device
from rbee.worker.engines.base import EngineError
from rbee.worker.engines.gguf import read_model_facts
from rbee.worker.engines.llama_server import LlamaServerEngine
from rbee.worker.runtime import WorkerRuntime
from rbee.worker.settings import WorkerSettings

PROG = "llm-worker-rbee"


def pin(cpu_set: str) -> None:
    """Run on these cores only; the engine's process, started later, inherits them."""
    if not hasattr(os, "sched_setaffinity"):
        fail(PROG, "--cpu-set: this system cannot pin a process to cores")
    try:
        os.sched_setaffinity(0, parse_cpu_set(cpu_set))
    except OSError as exc:
        fail(PROG, f"--cpu-set {cpu_set}: {exc.strerror or exc}")


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(WorkerSettings, PROG, argv)
    if reason := refuse_open_bind(settings.host, settings.token):
        fail(PROG, reason)
    # A split worker's --gpu-layers are the layers on its RPC servers, also from a CPU.
    gpu_layers = None if settings.rpc_tunnels else settings.gpu_layers
    if reason := prepare_device(settings.device, gpu_layers, llama_server=settings.llama_server):
        fail(PROG, reason)
    try:
        # A missing or obviously wrong file is reported before anything starts; deeper damage
        # shows when llama.cpp loads the weights, after the server is up (WorkerRuntime.load).
        facts = read_model_facts(resolve_model(settings.model))
    except EngineError as exc:
        fail(PROG, str(exc))
    if facts.reranker and not settings.rerank:
        # The file pools by rank: a reranker, served on /v1/rerank (an embedding worker too).
        settings = settings.model_copy(update={"rerank": True})
    if facts.embedding_model and not settings.embedding:
        # The file says it makes embeddings (an encoder, or a pooling of its own).
        settings = settings.model_copy(update={"embedding": True})
    if not facts.quantizable_kv:
        # Its attention heads are not whole blocks of q8_0: llama.cpp would refuse to load it.
        settings = settings.model_copy(update={"kv_cache_type": "f16"})
    if settings.cpu_set is not None:
        pin(settings.cpu_set)
    server = llama_server(settings, pooled=facts.pooling is not None)
    app = create_app(settings, engine_factory=lambda: LlamaServerEngine(server), engine_host=server)
    runtime: WorkerRuntime = app.state.worker
    code = serve(
        app,
        prog=PROG,
        host=settings.host,
        port=settings.port,
        # uvicorn's own deadline sits past ours, so ours decides and cleanup still runs.
        graceful_s=math.ceil(settings.shutdown_grace) + 2,
        on_signal=runtime.begin_shutdown,
        tls=settings.tls,
    )
    if runtime.load_error is not None:
        fail(PROG, runtime.load_error)
    sys.exit(code)
