"""The router: turns a model name into a lease on one worker, waiting in line if it must."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from rbee.contracts.workers import WorkerStatus
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker
from rbee.queen.routing.policies import Candidate, Policy

# A worker reporting `busy` still gets requests while the queen's own count shows a free slot:
# the queen's count is fresher than the worker's last heartbeat about the same requests.
SERVING = (WorkerStatus.READY, WorkerStatus.BUSY)


@dataclass(frozen=True, slots=True)
class Lease:
    model: str
    worker_id: str
    url: str


class Router:
    def __init__(
        self,
        registry: WorkerRegistry,
        tracker: LoadTracker,
        policy: Policy,
        admission: AdmissionQueue,
    ) -> None:
        self.registry = registry
        self.tracker = tracker
        self.policy = policy
        self.admission = admission
        self._turns: dict[str, int] = {}

    def candidates(self, model: str, exclude: Collection[str] = ()) -> list[Candidate]:
        now = self.registry.now()
        found = []
        for record in self.registry.records_for_model(model):
            info = record.info
            if (
                info.id in exclude
                or info.status not in SERVING
                or not self.registry.is_fresh(record, now)
                or self.tracker.is_benched(info.id, record.seen_at)
            ):
                continue
            in_flight = self.tracker.in_flight(info.id)
            if in_flight < info.slots:
                found.append(Candidate(info.id, info.url, info.slots, in_flight))
        return found

    def has_live_worker(self, model: str, exclude: Collection[str] = ()) -> bool:
        """A worker that is up or on its way up (starting) and not benched after a failure,
        so waiting for it makes sense."""
        now = self.registry.now()
        return any(
            r.info.id not in exclude
            and r.info.status in (*SERVING, WorkerStatus.STARTING)
            and self.registry.is_fresh(r, now)
            and not self.tracker.is_benched(r.info.id, r.seen_at)
            for r in self.registry.records_for_model(model)
        )

    def try_take(self, model: str, exclude: Collection[str] = ()) -> Lease | None:
        found = self.candidates(model, exclude)
        if not found:
            return None
        turn = self._turns.get(model, 0)
        self._turns[model] = turn + 1
        choice = self.policy(found, turn)
        self.tracker.begin(choice.worker_id)
        return Lease(model, choice.worker_id, choice.url)

    async def acquire(self, model: str, exclude: Collection[str] = ()) -> Lease:
        return await self.admission.acquire(model, lambda: self.try_take(model, exclude))

    def release(self, lease: Lease) -> None:
        self.tracker.end(lease.worker_id)
        self.admission.notify(lease.model)

    def fail(self, lease: Lease) -> None:
        """The worker failed before answering: bench it, free the lease."""
        self.tracker.bench(lease.worker_id)
        self.release(lease)
