"""Everything one running worker owns: its engines and slots, its status, its heartbeats.

The app factory builds one of these; routes reach it through `get_runtime`. Loading happens in
the background after the server is up, so `/health` can say "loading" and the queen hears
`starting` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from fastapi import Request

from rbee.common.errors import NotFound, Unavailable, quote
from rbee.common.loops import LoopErrors, supervise
from rbee.contracts.workers import WorkerStatus
from rbee.worker.engines.base import Engine, EngineError, EngineHost, Prepare, SamplingParams
from rbee.worker.generation import Generation, Lease
from rbee.worker.heartbeat import Heartbeater
from rbee.worker.metrics import WorkerMetrics
from rbee.worker.slots import SlotPool
from rbee.worker.state import WorkerStatusBoard

log = logging.getLogger("rbee.worker")
T = TypeVar("T")

# How long an engine that exited waits for the worker's own stop signal before it counts as a
# failure: a signal to the process group (Ctrl-C, systemd's stop) reaches both at once, and
# the engine may exit before the worker has handled its copy.
SIGNAL_SETTLE_S = 1.0
# A cancelled generation stops within a token; one still running this long after is on an
# engine that has stopped answering, and is aborted (well within the hive's stop grace).
ABORT_AFTER_CUT_S = 1.0


class WorkerRuntime:
    def __init__(
        self,
        board: WorkerStatusBoard,
        engine_factory: Callable[[], Engine],
        *,
        queue_size: int,
        shutdown_grace_s: float,
        stop_process: Callable[[], None] | None = None,
        engine_host: EngineHost | None = None,
    ) -> None:
        """`engine_host` runs the model the engines (one per slot) are handles onto."""
        self.board = board
        self.started_at = int(time.time())
        self.identity = board.identity
        self._engine_factory = engine_factory
        self._queue_size = queue_size
        self.shutdown_grace_s = shutdown_grace_s
        self.pool: SlotPool[Engine] | None = None
        self.engines: list[Engine] = []
        self.load_error: str | None = None
        self.heartbeat: Heartbeater | None = None
        self._generations: set[Generation] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_process = stop_process or (lambda: signal.raise_signal(signal.SIGTERM))
        self.metrics = WorkerMetrics(board, lambda: self.pool)
        self.loop_errors = LoopErrors(self.metrics.registry)
        self._host = engine_host
        self._watch: asyncio.Task[None] | None = None
        self._cut_timer: asyncio.TimerHandle | None = None
        self._stop_asked = asyncio.Event()
        self._early_close: asyncio.Task[None] | None = None  # engines freed at the stop signal
        self.settled = asyncio.Event()  # the load ended: ready, or failed (load_error)

    @property
    def model_id(self) -> str:
        return self.identity.model_id

    def bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def load(self) -> None:
        """Start the host, then one engine per slot. A failure is kept for main() to report,
        and stops the process."""
        try:
            await self._load()
        finally:
            self.settled.set()

    async def _load(self) -> None:
        try:
            if self._host is not None:
                await self._host.start()
            for _ in range(self.identity.slots):
                # A handle onto the host, made in the loop its connection will live in.
                self.engines.append(self._engine_factory())
        except Exception as exc:
            # EngineError says what is wrong with the file; anything else is still the load's.
            reason = str(exc) if isinstance(exc, EngineError) else f"cannot load the model: {exc!r}"
            if not isinstance(exc, EngineError):
                log.debug("model load failed", exc_info=True)
            self.load_error = reason
            await self._close_engines()
            self._stop_process()
            return
        if self._host is not None:
            host = self._host
            self._watch = asyncio.create_task(
                supervise("engine-watch", lambda: self._watch_host(host), self.loop_errors),
                name="engine-watch",
            )
            self._serving_context(self.engines[0].context_size if self.engines else None)
        self.pool = SlotPool(list(self.engines), self._queue_size, on_change=self._slots_changed)
        self.board.set_lifecycle(WorkerStatus.READY)
        log.info(
            "model %s ready: %d slot(s) on port %d",
            self.model_id,
            self.identity.slots,
            self.identity.port,
        )

    def _serving_context(self, served: int | None) -> None:
        """What the queen hears is the context each slot really has: llama.cpp gives a slot
        no more than the model was trained on, whatever --ctx-size asked for."""
        asked = self.identity.ctx_size
        if served is None or served == asked:
            return
        if asked is not None and served < asked:
            log.warning(
                "--ctx-size %d is more than %s was trained on: each slot serves %d tokens",
                *(asked, self.model_id, served),
            )
        self.identity = self.board.identity = replace(self.identity, ctx_size=served)

    async def _watch_host(self, host: EngineHost) -> None:
        """A host that dies on its own ends the worker: it cannot serve any more. One that
        exits with the worker's stop (the same signal reached both) is no failure."""
        reason = await host.failure()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_asked.wait(), SIGNAL_SETTLE_S)
        if self._stop_asked.is_set():
            log.debug("%s, as this worker stops", reason)
            return
        log.error("%s; stopping this worker", reason)
        self.load_error = reason
        self._stop_process()
        # A hung server holds its requests until it is gone: they fail now (503), so the queen
        # can send them elsewhere, rather than when the shutdown gets to it.
        await host.close()

    def _slots_changed(self) -> None:
        if self.pool is not None:
            self.board.set_in_flight(self.pool.in_flight)

    # ---- serving ------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise NotFound(
                f"model {quote(model)} is not served here; this worker serves {self.model_id!r}",
                code="model_not_found",
            )

    async def acquire(self) -> Lease:
        if self.board.lifecycle in (WorkerStatus.STOPPING, WorkerStatus.STOPPED):
            raise Unavailable("this worker is shutting down", code="worker_stopping")
        if self.pool is None:
            raise Unavailable("the model is still loading", code="model_loading")
        timer = self.metrics.timer()
        engine = await self.pool.acquire()
        return Lease(self.pool, engine, timer)

    async def start(self, lease: Lease, prepare: Prepare, params: SamplingParams) -> Generation:
        """Prepare the prompt on the leased engine, then generate; returns once the engine took
        the prompt (it may be refused)."""
        generation = Generation(lease, prepare, params, on_end=self._generations.discard)
        self._generations.add(generation)
        try:
            await generation.started()
        except BaseException:
            # A refused prompt: the slot comes back when the task ends, as always.
            generation.cancel()
            raise
        return generation

    async def run(self, lease: Lease, work: Callable[[Engine], Awaitable[T]]) -> T:
        """One call on the leased engine (an embedding), as a task of its own: the slot comes
        back when the call ends, even if the request is cancelled meanwhile."""
        task = asyncio.ensure_future(work(lease.engine))

        def ended(task: asyncio.Future[T]) -> None:
            lease.release()
            if not task.cancelled():
                task.exception()  # seen here, if the request that waited for it is gone

        task.add_done_callback(ended)
        return await asyncio.shield(task)

    # ---- shutdown -----------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Called from the signal handler: stop taking requests and tell the queen at once."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._enter_stopping)

    def _enter_stopping(self) -> None:
        self._stop_asked.set()
        if self.pool is not None:
            self.pool.close()
            if self.pool.idle and not self.pool.waiting and self._early_close is None:
                # Nothing to finish: the engine goes now, beside the server's own shutdown,
                # so its memory is back sooner (a swap waits for it).
                self._early_close = asyncio.get_running_loop().create_task(self._free_engines())
        if self.board.lifecycle not in (WorkerStatus.STOPPING, WorkerStatus.STOPPED):
            self.board.set_lifecycle(WorkerStatus.STOPPING)
            # Answers still running when the grace period is over are cut, each with an error
            # its client can read (the stream's last event), while the server still waits for
            # them to close.
            self._cut_timer = asyncio.get_running_loop().call_later(
                self.shutdown_grace_s, self._cut_running
            )

    def _cut_running(self) -> None:
        """Cancel what still runs, once (the timer and `finish` may both get here)."""
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        running = [g for g in self._generations if not g.cancelled]
        if running:
            log.warning("cancelling %d generation(s) still running", len(running))
            asyncio.get_running_loop().call_later(ABORT_AFTER_CUT_S, self._abort_running)
        for generation in running:
            generation.cancel()

    def _abort_running(self) -> None:
        """Generations the cut did not stop: their engine sends no token (it hangs), so they
        are aborted, freeing their slots, and the worker's stop is not held up by them."""
        stuck = [g for g in self._generations if not g.done]
        if stuck:
            log.warning("aborting %d generation(s) whose engine does not answer", len(stuck))
        for generation in stuck:
            generation.abort()

    async def _free_engines(self) -> None:
        await self._close_engines()
        await self._close_host()

    async def finish(self) -> None:
        """Let running generations end (bounded), cancel the rest, free the engines."""
        self._enter_stopping()
        if self._early_close is not None:
            await self._early_close
            return
        if self.pool is not None and not await self.pool.wait_idle(self.shutdown_grace_s):
            self._cut_running()
            # A cancelled generation stops within a token.
            if not await self.pool.wait_idle(5.0):
                log.error("a generation did not stop; leaving its engine open")
                await self._close_host()
                return
        await self._free_engines()

    async def _close_host(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._host is not None:
            try:
                await self._host.close()
            except Exception:
                log.exception("stopping the engine's host failed")

    async def _close_engines(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                await engine.close()
        self.engines.clear()


async def get_runtime(request: Request) -> WorkerRuntime:
    """Async on purpose: FastAPI runs a plain function dependency in a thread, a hop that every
    request would pay before its first token."""
    runtime: WorkerRuntime = request.app.state.worker
    return runtime
