"""Replicas follow the load: whether a model's pool of workers should get one more worker now.

A pure decision over a snapshot of one pool (a model's chat workers, or its embedding
workers); `rbee.queen.replicas_loop` builds the snapshots and starts the workers. A pool gets
another worker when all its workers are busy and its oldest waiting request has waited at least
the threshold, no start for it is under way yet (one at a time: a start takes seconds, and the
requests it is for are still waiting when the next check comes), and it has fewer than its
`max_replicas`. A pool with no worker at all is not this policy's: a request for it starts
one itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One pool of workers as the replica policy sees it."""

    model: str
    embedding: bool
    workers: int  # serving: ready or busy, heard from, not being unloaded
    free_slots: int  # slots of those workers with no request on them
    starting: int  # workers of the pool on their way up (replica starts and others)
    waiting: int  # requests waiting in the pool's queue
    oldest_wait_s: float  # how long the first of them has waited (0 when none waits)
    max_replicas: int | None  # None: as many as fit


def wants_replica(pool: PoolLoad, after_s: float) -> bool:
    """Start one more worker for the pool now?"""
    if pool.workers == 0 or pool.starting > 0:
        return False
    if pool.free_slots > 0 or pool.waiting == 0 or pool.oldest_wait_s < after_s:
        return False
    return pool.max_replicas is None or pool.workers < pool.max_replicas
