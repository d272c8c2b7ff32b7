"""What the proxy does after one try at a worker: pure rules, no I/O.

Nothing has reached the client before the proxy decides, so every outcome but a real answer
may still go elsewhere:

- `answered`: the worker answered (below 500, not 429) and its first bytes are in: relay it.
- `full`: the worker's own queue is full (429). Not its fault, so it is not benched; another
  worker with a free slot gets the request, and only when none has one does the 429 go out.
- `failed`: no answer (refused, reset, a dead peer found by TCP) or a 5xx: bench the worker
  and retry elsewhere, up to `retries` times.
- `gone`: the registry declared the worker offline (or removed it) while the request waited
  for its first byte: the same as `failed`.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    ANSWERED = "answered"
    FULL = "full"
    FAILED = "failed"
    GONE = "gone"


class Step(StrEnum):
    RELAY = "relay"  # send this answer to the client
    OVERFLOW = "overflow"  # try a worker with a free slot now; if none, relay this answer
    RETRY = "retry"  # bench this worker, lease another (waiting or starting one if need be)
    GIVE_UP = "give_up"  # bench this worker and answer 502


def classify(status: int) -> Outcome:
    """The outcome of a worker's answer by its status code."""
    if status == 429:
        return Outcome.FULL
    if status >= 500:
        return Outcome.FAILED
    return Outcome.ANSWERED


def next_step(outcome: Outcome, failures: int, retries: int) -> Step:
    """`failures` counts the failed or gone tries so far, this one included."""
    if outcome is Outcome.ANSWERED:
        return Step.RELAY
    if outcome is Outcome.FULL:
        return Step.OVERFLOW
    return Step.RETRY if failures <= retries else Step.GIVE_UP
