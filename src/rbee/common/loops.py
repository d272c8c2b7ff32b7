"""Background loops that a bug cannot end: each daemon runs its loops under `supervise`.

A loop that raises is logged with its traceback, counted in `rbee_background_errors_total`
under its name, and started again after a pause; a loop left dead would stop, silently and
for good, whatever it does (removing dead workers, heartbeats). The pause doubles while the
loop keeps failing at once, so a bug that fails every time fills no log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("rbee.loops")

METRIC = "rbee_background_errors"
FIRST_PAUSE_S = 1.0
LONGEST_PAUSE_S = 60.0


class LoopErrors:
    """How often each background loop of one daemon failed, in that daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._counter = Counter(
            METRIC,
            "Exceptions raised by a background loop (which was then started again), by loop",
            ["loop"],
            registry=registry,
        )

    def watch(self, loop: str) -> None:
        """Show the loop's series at 0 before its first failure, so alerts can rely on it."""
        self._counter.labels(loop=loop)

    def failed(self, loop: str) -> None:
        self._counter.labels(loop=loop).inc()

    def count(self, loop: str) -> float:
        found = self._registry.get_sample_value(f"{METRIC}_total", {"loop": loop})
        return found or 0.0


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    errors: LoopErrors | None = None,
    *,
    first_pause_s: float = FIRST_PAUSE_S,
    longest_pause_s: float = LONGEST_PAUSE_S,
) -> None:
    """Run `run()` until it returns or is cancelled; start it again whenever it raises."""
    if errors is not None:
        errors.watch(name)
    pause = first_pause_s
    while True:
        began = time.monotonic()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background loop %r failed; starting it again in %gs", name, pause)
            if errors is not None:
                errors.failed(name)
        # A loop that ran a good while before failing starts again soon; one that keeps
        # failing at once waits longer each time.
        if time.monotonic() - began > longest_pause_s:
            pause = first_pause_s
        await asyncio.sleep(pause)
        pause = min(pause * 2, longest_pause_s)
