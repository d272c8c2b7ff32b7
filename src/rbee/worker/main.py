"""`llm-worker-rbee`: the daemon's entry point."""

from __future__ import annotations

import math
import os
import sys

from rbee.common.serve import fail, parse_settings, serve
from rbee.common.tokens import refuse_open_bind
from rbee.worker.app import create_app, llama_engine_factory, resolve_model
from rbee.worker.engines.base import EngineError
from rbee.worker.runtime import WorkerRuntime
from rbee.worker.settings import WorkerSettings

PROG = "llm-worker-rbee"


def main(argv: list[str] | None = None) -> None:
    # llama.cpp's OpenMP threads spin while they wait by default. With two workers on one
    # machine the spinning threads starve each other: measured 3 tokens/s each instead of 30.
    # Must be set before llama.cpp (and its OpenMP runtime) is loaded.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The event loop and the generation threads pass the GIL back and forth at every token;
    # Python's default 5 ms switch interval can make the loop wait that long for it.
    sys.setswitchinterval(0.0005)
    settings = parse_settings(WorkerSettings, PROG, argv)
    if reason := refuse_open_bind(settings.host, settings.token):
        fail(PROG, reason)
    try:
        # A missing or obviously wrong file is reported before anything starts; deeper damage
        # shows when llama.cpp loads the weights, after the server is up (WorkerRuntime.load).
        from rbee.worker.engines.llama_cpp import read_model_facts

        facts = read_model_facts(resolve_model(settings.model))
    except EngineError as exc:
        fail(PROG, str(exc))
    if facts.embedding_model and not settings.embedding:
        # The file says it makes embeddings (an encoder, or a pooling of its own).
        settings = settings.model_copy(update={"embedding": True})
    app = create_app(
        settings, engine_factory=llama_engine_factory(settings, pooled=facts.pooling is not None)
    )
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
