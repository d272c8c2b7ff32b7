"""The bridge between a blocking engine and the event loop.

A generation runs in a thread of its own and hands each piece of text to the loop as it is
made, so the loop stays free for `/health` and other requests. Its slot is given back when the
thread ends — not when the client goes away — so a slot is never handed out while its engine
is still busy. A client that leaves sets the cancel flag, which the engine checks every token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from rbee.common.errors import BadRequest, RbeeError, Unavailable
from rbee.worker.engines.base import Engine, Outcome, Prompt, PromptError, SamplingParams, Scored
from rbee.worker.slots import SlotPool

if TYPE_CHECKING:
    from rbee.worker.metrics import TokenTimer

log = logging.getLogger("rbee.worker")
_END = object()
_PREPARED = object()


class Lease:
    """One slot, held by one request until its generation ends."""

    def __init__(
        self,
        pool: SlotPool[Engine],
        engine: Engine,
        executor: Executor,
        timer: TokenTimer | None = None,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.executor = executor
        self.timer = timer  # started before the slot was taken
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool.release(self.engine)


# A piece of text and the scores of the tokens it completes (empty unless logprobs were asked).
Piece = tuple[str, Sequence[Scored]]


class Generation:
    """Starts at once on construction; await `started()`, iterate `pieces()`, read `outcome`.

    Preparing the prompt and generating run in one thread job: a second hop between threads
    would add to every request's time to first token.
    """

    def __init__(
        self,
        lease: Lease,
        prepare: Callable[[Engine], Prompt],
        params: SamplingParams,
        on_end: Callable[[Generation], None] = lambda _: None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.outcome: Outcome | None = None
        self._lease = lease
        self._on_end = on_end
        engine = lease.engine

        def work() -> Outcome:
            prompt = prepare(engine)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _PREPARED)
            return engine.generate(prompt, params, self._emit, self._cancelled)

        self._future = self._loop.run_in_executor(lease.executor, work)
        # Runs on the loop after every piece the thread emitted, as both travel the same way.
        self._future.add_done_callback(self._ended)

    def _emit(self, text: str, scored: Sequence[Scored] = ()) -> None:
        if self._lease.timer is not None:
            self._lease.timer.piece()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (text, tuple(scored)))

    def _ended(self, future: asyncio.Future[Outcome]) -> None:
        if self._lease.timer is not None:
            failed = future.cancelled() or future.exception() is not None
            self._lease.timer.ended(None if failed else future.result())
        self._lease.release()
        self._queue.put_nowait(_END)
        self._on_end(self)

    async def started(self) -> None:
        """Wait until the prompt was accepted; raises what `prepare` raised (e.g. PromptError)."""
        if await self._queue.get() is _END:
            self._future.result()
            raise RuntimeError("generation ended before its prompt was prepared")

    @property
    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        self._cancelled.set()

    async def pieces(self) -> AsyncIterator[Piece]:
        try:
            while (item := await self._queue.get()) is not _END:
                assert isinstance(item, tuple)
                yield item
            try:
                self.outcome = self._future.result()
            except PromptError as exc:
                # Refused by the engine once generating began (a JSON schema its grammar
                # cannot express): the request's fault, not the worker's.
                raise BadRequest(exc.message, code=exc.code, param=exc.param) from None
            except Exception as exc:
                log.exception("generation failed")
                raise RbeeError(f"generation failed: {exc}", code="generation_failed") from None
        finally:
            if not self._future.done():
                self._cancelled.set()

    async def whole(self) -> tuple[str, list[Scored]]:
        """The whole text, and the scores of all its tokens (when asked for)."""
        texts: list[str] = []
        scored: list[Scored] = []
        async for text, scores in self.pieces():
            texts.append(text)
            scored.extend(scores)
        if self.outcome is not None and self.outcome.cancelled:
            raise Unavailable(
                "the worker shut down before the answer was complete", code="worker_stopping"
            )
        return "".join(texts), scored
