"""`llm-worker-rbee`: the daemon's entry point.

`llm-worker-rbee --standby …` is the hive's standby (`rbee.worker.standby`): it imports what a
worker runs on once, then forks a worker per order of its hive. What it imports is imported in
`serve_worker`, not when this module is, so that a standby can import it in a thread of its own.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys
import threading
from typing import NoReturn

PROG = "llm-worker-rbee"
STANDBY = "--standby"
# Everything `serve_worker` runs on, with what serving imports only once it starts (uvicorn
# picks its loop and protocols then, a chat renders a template): a standby's imports.
WORKER_MODULES = (
    "rbee.worker.app",
    "rbee.worker.runtime",
    "rbee.worker.device",
    "rbee.worker.engines.gguf",
    "rbee.worker.engines.llama_server",
    "rbee.common.serve",
    "uvloop",
    "httptools",
    "uvicorn.loops.uvloop",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
    "jinja2.ext",
    "encodings.idna",
    "concurrent.futures.thread",
)


def _fail(message: str) -> NoReturn:
    from rbee.common.serve import fail

    fail(PROG, message)


def pin(cpu_set: str) -> None:
    """Run on these cores only; the engine's process, started later, inherits them."""
    from rbee.common.cpus import parse_cpu_set

    if not hasattr(os, "sched_setaffinity"):
        _fail("--cpu-set: this system cannot pin a process to cores")
    try:
        os.sched_setaffinity(0, parse_cpu_set(cpu_set))
    except OSError as exc:
        _fail(f"--cpu-set {cpu_set}: {exc.strerror or exc}")


def import_worker() -> None:
    for name in WORKER_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _import_ahead() -> None:
    """A standby's imports (`rbee.worker.standby`), and what a worker makes before it serves."""
    import_worker()
    with contextlib.suppress(ImportError):
        from rbee.common.children import pdeathsig_prefix
        from rbee.common.serve import flags_parser
        from rbee.common.tls import client_context
        from rbee.worker.settings import WorkerSettings

        # Made ahead too: parsing the flags handed is then quick, and the client to the queen
        # has its TLS context (the hive hands a worker no CA setting of its own: the same one).
        flags_parser(WorkerSettings)
        client_context()
        pdeathsig_prefix()  # how its llama-server dies with it: asked once, for every fork
    # What is imported lives as long as the process: frozen now, the collection `serve` makes
    # before it starts (freezing it too) has next to nothing left to walk, and the forks share
    # these pages with the standby instead of copying them.
    gc.collect()
    gc.freeze()


def _read_ahead(argv: list[str]) -> None:
    """In the standby, before it forks a worker: the facts of its model file, read once and
    kept for every worker after (`read_model_facts`)."""
    from rbee.common.worker_command import parse_flags
    from rbee.worker.app import resolve_model
    from rbee.worker.engines.gguf import read_model_facts

    # Whatever is wrong with the file, the worker says it, in its log.
    with contextlib.suppress(Exception):
        read_model_facts(resolve_model(parse_flags(argv).get("--model", "")))


def _low_priority_imports() -> None:
    from rbee.worker.standby import IMPORTS_NICE, renice

    renice(threading.current_thread(), IMPORTS_NICE)
    _import_ahead()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [STANDBY]:
        from rbee.worker.standby import serve_orders

        handed = serve_orders(_low_priority_imports, _read_ahead)
        if handed is None:
            os._exit(0)  # the standby ends: no cleanup to wait for (its imports may still run)
        import_worker()  # whatever the standby could not import says why now, in the log
        args = handed
    serve_worker(args)


def serve_worker(args: list[str]) -> None:
    import math

    from rbee.common.serve import parse_settings, serve
    from rbee.common.tokens import refuse_open_bind
    from rbee.worker.app import create_app, llama_server, resolve_model
    from rbee.worker.device import prepare_device
    from rbee.worker.engines.base import EngineError
    from rbee.worker.engines.gguf import read_model_facts
    from rbee.worker.engines.llama_server import LlamaServerEngine
    from rbee.worker.runtime import WorkerRuntime
    from rbee.worker.settings import WorkerSettings

    settings = parse_settings(WorkerSettings, PROG, args)
    if reason := refuse_open_bind(settings.host, settings.token):
        _fail(reason)
    # A split worker's --gpu-layers are the layers on its RPC servers, also from a CPU.
    gpu_layers = None if settings.rpc_tunnels else settings.gpu_layers
    if reason := prepare_device(settings.device, gpu_layers, llama_server=settings.llama_server):
        _fail(reason)
    try:
        # A missing or obviously wrong file is reported before anything starts; deeper damage
        # shows when llama.cpp loads the weights, after the server is up (WorkerRuntime.load).
        facts = read_model_facts(resolve_model(settings.model))
    except EngineError as exc:
        _fail(str(exc))
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
    # Its model loads from now on, while the worker builds its app and starts serving: a swap
    # waits for the load, not for both one after the other.
    server.launch()
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
        _fail(runtime.load_error)
    # Nothing is left to clean up (the server, its engine and the heartbeats ended in serve):
    # the interpreter's teardown of every module would only make a stop (a swap) wait longer.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
