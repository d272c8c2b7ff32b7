"""Routing policies: pure functions from a snapshot of candidates to a choice. No I/O, no clock.

A policy sees only workers that can take a request now (online, not stopping, not cooling down
after a failure, and with a free slot by the queen's own count) and returns one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    worker_id: str
    url: str
    slots: int
    in_flight: int  # requests the queen itself has sent there and not yet finished

    @property
    def load(self) -> float:
        return self.in_flight / self.slots


# A policy gets the candidates (never empty) and a per-model turn counter for fair tie-breaks.
Policy = Callable[[Sequence[Candidate], int], Candidate]


def least_loaded(candidates: Sequence[Candidate], turn: int) -> Candidate:
    """Lowest load wins; among equals, the turn counter rotates so repeated picks spread out."""
    lowest = min(c.load for c in candidates)
    tied = sorted((c for c in candidates if c.load == lowest), key=lambda c: c.worker_id)
    return tied[turn % len(tied)]


def round_robin(candidates: Sequence[Candidate], turn: int) -> Candidate:
    """Each candidate in turn, whatever its load."""
    ordered = sorted(candidates, key=lambda c: c.worker_id)
    return ordered[turn % len(ordered)]


POLICIES: dict[str, Policy] = {"least-loaded": least_loaded, "round-robin": round_robin}
