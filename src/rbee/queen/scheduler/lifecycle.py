"""Keep-alive: which loaded workers have been idle past their keep-alive and should unload.

A pure decision over snapshots; `rbee.queen.idle` builds the snapshots and stops the workers.
Idle means nothing in flight on the worker and nothing waiting in its pool's queue; the clock
restarts when each request on it ends. A pinned worker (keep-alive `math.inf`: started
explicitly without `--keep-alive`, or kept by a request's `keep_alive: -1`) never expires, and
a model keeps at least its `min_replicas` loaded workers (its least recently used go first).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IdleSnapshot:
    """One loaded worker as the keep-alive sees it."""

    worker_id: str
    model: str
    keep_alive_s: float  # math.inf: pinned
    busy: bool  # a request in flight on it, or waiting for its pool
    idle_since: float  # when its last request ended (or it was first seen), queen's clock

    @property
    def pinned(self) -> bool:
        return math.isinf(self.keep_alive_s)


def keep_alive_left(worker: IdleSnapshot, now: float) -> float:
    """Seconds until the worker unloads if nothing else comes: its whole keep-alive while it
    is busy (the clock restarts when the request ends), `math.inf` when pinned."""
    if worker.busy or worker.pinned:
        return worker.keep_alive_s
    return max(0.0, worker.keep_alive_s - (now - worker.idle_since))


def idle_expired(
    workers: Iterable[IdleSnapshot],
    now: float,
    min_replicas: Callable[[str], int] = lambda model: 0,
) -> list[str]:
    """The workers to unload now: idle, and idle for at least their keep-alive, as long as
    their model keeps `min_replicas(model)` of its loaded workers (in the order given)."""
    workers = list(workers)
    expired = [
        w for w in workers if not w.busy and not w.pinned and now - w.idle_since >= w.keep_alive_s
    ]
    loaded = Counter(w.model for w in workers)
    may_go = {model: max(0, n - min_replicas(model)) for model, n in loaded.items()}
    chosen = set()
    for w in sorted(expired, key=lambda w: w.idle_since):
        if may_go[w.model] > 0:
            may_go[w.model] -= 1
            chosen.add(w.worker_id)
    return [w.worker_id for w in expired if w.worker_id in chosen]
