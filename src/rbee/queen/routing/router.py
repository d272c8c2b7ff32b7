"""The router: turns a model name into a lease on one worker, waiting in line if it must."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from rbee.contracts.workers import WorkerInfo, WorkerStatus
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker
from rbee.queen.routing.policies import Candidate, Policy
from rbee.queen.routing.prefixes import Affinity, RouteKey, route_key

# A worker reporting `busy` still gets requests while the queen's own count shows a free slot:
# the queen's count is fresher than the worker's last heartbeat about the same requests.
SERVING = (WorkerStatus.READY, WorkerStatus.BUSY)

# The workers a request may go to: those of its model that serve embeddings, or the others.
Pool = tuple[str, bool]


def pool_of(info: WorkerInfo) -> Pool:
    return (info.model_id, info.embedding)


@dataclass(frozen=True, slots=True)
class Lease:
    model: str
    worker_id: str
    url: str
    embedding: bool = False
    generation: int = 0  # of the worker's id, as the load tracker counts it

    @property
    def pool(self) -> Pool:
        return (self.model, self.embedding)


class Router:
    def __init__(
        self,
        registry: WorkerRegistry,
        tracker: LoadTracker,
        policy: Policy,
        admission: AdmissionQueue,
        *,
        affinity: Affinity | None = None,
        policy_name: str | None = None,
    ) -> None:
        self.registry = registry
        self.tracker = tracker
        self.policy = policy
        self.admission = admission
        # The prefix policy's memory: with it, a request with a route key goes where its
        # prefix is cached (routing.prefixes); without, every request goes by `policy`.
        self.affinity = affinity
        self.policy_name = policy_name or policy.__name__.replace("_", "-")
        self._plain_outcome = policy.__name__
        # (policy, outcome) -> decisions, for rbee_route_decisions_total.
        self.decisions: Counter[tuple[str, str]] = Counter()
        self._turns: dict[Pool, int] = {}
        self._departures: dict[str, asyncio.Future[None]] = {}
        # Workers being unloaded: no new request goes to them, and a request for their model
        # starts another worker rather than waiting for one that is going away.
        self._retiring: set[str] = set()

    def candidates(
        self, model: str, exclude: Collection[str] = (), *, embedding: bool = False
    ) -> list[Candidate]:
        now = self.registry.now()
        found = []
        for record in self.registry.records_for_model(model):
            info = record.info
            if (
                info.embedding is not embedding
                or info.id in exclude
                or info.id in self._retiring
                or info.status not in SERVING
                or not self.registry.is_fresh(record, now)
                or self.tracker.is_benched(info.id, record.seen_at)
            ):
                continue
            in_flight = self.tracker.in_flight(info.id)
            if in_flight < info.slots:
                found.append(Candidate(info.id, info.url, info.slots, in_flight))
        return found

    def has_live_worker(
        self, model: str, exclude: Collection[str] = (), *, embedding: bool = False
    ) -> bool:
        """A worker that is up or on its way up (starting) and not benched after a failure,
        so waiting for it makes sense."""
        now = self.registry.now()
        return any(
            r.info.embedding is embedding
            and r.info.id not in exclude
            and r.info.id not in self._retiring
            and r.info.status in (*SERVING, WorkerStatus.STARTING)
            and self.registry.is_fresh(r, now)
            and not self.tracker.is_benched(r.info.id, r.seen_at)
            for r in self.registry.records_for_model(model)
        )

    def route_key(self, payload: Mapping[str, Any], session_header: str | None) -> RouteKey | None:
        """What the prefix policy routes the request by; None under the other policies."""
        if self.affinity is None:
            return None
        return route_key(payload, session_header)

    def try_take(
        self,
        model: str,
        exclude: Collection[str] = (),
        *,
        embedding: bool = False,
        key: RouteKey | None = None,
    ) -> Lease | None:
        found = self.candidates(model, exclude, embedding=embedding)
        if not found:
            return None
        pool = (model, embedding)
        turn = self._turns.get(pool, 0)
        self._turns[pool] = turn + 1
        if self.affinity is not None and key is not None and not embedding:
            decision = self.affinity.choose(found, turn, key)
            choice, outcome = decision.choice, decision.outcome
        else:
            choice, outcome = self.policy(found, turn), self._plain_outcome
        self.decisions[self.policy_name, outcome] += 1
        generation = self.tracker.begin(choice.worker_id)
        return Lease(model, choice.worker_id, choice.url, embedding, generation)

    async def acquire(
        self,
        model: str,
        exclude: Collection[str] = (),
        *,
        embedding: bool = False,
        key: RouteKey | None = None,
        arrived: float | None = None,
    ) -> Lease:
        return await self.admission.acquire(
            (model, embedding),
            lambda: self.try_take(model, exclude, embedding=embedding, key=key),
            lambda: not self.has_live_worker(model, exclude, embedding=embedding),
            arrived,
        )

    def release(self, lease: Lease) -> None:
        self.tracker.end(lease.worker_id, lease.generation)
        self.admission.notify(lease.pool)

    def departure(self, worker_id: str) -> asyncio.Future[None]:
        """Done when the worker goes offline or leaves the registry: requests still waiting for
        its first byte stop waiting and go elsewhere. A future rather than an event, so that
        every proxied request can wait on it without a task of its own; never cancel it, as
        all requests to the worker share it."""
        gone = self._departures.get(worker_id)
        if gone is None:
            gone = self._departures[worker_id] = asyncio.get_running_loop().create_future()
        return gone

    def depart(self, worker_id: str) -> None:
        gone = self._departures.pop(worker_id, None)
        if gone is not None and not gone.done():
            gone.set_result(None)

    def lost(self, info: WorkerInfo) -> None:
        """The worker will serve no more (unloading, offline, gone): requests waiting in line
        for its pool look again whether another can free up, else start one. What the prefix
        policy remembers of its cache goes: were it to come back, its cache would be empty."""
        if self.affinity is not None:
            self.affinity.drop(info.id)
        self.admission.notify_all(pool_of(info))

    def forget(self, worker_id: str) -> None:
        """The worker left the registry: its waiting requests go elsewhere and its counts go."""
        self.depart(worker_id)
        self.tracker.forget(worker_id)
        self._retiring.discard(worker_id)
        if self.affinity is not None:
            self.affinity.drop(worker_id)

    def retire(self, worker_id: str) -> None:
        """The worker is about to be unloaded: lease it no more."""
        self._retiring.add(worker_id)
        if (info := self.registry.get_worker(worker_id)) is not None:
            self.lost(info)

    def unretire(self, worker_id: str) -> None:
        """Its unloading failed: it serves again."""
        self._retiring.discard(worker_id)

    def retiring(self, worker_id: str) -> bool:
        return worker_id in self._retiring

    def fail(self, lease: Lease) -> None:
        """The worker failed before answering: bench it, free the lease."""
        self.tracker.bench(lease.worker_id)
        self.release(lease)
