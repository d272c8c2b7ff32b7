"""Back-off for on-demand worker starts, per model and hive: a model that crashes on load (or
soon after) must not make the queen start worker after worker.

Pure bookkeeping over an injected clock: the spawner reports what happened, placement asks
which hives are on hold. One failure is bad luck (an OOM kill, a stray SIGKILL) and is retried
at once; from the second in a row the pair is on hold for `base_s`, doubling with each further
failure up to `cap_s`. A worker that stays up for `stable_after_s` clears the record.
"""

from __future__ import annotations

from dataclasses import dataclass

from rbee.common.clock import Clock, monotonic

BASE_S = 5.0
CAP_S = 300.0
# A worker that dies sooner than this after becoming ready counts as a failed start.
STABLE_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class Hold:
    """Why starts of `model` on `hive_id` wait, and until when (the clock's scale)."""

    model: str
    hive_id: str
    failures: int  # in a row
    reason: str
    until: float


def delay_after(failures: int, base_s: float = BASE_S, cap_s: float = CAP_S) -> float:
    """0, base, 2·base, 4·base, … capped: the wait after the n-th failure in a row."""
    if failures <= 1:
        return 0.0
    return min(cap_s, base_s * 2.0 ** min(failures - 2, 32))


class StartBackoff:
    def __init__(
        self,
        base_s: float = BASE_S,
        cap_s: float = CAP_S,
        stable_after_s: float = STABLE_AFTER_S,
        clock: Clock = monotonic,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.stable_after_s = stable_after_s
        self._clock = clock
        self._holds: dict[tuple[str, str], Hold] = {}

    def failed(self, model: str, hive_id: str, reason: str) -> Hold:
        """A start failed, or its worker died early: hold further starts there for a while."""
        previous = self._holds.get((model, hive_id))
        failures = (previous.failures if previous else 0) + 1
        until = self._clock() + delay_after(failures, self.base_s, self.cap_s)
        hold = Hold(model, hive_id, failures, reason, until)
        self._holds[(model, hive_id)] = hold
        return hold

    def worker_ended(self, model: str, hive_id: str, ready_at: float, reason: str) -> Hold | None:
        """A worker the queen started went away. Soon after it became ready, that is a failed
        start; after a stable run it is an ordinary loss, and the failure record is cleared."""
        if self._clock() - ready_at < self.stable_after_s:
            return self.failed(model, hive_id, reason)
        self.stable(model, hive_id)
        return None

    def stable(self, model: str, hive_id: str) -> None:
        """A worker there proved itself: forget past failures."""
        self._holds.pop((model, hive_id), None)

    def hold(self, model: str, hive_id: str) -> Hold | None:
        """The hold in force for this pair, if any (an expired one keeps its failure count, so
        the next failure waits longer, but no longer blocks a start)."""
        hold = self._holds.get((model, hive_id))
        if hold is None or self._clock() >= hold.until:
            return None
        return hold

    def holds(self, model: str) -> list[Hold]:
        """Every hold in force for a model, soonest to end first."""
        now = self._clock()
        found = [h for (m, _), h in self._holds.items() if m == model and now < h.until]
        return sorted(found, key=lambda h: h.until)

    def held_hives(self, model: str) -> set[str]:
        return {h.hive_id for h in self.holds(model)}

    def remaining_s(self, hold: Hold) -> float:
        return max(0.0, hold.until - self._clock())
