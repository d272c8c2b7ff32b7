"""Routing policies: pure functions from a snapshot of candidates to a choice. No I/O, no clock.

A policy sees only workers that can take a request now (online, not stopping, not cooling down
after a failure, and with a free slot by the queen's own count) and returns one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


# How each decision came about, as `rbee_route_decisions_total{policy,outcome}` counts it.
PREFIX_HIT = "prefix_hit"  # the worker that holds the longest part of the conversation
SESSION = "session"  # the worker the request's session (OpenAI `user`, x-session-id) is on
LEAST_LOADED = "least_loaded"  # no worker holds any of it: least-loaded decides
OVERLOADED = "overloaded"  # the worker that holds it is too busy: least-loaded won


@dataclass(frozen=True, slots=True)
class Decision:
    choice: Candidate
    outcome: str


def prefix_affinity(
    candidates: Sequence[Candidate],
    turn: int,
    held: Mapping[str, int],
    session: str | None,
    margin: float,
) -> Decision:
    """The worker whose KV cache most likely holds the request's prefix, under a load guard.

    `held`: per worker, how many leading blocks of the request it was recently sent (the
    longer, the more of the prompt its cache already holds). `session`: the worker the
    request's session was last on. A worker is overloaded when its load exceeds the lowest
    load among the candidates by more than `margin` (a share of slots, 0.5: half its slots
    busier than the least loaded one); an overloaded worker is passed over.

    The session's worker wins while it can take the request and is not overloaded; else the
    worker holding the longest prefix among those not overloaded (the lowest load among
    equals, the turn counter breaking ties), else least-loaded."""
    lowest = min(c.load for c in candidates)
    fit = [c for c in candidates if c.load - lowest <= margin]
    if session is not None:
        for c in fit:
            if c.worker_id == session:
                return Decision(c, SESSION)
    longest = max(held.get(c.worker_id, 0) for c in candidates)
    if longest == 0:
        return Decision(least_loaded(candidates, turn), LEAST_LOADED)
    best = max(held.get(c.worker_id, 0) for c in fit)
    if best == 0:
        return Decision(least_loaded(fit, turn), OVERLOADED)
    holders = [c for c in fit if held.get(c.worker_id, 0) == best]
    return Decision(least_loaded(holders, turn), PREFIX_HIT if best == longest else OVERLOADED)


# The policies by name (`--routing-policy`). `prefix` is least-loaded for a request that has
# no prefix to match (embeddings); the router applies `prefix_affinity` to the others.
POLICIES: dict[str, Policy] = {
    "prefix": least_loaded,
    "least-loaded": least_loaded,
    "round-robin": round_robin,
}
