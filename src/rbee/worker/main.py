"""`llm-worker-rbee`: the daemon's entry point.

`llm-worker-rbee --standby …` is a worker started ahead of need by its hive (`rbee.hive.standby`):
it imports what a worker runs on while it waits on its stdin for the flags of the worker it is
to be. What it imports is imported in `serve_worker`, not when this module is: a standby imports
it in a thread of low priority (a model loading or a request generating meanwhile keeps the
cores: llama.cpp's threads lose much of their speed to any busy process) while its main thread
reads the pipe, so the end of the pipe ends it at once. Flags handed to it before its imports are
done wait for the rest of them, at the normal priority again where the system lets a process
raise its own (root, CAP_SYS_NICE or RLIMIT_NICE).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
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


STANDBY_NICE = 10  # the import thread's, while nothing waits for it
STANDING_BY = b"standby\n"


def _renice(thread: threading.Thread, nice: int) -> None:
    # Linux gives each thread a niceness of its own: the worker's other threads keep theirs.
    if sys.platform == "linux" and thread.native_id is not None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread.native_id, nice)


def _import_ahead() -> None:
    _renice(threading.current_thread(), STANDBY_NICE)
    import_worker()
    with contextlib.suppress(ImportError):
        from rbee.common.serve import flags_parser
        from rbee.common.tls import client_context
        from rbee.worker.settings import WorkerSettings

        # Made ahead too: parsing the flags handed is then quick, and the client to the queen
        # has its TLS context (the hive hands a worker no CA setting of its own: the same one).
        flags_parser(WorkerSettings)
        client_context()
    # What is imported lives as long as the process: frozen now, the collection `serve` makes
    # before it starts (freezing it too) has next to nothing left to walk.
    gc.collect()
    gc.freeze()


def standby() -> list[str] | None:
    """Wait, importing meanwhile, for the hive to say what to serve: one JSON line on stdin
    with `argv` (a worker's flags), `env` (added to the environment: the device's, before
    llama-server starts) and `log` (where the output goes from then on). End of file (the hive
    stopped, however it stopped) ends the standby: returns None. Once handed its flags it no
    longer reads the pipe, and outlives its hive like any worker."""
    # Tells the hive a standby listens (a command that is not one never says it, and is never
    # handed a worker); stdout is the hive's pipe until the worker's log replaces it.
    with contextlib.suppress(OSError):
        os.write(1, STANDING_BY)
    imports = threading.Thread(target=_import_ahead, name="standby-imports", daemon=True)
    imports.start()
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return None
    order = json.loads(line)
    argv = [str(arg) for arg in order["argv"]]
    os.environ.update({str(k): str(v) for k, v in order.get("env", {}).items()})
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, target in ((0, null), (1, log), (2, log)):
        os.dup2(target, fd)
    os.close(log)
    os.close(null)
    _renice(imports, 0)  # a worker waits for it now
    imports.join()
    import_worker()  # whatever the thread could not import says why now, in the log
    return argv


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [STANDBY]:
        handed = standby()
        if handed is None:
            os._exit(0)  # nothing started: no cleanup to wait for (its imports may still run)
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
