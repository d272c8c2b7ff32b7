"""A running generation: the engine's work as a task of its own, its text handed on piece by
piece as it is made.

Its slot is given back when the task ends — not when the client goes away — so a slot is never
handed out while its engine is still busy. A client that leaves sets the cancel flag, which the
engine checks every token (and then closes its request, which stops llama.cpp generating).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from rbee.common.errors import BadRequest, RbeeError, Unavailable
from rbee.worker.engines.base import Engine, Outcome, Prepare, PromptError, SamplingParams, Scored
from rbee.worker.slots import SlotPool

if TYPE_CHECKING:
    from rbee.worker.metrics import TokenTimer

log = logging.getLogger("rbee.worker")
_END = object()
_ACCEPTED = object()


class Lease:
    """One slot, held by one request until its generation ends."""

    def __init__(
        self,
        pool: SlotPool[Engine],
        engine: Engine,
        timer: TokenTimer | None = None,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.timer = timer  # started before the slot was taken
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool.release(self.engine)


# A piece of text and the scores of the tokens it completes (empty unless logprobs were asked).
Piece = tuple[str, Sequence[Scored]]


class Generation:
    """Starts at once on construction; await `started()`, iterate `pieces()`, read `outcome`."""

    def __init__(
        self,
        lease: Lease,
        prepare: Prepare,
        params: SamplingParams,
        on_end: Callable[[Generation], None] = lambda _: None,
    ) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._cancelled = asyncio.Event()
        self.outcome: Outcome | None = None
        self._lease = lease
        self._on_end = on_end
        engine = lease.engine

        async def work() -> Outcome:
            prompt = await prepare(engine)
            return await engine.generate(
                prompt, params, self._emit, self._cancelled, self._accepted
            )

        self._task = asyncio.get_running_loop().create_task(work(), name="generation")
        self._task.add_done_callback(self._ended)

    def _accepted(self) -> None:
        self._queue.put_nowait(_ACCEPTED)

    def _emit(self, text: str, scored: Sequence[Scored] = ()) -> None:
        if self._lease.timer is not None:
            self._lease.timer.piece()
        self._queue.put_nowait((text, tuple(scored)))

    def _ended(self, task: asyncio.Task[Outcome]) -> None:
        if self._lease.timer is not None:
            failed = task.cancelled() or task.exception() is not None
            self._lease.timer.ended(None if failed else task.result())
        self._lease.release()
        self._queue.put_nowait(_END)
        self._on_end(self)

    async def started(self) -> None:
        """Wait until the engine took the prompt; raises what it raised instead (e.g.
        PromptError for a prompt that does not fit)."""
        if await self._queue.get() is _END:
            if self._task.cancelled():  # aborted: the worker stops and its engine hangs
                raise Unavailable(
                    "the worker shut down before the answer began", code="worker_stopping"
                )
            self._task.result()
            raise RuntimeError("generation ended before its prompt was accepted")

    @property
    def done(self) -> bool:
        return self._task.done()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop; it looks at each token, so it stops within one."""
        self._cancelled.set()

    def abort(self) -> None:
        """Stop it from outside: for an engine that sends no token any more (hung), so never
        sees `cancel`. Its request to the engine is closed and its slot freed at once."""
        self._cancelled.set()
        self._task.cancel()

    async def pieces(self) -> AsyncIterator[Piece]:
        try:
            while (item := await self._queue.get()) is not _END:
                assert isinstance(item, tuple)
                yield item
            if self._task.cancelled():
                # Aborted (the worker stopping gave up on a hung engine): cut short, as a
                # cancelled answer is.
                self.outcome = Outcome(0, 0, "stop", cancelled=True)
                return
            try:
                self.outcome = self._task.result()
            except PromptError as exc:
                # Refused by the engine once generating began (a JSON schema its grammar
                # cannot express): the request's fault, not the worker's.
                raise BadRequest(exc.message, code=exc.code, param=exc.param) from None
            except Exception as exc:
                log.exception("generation failed")
                raise RbeeError(f"generation failed: {exc}", code="generation_failed") from None
        finally:
            if not self._task.done():
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
